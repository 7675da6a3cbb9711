"""Optional CPU backends measured against PyTorch on the same checkpoint, with output parity.

    python -m bench.backends --arch resnet50 --batch-sizes 1,8,32 --seconds 5

Exports the checkpoint's model (normalization included) to ONNX, runs it with ONNX Runtime
and OpenVINO when installed, and reports images/s beside PyTorch's plus the largest
probability difference and top-1 agreement on real photos.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import benchmark_checkpoint, emit, environment, images_per_s, web_jpegs
from models.checkpoint import load
from models.onnx_backend import ProbabilityGraph, export_onnx
from models.preprocessing import Normalize, decode, eval_transform

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    """Measure PyTorch vs ONNX Runtime vs OpenVINO; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--checkpoint")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    model, card = load(args.checkpoint or benchmark_checkpoint(args.arch))
    multi_label = card.task == "multi_label"
    served = ProbabilityGraph(model, Normalize(card.preprocessing), multi_label).eval()
    served_cl = ProbabilityGraph(model.to(memory_format=torch.channels_last),
                                 Normalize(card.preprocessing), multi_label).eval()
    crop = card.preprocessing.crop
    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    onnx_path.write_bytes(export_onnx(served, (3, crop, crop)))
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return served_cl(t).numpy()

    runners["torch"] = torch_run
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        runners["onnxruntime"] = lambda x: session.run(None, {"images": x})[0]
    except ImportError:
        logger.info("onnxruntime not installed")
    try:
        import openvino as ov

        compiled = ov.Core().compile_model(str(onnx_path), "CPU",
                                            {"INFERENCE_PRECISION_HINT": "f32"})
        runners["openvino"] = lambda x: compiled(x)[0]
    except ImportError:
        logger.info("openvino not installed")
    transform = eval_transform(card.preprocessing)
    photos = np.stack([transform(decode(b)).numpy() for b in web_jpegs(16)])
    reference = runners["torch"](photos)
    result: dict = {"env": environment(), "arch": card.arch, "backends": {}}
    for name, run in runners.items():
        out = run(photos)
        result["backends"][name] = {
            "max_abs_prob_diff": float(np.abs(out - reference).max()),
            "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
            "images_per_s": {
                b: round(images_per_s(run, np.repeat(photos[:1], b, 0), args.seconds), 2)
                for b in (int(s) for s in args.batch_sizes.split(","))},
        }
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
