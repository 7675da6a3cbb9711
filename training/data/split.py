"""The train/validation split: a seeded stratified split, --val, or the one split.json recorded
(re-used by --resume), and the digest that names it."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from training.config import SPLIT_FILE, TrainConfig
from training.data.discovery import Sample, SampleSet, discover, sample_key
from training.distributed import DistInfo
from training.exceptions import DataError
from training.storage import write_atomically


def stratified_split(samples: Sequence[Sample], *, fraction: float, seed: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """Seeded split that keeps each class's share (multi-label: grouped by rarest label)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-fraction must lie in (0, 1), got {fraction}")
    counts: dict[str, int] = defaultdict(int)
    for s in samples:
        for label in s.labels:
            counts[label] += 1
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        key = min(s.labels, key=lambda c: (counts[c], c)) if s.labels else ""
        groups[key].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda s: str(s.path))
        rng.shuffle(members)
        n_val = round(len(members) * fraction) if len(members) > 1 else 0
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    if not val:
        raise DataError("the validation split is empty: add images or pass --val")
    # One canonical order, so a split read back from split.json batches identically.
    return sorted(train, key=lambda s: str(s.path)), sorted(val, key=lambda s: str(s.path))


def classes_without(samples: Sequence[Sample], classes: Sequence[str]) -> list[str]:
    """The classes that no sample carries."""
    present = {label for s in samples for label in s.labels}
    return [c for c in classes if c not in present]


def split_digest(train: Sequence[Sample], train_root: Path, val: Sequence[Sample],
                 val_root: Path) -> str:
    """A sha256 naming exactly which images train and which validate."""
    payload = {"train": sorted(sample_key(s.path, train_root) for s in train),
               "val": sorted(sample_key(s.path, val_root) for s in val)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def split_payload(root: Path, train: Sequence[Sample], val: Sequence[Sample], *, seed: int,
                  fraction: float) -> str:
    """The text of split.json: the split as paths relative to the data root."""
    payload = {"root": str(root), "seed": seed, "val_fraction": fraction,
               "train": sorted(sample_key(s.path, root) for s in train),
               "val": sorted(sample_key(s.path, root) for s in val)}
    return json.dumps(payload, indent=1) + "\n"


def read_split(path: Path, samples: Sequence[Sample], root: Path
               ) -> tuple[list[Sample], list[Sample]]:
    """Re-apply a split written by `split_payload` to freshly discovered samples."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        recorded = [*payload["train"], *payload["val"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a split file ({exc})") from exc
    by_key = {sample_key(s.path, root): s for s in samples}
    missing = [r for r in recorded if r not in by_key]
    if missing:
        raise DataError(f"{path}: {len(missing)} images of the recorded split are gone, "
                        f"e.g. {missing[0]}")

    def ordered(keys: list[str]) -> list[Sample]:
        return sorted((by_key[k] for k in keys), key=lambda s: str(s.path))
    return ordered(payload["train"]), ordered(payload["val"])


def split_samples(cfg: TrainConfig, found: SampleSet, info: DistInfo
                  ) -> tuple[list[Sample], list[Sample], Path, str]:
    """Train and validation samples, the validation root, and where the split came from."""
    split_path = cfg.output / SPLIT_FILE
    if cfg.val is not None:
        val_set = discover(cfg.val, task=found.task, classes=found.classes,
                           max_pixels=cfg.max_pixels)
        found.skipped.extend(val_set.skipped)
        return found.samples, val_set.samples, val_set.root, f"--val {cfg.val}"
    if cfg.resume is not None and split_path.is_file():
        train, val = read_split(split_path, found.samples, found.root)
        return train, val, found.root, str(split_path)
    train, val = stratified_split(found.samples, fraction=cfg.val_fraction, seed=cfg.seed)
    if info.is_main:
        write_atomically(split_path, split_payload(found.root, train, val, seed=cfg.seed,
                                                   fraction=cfg.val_fraction))
    return train, val, found.root, f"a new split (seed {cfg.seed})"
