"""What a checkpoint's card may hold: the ModelCard and its Preprocessing, validated strictly.

A card is plain JSON values; whatever a file holds, building a card from it either succeeds
with well-typed, in-range values or raises ValueError saying what is wrong.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from models.architectures import ARCHITECTURES, DEFAULT_EVAL_RESIZE_RATIO, STEMS, arch_spec
from models.calibration import TEMPERATURE_RANGE
from models.drift import reference_problems as drift_reference_problems
from models.shown import shown_value

FORMAT_VERSION = 1
TASKS = ("single_label", "multi_label")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
MAX_SIDE = 4096  # largest resize or crop, in pixels
MAX_CARD_DEPTH = 32  # nesting of objects and arrays in a card (real cards use about 5)
CALIBRATION_FIELDS = ("temperature", "ece_before", "ece_after", "bins")
UNKNOWN_FIELDS = ("method", "threshold", "acceptance")
UNKNOWN_METHODS = ("cosine", "stage_mahalanobis")  # models.unknown.METHODS
MAX_ECE_BINS = 1000
PARENT_FIELDS = ("name", "weights_sha256")

logger = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _numbers_problem(what: str, value: object, *, count: int, low: float, high: float,
                     low_inclusive: bool = True) -> str | None:
    """Why `value` is not a list of `count` finite numbers in the range (None when it is)."""
    want = f"{count} finite numbers in {'[' if low_inclusive else '('}{low}, {high}]"
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return f"{what} must be {want}, got {shown_value(value)}"
    for item in value:
        if not _is_finite_number(item) or not low <= item <= high or \
                (not low_inclusive and item == low):
            return f"{what} must be {want}, got {shown_value(item)} in {shown_value(value)}"
    return None


def is_unicode_text(value: object) -> bool:
    """True for a string that can be written as UTF-8: no lone surrogate, which is how Python
    spells file-name bytes that were not UTF-8 (b'caf\\xe9' becomes 'caf\\udce9')."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _classes_problem(classes: object) -> str | None:
    """Why `classes` is not a non-empty list of unique non-empty strings (None when it is)."""
    if not isinstance(classes, (list, tuple)) or not classes:
        return f"classes must be a non-empty list of class names, got {shown_value(classes)}"
    bad = [c for c in classes if not isinstance(c, str) or not c]
    if bad:
        return (f"classes must be non-empty strings, got {shown_value(bad[0])} in "
                f"{shown_value(classes)}")
    bad = [c for c in classes if not is_unicode_text(c)]
    if bad:
        return (f"classes must be Unicode text, got {shown_value(bad[0])}: a name made of bytes "
                "that are not UTF-8 cannot be sent in an answer")
    if len(set(classes)) != len(classes):
        return "classes must be unique"
    return None


