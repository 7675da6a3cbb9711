"""What the unknown-input score costs per image: the Predictor's outputs with and without the
stage score (models.unknown_stages), on the torch and ONNX Runtime backends (CPU, fp32).

    python -m bench.unknown_cost [--threads 1] [--repeats 20]

The state is fitted on the pooled features of random images (its size, not its values,
sets the cost). Prints one markdown row per case (arch, size, classes, task), backend and
batch size.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from models.architectures import arch_spec, build
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.predict import Predictor
from models.unknown import METHOD, attach_state
from models.unknown_stages import (
    STANDARDISE_KEY,
    StagedNetwork,
    StageMahalanobis,
    fit_state,
    stage_key,
)

CASES = (("resnet18", 32, 10, "single_label"), ("resnet18", 224, 10, "single_label"),
         ("resnet18", 224, 10, "multi_label"), ("resnet50", 224, 10, "single_label"),
         ("resnet50", 224, 1000, "single_label"))


def predictors(arch: str, size: int, classes: int, task: str, backend: str
               ) -> tuple[Predictor, Predictor, dict[str, torch.Tensor]]:
    """The same model without and with the stage rule, and the rule's state."""
    torch.manual_seed(0)
    model = build(arch, num_classes=classes, stem="small" if size <= 64 else "imagenet").eval()
    pre = Preprocessing.for_crop(size, ratio=arch_spec(arch).eval_resize_ratio)
    names = [f"c{i}" for i in range(classes)]
    card = ModelCard(name="cost", arch=arch, task=task, classes=names, preprocessing=pre,
                     stem="small" if size <= 64 else "imagenet")
    with torch.no_grad():
        _, pooled = StagedNetwork(model, "fc")(torch.randn(8, 3, size, size))
    many = [p.repeat(max(1, classes // 4), 1) + torch.randn(len(p) * max(1, classes // 4),
                                                               p.shape[1]) for p in pooled]
    targets = torch.arange(len(many[0])) % classes
    if task == "multi_label":  # each image carries its class and the next one
        targets = (torch.nn.functional.one_hot(targets, classes)
                   + torch.nn.functional.one_hot((targets + 1) % classes, classes)).float()
    state = fit_state([(many, targets)], pooled, classes)
    ruled = build(arch, num_classes=classes, stem=card.stem).eval()
    ruled.load_state_dict(model.state_dict())
    attach_state(ruled, state)
    rule = {"method": METHOD, "threshold": 1.0, "acceptance": 0.95}
    cpu = Accelerator.create("cpu", "fp32")
    kw = {"backend": backend, "threads": torch.get_num_threads()}
    plain = Predictor(model, card, cpu, **kw)
    with_rule = Predictor(ruled, replace(card, unknown=rule), cpu, **kw)
    return plain, with_rule, state


def score_alone_us(state: dict[str, torch.Tensor], batch: int = 16, repeats: int = 50
                   ) -> float:
    """Median microseconds per image of the score itself on pooled features (no network)."""
    score = StageMahalanobis(state)
    widths = [state[stage_key(s, "whitening")].shape[0]
              for s in range(state[STANDARDISE_KEY].shape[0])]
    pooled = [torch.randn(batch, w) for w in widths]
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            score(pooled)
            times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2] / batch


def multiply_adds(state: dict[str, torch.Tensor]) -> int:
    """The score's multiply-adds per image: each stage's whitening and class distances."""
    stages = state[STANDARDISE_KEY].shape[0]
    return sum(state[stage_key(s, "whitening")].numel() + state[stage_key(s, "means")].numel()
               for s in range(stages))


def per_image_ms(runs: list[Predictor], batch: torch.Tensor, repeats: int) -> list[float]:
    """Each predictor's median milliseconds per image over `repeats` runs of `batch`, the
    predictors taking turns so that a busy machine slows them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for predictor in runs:
        predictor.outputs(batch)
    for _ in range(repeats):
        for predictor, kept in zip(runs, times, strict=True):
            start = time.perf_counter()
            predictor.outputs(batch)
            kept.append(time.perf_counter() - start)
    return [1000 * sorted(t)[len(t) // 2] / len(batch) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| arch | px | classes | task | state | score's multiply-adds / image | score "
          "alone, batch 16 | backend | batch | ms/image without | with the score |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, size, classes, task in CASES:
        for backend in args.backends:
            plain, ruled, state = predictors(arch, size, classes, task, backend)
            size_mib = sum(t.numel() * 4 for t in state.values()) / 2**20
            alone = score_alone_us(state)
            for n in (1, 16):
                batch = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
                a, b = per_image_ms([plain, ruled], batch, args.repeats)
                print(f"| {arch} | {size} | {classes} | {task} | {size_mib:.1f} MiB | "
                      f"{multiply_adds(state) / 1e6:.2f} M | {alone:.0f} us | {backend} | {n} | "
                      f"{a:.2f} | {b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
