"""Peer servers for the same model and preprocessing, to benchmark the service against.

    python -m bench.peers litserve --checkpoint DIR --port 8101 [--max-batch-size 16]
    python -m bench.peers naive    --checkpoint DIR --port 8102

`litserve`: LitServe (FastAPI + dynamic batching in a worker process), the closest peer;
`--standin` swaps its model for fixed probabilities, to measure the front end alone.
`naive`: a plain FastAPI endpoint that runs the model once per request.
Both accept the service's multipart upload (field `file`, repeatable) on POST /predict.
"""

import argparse
import asyncio
import logging
import sys

import torch

from models.checkpoint import load
from models.decoding import decode
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import eval_transform

logger = logging.getLogger(__name__)


class _Model:
    """The service's own model path, loaded the same way."""

    def __init__(self, checkpoint: str, device: str, precision: str) -> None:
        model, card = load(checkpoint)
        self.predictor = Predictor(model, card, Accelerator.create(device, precision))
        self.pre = card.preprocessing
        self.transform = eval_transform(self.pre)

    def tensor(self, data: bytes) -> torch.Tensor:
        return self.transform(decode(data, target_size=self.pre.resize))

    def respond(self, probs: torch.Tensor) -> list[dict]:
        return [{"predictions": [{"label": p.label, "score": p.score} for p in r.predictions]}
                for r in self.predictor.postprocess(probs, top_k=5)]


def serve_litserve(args: argparse.Namespace) -> None:
    """Run a LitServe server around the same model."""
    import litserve as ls

    from bench.litserve_peer import ResNetAPI, StandinAPI

    api_class = StandinAPI if args.standin else ResNetAPI
    api = api_class(args.checkpoint, args.device, args.precision,
                    max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu" if args.device == "cpu" else "auto",
                          workers_per_device=args.workers_per_device, timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False,
               num_api_servers=args.api_servers)


def serve_naive(args: argparse.Namespace) -> None:
    """Run a FastAPI endpoint that calls the model once per request."""
    import uvicorn
    from fastapi import FastAPI, UploadFile

    model = _Model(args.checkpoint, args.device, args.precision)
    app = FastAPI()
    lock = asyncio.Lock()

    @app.post("/predict")
    async def predict(file: list[UploadFile]) -> dict:
        datas = [await f.read() for f in file]
        batch = torch.stack([model.tensor(d) for d in datas])
        async with lock:  # one forward at a time, like a model that is not thread-safe
            probs = await asyncio.to_thread(model.predictor.probabilities, batch)
        return {"results": model.respond(probs)}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the chosen peer until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=["litserve", "naive"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds")
    parser.add_argument("--standin", action="store_true",
                        help="litserve: fixed probabilities instead of the model (front end only)")
    parser.add_argument("--api-servers", type=int,
                        help="litserve: num_api_servers (default: LitServe's, one per worker)")
    parser.add_argument("--workers-per-device", type=int, default=1, help="litserve")
    args = parser.parse_args(argv)
    {"litserve": serve_litserve, "naive": serve_naive}[args.peer](args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