def _nesting_depth_exceeds(value: object, limit: int) -> bool:
    """True when objects and arrays in `value` nest deeper than `limit` (checked without
    recursion, so any depth is safe to check)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@dataclass(frozen=True)
class Preprocessing:
    """The exact eval preprocessing: resize shorter side, center crop, normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when valid); pixels scale to [0, 1]."""
        out = [f"preprocessing.{side} must be an integer in [1, {MAX_SIDE}], got {shown_value(v)}"
               for side, v in (("resize", self.resize), ("crop", self.crop))
               if not _is_int(v) or not 1 <= v <= MAX_SIDE]
        if not out and self.resize < self.crop:
            out.append(f"preprocessing needs crop <= resize, got crop={self.crop} "
                       f"resize={self.resize}")
        for problem in (
                _numbers_problem("preprocessing.mean", self.mean, count=3, low=0.0, high=1.0),
                _numbers_problem("preprocessing.std", self.std, count=3, low=0.0, high=1.0,
                                 low_inclusive=False)):
            if problem:
                out.append(problem)
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            out.append(f"preprocessing.interpolation must be one of {INTERPOLATIONS}, "
                       f"got {shown_value(self.interpolation)}")
        return out

    @classmethod
    def for_crop(cls, crop: int, *, ratio: float = DEFAULT_EVAL_RESIZE_RATIO, **kw: Any
                 ) -> Preprocessing:
        """Preprocessing for a crop size, keeping the resize/crop ratio of the weights."""
        return cls(resize=max(crop, round(crop * ratio)), crop=crop, **kw)


@dataclass
class ModelCard:
    """Everything about a checkpoint except its weights."""

    name: str
    arch: str
    task: str
    classes: list[str]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    thresholds: list[float] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    allow_half: bool = True
    stem: str = "imagenet"
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    weights_sha256: str | None = None  # of model.safetensors, written by save()
    # temperature scaling fitted on validation: temperature, ece_before, ece_after, bins
    calibration: dict[str, Any] | None = None
    # the "unknown input" rule fitted on validation: method, threshold, acceptance (+ its
    # validation figures, and `expected_flagged`: what models.unknown.BENCH_FLAGGED says the
    # rule flagged in the benchmark at that acceptance)
    unknown: dict[str, Any] | None = None
    # what the validation images looked like, for drift figures (models.drift)
    drift: dict[str, Any] | None = None
    # the checkpoint of ours this one was trained from (`fit --weights CHECKPOINT`): its
    # name and weights_sha256; None for a model trained from ImageNet weights or scratch
    parent: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def temperature(self) -> float | list[float] | None:
        """What logits are divided by before softmax/sigmoid (None: not calibrated)."""
        if self.calibration is None:
            return None
        temperature = self.calibration["temperature"]
        return [float(t) for t in temperature] if isinstance(temperature, (list, tuple)) \
            else float(temperature)

    def problems(self) -> list[str]:
        """What is wrong with this card (empty when valid)."""
        out = self._field_type_problems()
        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            out.append(f"format_version {shown_value(self.format_version)} is not supported "
                       f"(this code reads {FORMAT_VERSION})")
        for what, value, known in (("arch", self.arch, tuple(ARCHITECTURES)),
                                   ("stem", self.stem, tuple(STEMS)), ("task", self.task, TASKS)):
            if not isinstance(value, str) or value not in known:
                out.append(f"unknown {what} {shown_value(value)} (known: {', '.join(known)})")
        if self.weights_sha256 is not None and not _is_sha256(self.weights_sha256):
            out.append("weights_sha256 must be 64 hex digits, got "
                       f"{shown_value(self.weights_sha256)}")
        classes_problem = _classes_problem(self.classes)
        if classes_problem:
            out.append(classes_problem)
        elif self.thresholds is not None:
            problem = _numbers_problem("thresholds", self.thresholds, count=len(self.classes),
                                       low=0.0, high=1.0)
            if problem:
                out.append(f"{problem} (one per class)")
        if not classes_problem and self.calibration is not None:
            out += _calibration_problems(self.calibration, self.task, len(self.classes))
        if self.unknown is not None:
            out += _unknown_problems(self.unknown)
        if not classes_problem and self.drift is not None:
            out += drift_reference_problems(self.drift, len(self.classes))
        if self.parent is not None:
            out += _parent_problems(self.parent)
        return out

    @property
    def unknown_threshold(self) -> float | None:
        """The score above which an input is "unknown" (None: the card has no such rule)."""
        return None if self.unknown is None else float(self.unknown["threshold"])

    def _field_type_problems(self) -> list[str]:
        """Fields whose JSON type is wrong: strings, objects, the flag, the preprocessing."""
        out = [f"{what} must be a non-empty string of Unicode text, got {shown_value(value)}"
               for what, value in (("name", self.name), ("created_at", self.created_at))
               if not is_unicode_text(value) or not value]
        out += [f"{what} must be an object, got {shown_value(value)}"
                for what, value in (("metrics", self.metrics), ("training", self.training))
                if not isinstance(value, dict)]
        if not isinstance(self.allow_half, bool):
            out.append(f"allow_half must be true or false, got {shown_value(self.allow_half)}")
        if not isinstance(self.preprocessing, Preprocessing):
            out.append("preprocessing must be a Preprocessing")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        d = asdict(self)
        d["preprocessing"] = {**asdict(self.preprocessing),
                              "mean": list(self.preprocessing.mean),
                              "std": list(self.preprocessing.std)}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Validate and build a card from parsed JSON."""
        if not isinstance(data, dict):
            raise ValueError(f"card must be a JSON object, got {shown_value(data)}")
        if _nesting_depth_exceeds(data, MAX_CARD_DEPTH):
            raise ValueError(f"card nests objects and arrays deeper than {MAX_CARD_DEPTH} levels")
        required = ("name", "arch", "task", "classes", "preprocessing")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        known = set(cls.__dataclass_fields__)
        extra = sorted(k for k in data if k not in known)
        if extra:
            logger.debug("ignoring unknown card fields %s", shown_value(extra))
        pre = data["preprocessing"]
        if not isinstance(pre, dict):
            raise ValueError(f"preprocessing must be an object, got {shown_value(pre)}")
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in pre]
        if missing:
            raise ValueError(f"preprocessing is missing {missing}")
        preprocessing = Preprocessing(
            resize=pre["resize"], crop=pre["crop"], mean=pre["mean"], std=pre["std"],
            interpolation=pre.get("interpolation", "bilinear"))
        fields = {k: v for k, v in data.items() if k in known and k != "preprocessing"}
        return cls(preprocessing=preprocessing, **fields)

