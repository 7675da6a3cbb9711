"""What the unknown-input scores are made from: a checkpoint's logits, pooled features (the
head's input) and each residual stage's average-pooled output, for every image of a set."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import checkpoint
from models.architectures import arch_spec
from models.card import ModelCard
from models.preprocessing import Normalize, eval_transform


@dataclass(frozen=True)
class Features:
    """One set's outputs: logits [N, C], pooled [N, D], each stage's spatial mean and
    standard deviation [[N, D_s]...], and targets (class indices [N], multi-hot [N, C], or
    None for an outside set)."""

    logits: np.ndarray
    pooled: np.ndarray
    stages: list[np.ndarray]
    stage_stds: list[np.ndarray]
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.logits)


def images_of(folder: Path, card: ModelCard) -> tuple[list[Path], np.ndarray | None]:
    """The images of a known or outside set and their targets in the card's classes: class
    folders, or a folder holding labels.csv (multi-hot); None for an outside set."""
    table = folder / "labels.csv"
    if table.is_file():
        with open(table, newline="") as fh:
            rows = list(csv.DictReader(fh))
        targets = np.zeros((len(rows), card.num_classes), np.float32)
        for i, row in enumerate(rows):
            for label in row["labels"].split():
                targets[i, card.classes.index(label)] = 1.0
        return [folder / row["image"] for row in rows], targets
    paths = sorted(folder.rglob("*.png"))
    names = {p.parent.name for p in paths}
    if names <= set(card.classes):
        return paths, np.array([card.classes.index(p.parent.name) for p in paths])
    return paths, None


def stage_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The stem's activation, then the residual stages (layer1, layer2, ...) in order."""
    stages, index = [model.relu], 1
    while isinstance(getattr(model, f"layer{index}", None), torch.nn.Module):
        stages.append(getattr(model, f"layer{index}"))
        index += 1
    return stages


def _keep_stage(captured: dict[str, list[torch.Tensor]], i: int, _module: torch.nn.Module,
                _args: object, out: torch.Tensor) -> None:
    """A forward hook: the stage's spatial mean and standard deviation per channel."""
    captured[f"s{i}"].append(out.float().mean((2, 3)))
    captured[f"t{i}"].append(out.float().std((2, 3)))


@torch.inference_mode()
def extract(run: Path, folder: Path, batch_size: int = 64) -> Features:
    """Every output the candidate scores need, for every image under `folder`."""
    model, card = checkpoint.load(run)
    model.eval()
    captured: dict[str, list[torch.Tensor]] = {"pooled": []}
    head = arch_spec(card.arch).head(model)
    hooks = [head.register_forward_hook(
        lambda _m, args, _o: captured["pooled"].append(args[0].float().clone()))]
    for i, stage in enumerate(stage_modules(model)):
        captured[f"s{i}"], captured[f"t{i}"] = [], []
        hooks.append(stage.register_forward_hook(partial(_keep_stage, captured, i)))
    transform, normalize = eval_transform(card.preprocessing), Normalize(card.preprocessing)
    paths, targets = images_of(folder, card)
    logits = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in chunk])
        logits.append(model(normalize(batch)).float())
    for hook in hooks:
        hook.remove()
    count = (len(captured) - 1) // 2
    stages = [torch.cat(captured[f"s{i}"]).numpy() for i in range(count)]
    stds = [torch.cat(captured[f"t{i}"]).numpy() for i in range(count)]
    return Features(torch.cat(logits).numpy(), torch.cat(captured["pooled"]).numpy(), stages,
                    stds, targets)
