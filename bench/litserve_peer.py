"""The LitServe peer's API classes, at module level so LitServe's worker processes can import
them."""

import litserve as ls
import torch
from fastapi import Request

from models.checkpoint import load
from models.decoding import decode
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import eval_transform


class ResNetAPI(ls.LitAPI):
    """The service's model path (same checkpoint, decode, transform, Predictor) in LitServe."""

    def __init__(self, checkpoint: str, device: str, precision: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.checkpoint, self.device_name, self.precision = checkpoint, device, precision

    def setup(self, device: str) -> None:
        model, card = load(self.checkpoint)
        accelerator = Accelerator.create(self.device_name, self.precision)
        self.predictor = Predictor(model, card, accelerator)
        self.pre = card.preprocessing
        self.transform = eval_transform(self.pre)

    def decode_request(self, request: Request) -> torch.Tensor:
        files = request.getlist("file")
        return torch.stack([self.transform(decode(f.file.read(), target_size=self.pre.resize))
                            for f in files])

    def batch(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, x: tuple[torch.Tensor, list[int]]) -> tuple[torch.Tensor, list[int]]:
        return self.predictor.probabilities(x[0]), x[1]

    def unbatch(self, output: tuple[torch.Tensor, list[int]]) -> list[torch.Tensor]:
        return list(output[0].split(output[1]))

    def encode_response(self, output: torch.Tensor) -> dict:
        results = self.predictor.postprocess(output, top_k=5)
        return {"results": [{"predictions": [{"label": p.label, "score": p.score}
                                             for p in r.predictions]} for r in results]}


class StandinAPI(ResNetAPI):
    """The same, with the model replaced by bench.standin_server's fixed probabilities."""

    def setup(self, device: str) -> None:
        from bench.standin_server import install_standin

        install_standin()
        super().setup(device)