def _calibration_problems(calibration: object, task: object, num_classes: int) -> list[str]:
    """What is wrong with a card's `calibration` object (empty when valid)."""
    if not isinstance(calibration, dict):
        return [f"calibration must be an object, got {shown_value(calibration)}"]
    missing = [k for k in CALIBRATION_FIELDS if k not in calibration]
    if missing:
        return [f"calibration is missing {missing}"]
    low, high = TEMPERATURE_RANGE
    temperature = calibration["temperature"]
    if task == "multi_label":
        problem = _numbers_problem("calibration.temperature", temperature, count=num_classes,
                                   low=low, high=high)
        out = [f"{problem} (one per class)"] if problem else []
    else:
        ok = _is_finite_number(temperature) and low <= temperature <= high
        out = [] if ok else [f"calibration.temperature must be a finite number in "
                             f"[{low}, {high}], got {shown_value(temperature)}"]
    out += [f"calibration.{what} must be a finite number in [0, 1], got {shown_value(v)}"
            for what in ("ece_before", "ece_after")
            if not _is_finite_number(v := calibration[what]) or not 0.0 <= v <= 1.0]
    bins = calibration["bins"]
    if not _is_int(bins) or not 1 <= bins <= MAX_ECE_BINS:
        out.append(f"calibration.bins must be an integer in [1, {MAX_ECE_BINS}], "
                   f"got {shown_value(bins)}")
    return out


def _unknown_problems(unknown: object) -> list[str]:
    """What is wrong with a card's `unknown` object (empty when valid)."""
    if not isinstance(unknown, dict):
        return [f"unknown must be an object, got {shown_value(unknown)}"]
    missing = [k for k in UNKNOWN_FIELDS if k not in unknown]
    if missing:
        return [f"unknown is missing {missing}"]
    out = []
    if unknown["method"] not in UNKNOWN_METHODS:
        out.append(f"unknown.method must be one of {', '.join(UNKNOWN_METHODS)}, "
                   f"got {shown_value(unknown['method'])}")
    if not _is_finite_number(unknown["threshold"]):
        out.append(f"unknown.threshold must be a finite number, got "
                   f"{shown_value(unknown['threshold'])}")
    acceptance = unknown["acceptance"]
    if not _is_finite_number(acceptance) or not 0.0 < acceptance <= 1.0:
        out.append(f"unknown.acceptance must be a finite number in (0, 1], got "
                   f"{shown_value(acceptance)}")
    return out


def _parent_problems(parent: object) -> list[str]:
    """What is wrong with a card's `parent` object (empty when valid)."""
    if not isinstance(parent, dict):
        return [f"parent must be an object with {' and '.join(PARENT_FIELDS)}, "
                f"got {shown_value(parent)}"]
    missing = [k for k in PARENT_FIELDS if k not in parent]
    if missing:
        return [f"parent is missing {missing}"]
    out = []
    if not is_unicode_text(parent["name"]) or not parent["name"]:
        out.append(f"parent.name must be a non-empty string of Unicode text, got "
                   f"{shown_value(parent['name'])}")
    if not _is_sha256(parent["weights_sha256"]):
        out.append(f"parent.weights_sha256 must be 64 hex digits, got "
                   f"{shown_value(parent['weights_sha256'])}")
    return out


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and \
        all(c in "0123456789abcdef" for c in value)


def weights_preprocessing(arch: str) -> Preprocessing:
    """The eval preprocessing torchvision publishes with `arch`'s ImageNet weights."""
    transforms = arch_spec(arch).imagenet_weights().transforms()
    return Preprocessing(resize=int(transforms.resize_size[0]), crop=int(transforms.crop_size[0]),
                         mean=tuple(transforms.mean), std=tuple(transforms.std),
                         interpolation=transforms.interpolation.value)
