"""Optional CPU backends measured against PyTorch on the same checkpoint, with output parity.

    python -m bench.backends --arch resnet50 --batch-sizes 1,8,32 --seconds 5 [--compile]
    python -m bench.backends --device cuda --compile   # PyTorch eager vs compiled on a GPU

Exports the checkpoint's model (normalization included) to ONNX, runs it with ONNX Runtime
and OpenVINO when installed, and reports images/s beside PyTorch's plus the largest
probability difference and top-1 agreement on real photos. With `--compile` it also runs the
PyTorch model through `torch.compile` (inductor, weights frozen), once with a graph per batch
size and once with a dynamic batch dimension. `first_call_s` is the time of the first call at
each batch size: the compile time for the compiled runners, for the others a warm-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.process.allocator import loaded_allocator
from bench.common import benchmark_checkpoint, emit, environment, images_per_s, web_jpegs
from models.checkpoint import load
from models.decoding import decode
from models.onnx_backend import ProbabilityGraph, export_onnx
from models.preprocessing import Normalize, eval_transform

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    """Measure PyTorch vs ONNX Runtime vs OpenVINO; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--checkpoint")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile (minutes of compiling on a CPU)")
    parser.add_argument("--device", default="cpu",
                        help="where the PyTorch runners (eager and compiled) run, e.g. cuda; "
                             "ONNX Runtime and OpenVINO run on the CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, card = load(args.checkpoint or benchmark_checkpoint(args.arch))
    served = ProbabilityGraph(model.to(memory_format=torch.channels_last),
                              Normalize(card.preprocessing), card.task).eval()
    crop = card.preprocessing.crop
    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    onnx_path.write_bytes(export_onnx(served, (3, crop, crop)))
    served.to(device)  # after the export, which runs on the CPU
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return served(_on(device, x)).cpu().numpy()

    runners["torch"] = torch_run
    if args.compile:
        runners.update(_compiled_runners(served, device))
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        runners["onnxruntime"] = lambda x: session.run(None, {"images": x})[0]
    except ImportError:
        logger.info("onnxruntime not installed")
    try:
        if loaded_allocator() == "tcmalloc":
            # seen here: "double free or corruption" inside OpenVINO with tcmalloc preloaded
            raise ImportError("openvino aborts with tcmalloc preloaded; run with LD_PRELOAD= "
                              "to measure it")
        import openvino as ov

        compiled = ov.Core().compile_model(str(onnx_path), "CPU",
                                            {"INFERENCE_PRECISION_HINT": "f32"})
        runners["openvino"] = lambda x: compiled(x)[0]
    except ImportError as exc:
        logger.info("openvino skipped: %s", exc)
    transform = eval_transform(card.preprocessing)
    photos = np.stack([transform(decode(b)).numpy() for b in web_jpegs(16)])
    reference = runners["torch"](photos)
    result: dict = {"env": environment(), "arch": card.arch, "backends": {}}
    for name, run in runners.items():
        out = run(photos)
        speed, first_call = {}, {}
        for b in (int(s) for s in args.batch_sizes.split(",")):
            batch = np.repeat(photos[:1], b, 0)
            began = time.perf_counter()
            run(batch)
            first_call[b] = round(time.perf_counter() - began, 2)
            speed[b] = round(images_per_s(run, batch, args.seconds), 2)
        result["backends"][name] = {
            "max_abs_prob_diff": float(np.abs(out - reference).max()),
            "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
            "images_per_s": speed,
            "first_call_s": first_call,
        }
        logger.info("%s: %s img/s by batch", name, speed)
    emit(result)
    return result


def _on(device: torch.device, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)


def _compiled_runners(graph: torch.nn.Module, device: torch.device
                      ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """`graph` through torch.compile: one graph per batch size, and one dynamic graph."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: folded and pre-packed
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for name, dynamic in (("torch.compile", False), ("torch.compile dynamic", True)):
        state: dict[str, Callable] = {}

        def run(x: np.ndarray, dynamic: bool = dynamic, state: dict = state) -> np.ndarray:
            if "compiled" not in state:
                # compiled code is cached per function: start clean so that one runner never
                # serves another's graphs (the runners are measured one after the other)
                torch._dynamo.reset()
                state["compiled"] = torch.compile(graph, dynamic=dynamic)
            with torch.inference_mode():
                return state["compiled"](_on(device, x)).cpu().numpy()

        runners[name] = run
    return runners


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
