"""The options of every `python -m training` command, one dataclass each; each field is one
flag (training.options), so an option is declared here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.architectures import ARCHITECTURES, STEMS
from models.decoding import DEFAULT_MAX_PIXELS
from models.device import DEVICE_CHOICES
from models.unknown import ACCEPTANCE
from training.data.balance import IMBALANCE_RATIO
from training.data.images import DEFAULT_DECODE_MEMORY_MB, DEFAULT_DECODE_SECONDS
from training.exceptions import ConfigError
from training.loop.schedule import SCHEDULES
from training.options import Range, describe_defaults, flag_of, option, range_problems
from training.parent import names_checkpoint, option_problems, read_parent_card
from training.recipe import PRESETS, RECIPE_DEFAULTS, STRIDE2_STEM_MAX

# The files a run keeps in its output folder that only training reads (the checkpoint's own
# files and reports are named in models.checkpoint, which the server reads too).
RESUME_FILE = "last.pt"  # the resume state, rewritten after every epoch
SPLIT_FILE = "split.json"  # the train/validation split, re-used by --resume

DEFAULT_ARCH = "resnet50"
DEFAULT_IMAGE_SIZE = 224
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096
STEM_CHOICES = ("auto", *STEMS)
TASK_FLAGS = ("single", "multi")  # what --task accepts
TASK_CHOICES = (None, *TASK_FLAGS, "single_label", "multi_label")  # what a TrainConfig takes
BALANCE_CHOICES = ("auto", "none", "loss", "sampler")
POS_WEIGHT_CHOICES = ("none", "balanced")
OPTIMIZER_CHOICES = ("adamw", "sgd")
SCHEDULE_CHOICES = SCHEDULES
NORMALIZE_CHOICES = ("imagenet", "dataset")
RECIPE_CHOICES = tuple(PRESETS)  # named recipes (training.recipe)
AUTO_RESUME = "auto"  # --resume without a file: the state in --output
ARCH_CHOICES = tuple(ARCHITECTURES)
IMAGENET_ARCH_CHOICES = tuple(a for a, spec in ARCHITECTURES.items() if spec.imagenet is not None)
DEVICE_HELP = "where to run; auto picks CUDA when present"
AMP_HELP = "bf16/fp16 autocast on CUDA (no effect on the CPU)"
MAX_PIXELS_HELP = ("decoding budget per image; larger JPEGs are decoded reduced, other larger "
                   "images skipped")


def default_workers() -> int:
    """DataLoader workers for `fit`: one core left to the training process, at most 4."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


@dataclass
class TrainConfig:
    """Every option of `fit`. None means "let the recipe choose": each such option's default
    is its entry in training.recipe.RECIPE_DEFAULTS, which --help describes (see the end of
    this module). `identity=True` marks the options a resume state must have been saved
    under (training.loop.state; the resolved recipe's values count too)."""

    data: Path = option(positional=True, help="class-folder tree, or a CSV with image,labels")
    output: Path = option(help="checkpoint folder to write")
    val: Path | None = option(None, identity=True,
                              help="validation data (same layout); else a split of DATA")
    val_fraction: float = option(0.2, within=Range(0.0, 1.0, low_open=True, high_open=True),
                                 identity=True,
                                 help="share of DATA split off for validation without --val")
    task: str | None = option(None, choices=TASK_FLAGS, identity=True,
                              help="override the inferred task")
    arch: str | None = option(
        None, choices=ARCH_CHOICES, identity=True,
        default_text=f"{DEFAULT_ARCH}; with --weights CHECKPOINT_DIR, its architecture",
        help="network architecture (resnet20 ... resnet110: the CIFAR ResNets, option A "
             "shortcuts; a b suffix, e.g. resnet20b: option B)")
    weights: str = option("imagenet", identity=True,
                          help="imagenet | none | path to a .pth/.safetensors state dict | "
                               "a checkpoint folder of ours to continue from (its backbone "
                               "and head rows kept; the card records it as `parent`)")
    stem: str = option("auto", choices=STEM_CHOICES,
                       help="auto: small-image stem when training from scratch at <= "
                            f"{STRIDE2_STEM_MAX} px")
    image_size: int | None = option(
        None, within=Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), identity=True,
        default_text=f"{DEFAULT_IMAGE_SIZE}; with --weights CHECKPOINT_DIR, its crop",
        help="training crop size")
    epochs: int = option(10, within=Range(1, 100_000), identity=True, help="epochs to train")
    freeze_epochs: int = option(0, within=Range(0, 100_000), identity=True,
                                help="head-only warm-up epochs")
    batch_size: int | None = option(None, within=Range(1, 1_000_000),
                                    help="images per step and process")
    lr: float | None = option(None, within=Range(0.0, 10.0, low_open=True), help="head LR")
    backbone_lr_scale: float | None = option(None, within=Range(0.0, 100.0),
                                             help="backbone LR = lr x this")
    recipe_name: str | None = option(
        None, flag="--recipe", choices=RECIPE_CHOICES,
        help="a named recipe whose values replace the defaults (options given still win): "
             "he2016-cifar = the CIFAR recipe of He et al. 2016 (SGD, LR steps, pad-and-crop)")
    optimizer: str | None = option(None, choices=OPTIMIZER_CHOICES,
                                   help="adamw, or sgd with --momentum")
    momentum: float | None = option(None, within=Range(0.0, 1.0, high_open=True),
                                    help="SGD momentum, with --optimizer sgd only")
    weight_decay: float | None = option(None, within=Range(0.0, 10.0),
                                        help="weight decay, none on norm weights and biases")
    schedule: str | None = option(
        None, choices=SCHEDULE_CHOICES,
        help="LR after the warm-up: cosine = decay to 1%, step = divided by 10 at 50% and 75% "
             "of the steps, constant = held")
    warmup_epochs: float | None = option(None, within=Range(0.0, 100_000.0),
                                         help="linear LR warm-up")
    warmup_until_error: float | None = option(
        None, within=Range(0.0, 1.0, low_open=True),
        help="single-label: hold the LR at lr/10 until the running training error falls below "
             "this (at most 10% of the steps), as He et al. did for ResNet-110 (0.8)")
    label_smoothing: float | None = option(None, within=Range(0.0, 1.0, high_open=True),
                                           help="label smoothing of the single-label loss")
    balance: str = option(
        "auto", choices=BALANCE_CHOICES, identity=True,
        help="single-label class imbalance: loss = inverse-frequency class weights in the "
             "loss, sampler = draw every class equally often, none = neither, auto = sampler "
             f"when the largest class has over {IMBALANCE_RATIO:g}x the images of the "
             "smallest, else none")
    pad_crop: int | None = option(
        None, within=Range(0, 1024), metavar="PIXELS",
        help="instead of the random resized crop: pad the resized image by PIXELS of black on "
             "each side and take a random crop of --image-size; 0 turns it off")
    normalize: str | None = option(
        None, choices=NORMALIZE_CHOICES,
        help="input mean/std: imagenet, or dataset = measured on the training images and "
             "written to the card")
    accumulate: int = option(1, within=Range(1, 10_000),
                             help="micro-batches of --batch-size summed into one optimizer "
                                  "step (effective batch = batch size x this)")
    min_scale: float | None = option(None, within=Range(0.0, 1.0, low_open=True),
                                     help="RandomResizedCrop min area; 1 = no crop")
    hflip: bool | None = option(None, help="random horizontal flips")
    pos_weight: str | None = option(
        None, choices=POS_WEIGHT_CHOICES,
        help="multi-label BCE weight on each class's positives: balanced = negatives/positives "
             "(1..100), none = plain BCE")
    trivial_augment: float | None = option(None, within=Range(0.0, 1.0),
                                           help="share of images given TrivialAugmentWide")
    eval_resize_ratio: float | None = option(None, within=Range(1.0, 4.0),
                                             help="eval resize / crop")
    device: str = option("auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    workers: int = option(default_factory=default_workers, within=Range(0, 1024),
                          default_text="min(4, CPUs - 1)", help="DataLoader worker processes")
    seed: int = option(0, identity=True,
                       help="seed of the split, the initial weights and the augmentations")
    amp: bool = option(True, help=AMP_HELP)
    patience: int | None = option(None, within=Range(1, 100_000),
                                  help="stop after this many epochs without gain")
    unknown_acceptance: float = option(
        ACCEPTANCE, within=Range(0.5, 1.0),
        help="share of the validation images the unknown-input threshold accepts: lower "
             "flags more new classes and more of your own images (docs/training-recipe.md)")
    resume: Path | None = option(None, nargs="?", const=AUTO_RESUME, metavar="LAST_PT",
                                 help=f"continue from OUTPUT/{RESUME_FILE} (or the given file)")
    overwrite: bool = option(False,
                             help="replace the checkpoint already in --output (refused otherwise)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, within=Range(1, 2**40), identity=True,
                             help=MAX_PIXELS_HELP)
    decode_seconds: float = option(
        DEFAULT_DECODE_SECONDS, within=Range(0.01, 86_400.0),
        help="time budget for decoding one image; an image over it is skipped and counted")
    decode_memory_mb: int = option(
        DEFAULT_DECODE_MEMORY_MB, within=Range(64, 1_048_576),
        help="memory a DataLoader worker may use beyond its footprint at start, in MiB; an "
             "image that needs more is skipped and counted (needs --workers >= 1)")
    progress: bool = option(True, help="a progress bar per epoch on stderr")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resume is not None:
            self.resume = (self.output / RESUME_FILE if str(self.resume) == AUTO_RESUME
                           else Path(self.resume))
        problems = self._take_parent_defaults()
        problems += self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _take_parent_defaults(self) -> list[str]:
        """--arch and --image-size left out: the --weights checkpoint's (training.parent),
        else the defaults; the options that contradict that checkpoint."""
        parent = read_parent_card(self.weights)
        problems = option_problems(self, parent) if parent is not None else []
        if self.arch is None:
            self.arch = parent.arch if parent is not None else DEFAULT_ARCH
        if self.image_size is None:
            self.image_size = (parent.preprocessing.crop if parent is not None
                               else DEFAULT_IMAGE_SIZE)
        return problems

    def problems(self) -> list[str]:
        """What is wrong with these options (empty when they are usable)."""
        out = range_problems(self)
        if not out and self.freeze_epochs > self.epochs:
            out.append(f"--freeze-epochs ({self.freeze_epochs}) must not exceed --epochs "
                       f"({self.epochs})")
        if self.stem not in STEM_CHOICES:
            out.append(f"--stem must be one of {', '.join(STEM_CHOICES)}, got {self.stem!r}")
        out += self._arch_problems()
        if self.task not in TASK_CHOICES:
            out.append(f"--task must be single or multi, got {self.task!r}")
        if self.balance not in BALANCE_CHOICES:
            out.append(f"--balance must be one of {', '.join(BALANCE_CHOICES)}, "
                       f"got {self.balance!r}")
        elif self.balance not in ("none", "auto") and self.task in ("multi", "multi_label"):
            out.append(f"--balance {self.balance} applies to single-label data only, not to "
                       "--task multi")
        out += self._recipe_problems()
        if self.pos_weight not in (None, *POS_WEIGHT_CHOICES):
            out.append(f"--pos-weight must be one of {', '.join(POS_WEIGHT_CHOICES)}, "
                       f"got {self.pos_weight!r}")
        elif self.pos_weight is not None and self.task in ("single", "single_label"):
            out.append("--pos-weight applies to multi-label data only, not to --task single")
        if self.resume is not None and self.overwrite:
            out.append("--resume continues the run in --output and --overwrite replaces it: "
                       "pass one of them")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            out.append(f"--seed must be an integer >= 0, got {self.seed!r}")
        return out

    def _recipe_problems(self) -> list[str]:
        """Optimizer, schedule, normalisation and named-recipe values this run cannot take."""
        out = [f"{flag_of(self, name)} must be one of {', '.join(choices)}, got {value!r}"
               for name, choices in (("optimizer", OPTIMIZER_CHOICES),
                                     ("schedule", SCHEDULE_CHOICES),
                                     ("normalize", NORMALIZE_CHOICES),
                                     ("recipe_name", RECIPE_CHOICES))
               if (value := getattr(self, name)) is not None and value not in choices]
        if self.recipe_name == "he2016-cifar" and self.pretrained:
            out.append("--recipe he2016-cifar trains from scratch: pass --weights none, "
                       f"not {self.weights!r}")
        if self.pad_crop and self.min_scale not in (None, 1.0):
            out.append("--pad-crop replaces the random resized crop: --min-scale does not "
                       "apply with it")
        if self.momentum is not None and self.optimizer == "adamw":
            out.append("--momentum applies to --optimizer sgd, not adamw")
        if self.warmup_until_error is not None and self.task in ("multi", "multi_label"):
            out.append("--warmup-until-error needs a training error: single-label data only, "
                       "not --task multi")
        return out

    def _arch_problems(self) -> list[str]:
        """Options the architecture cannot take: weights where none exist, a foreign stem."""
        spec = ARCHITECTURES.get(self.arch)
        if spec is None:
            return [f"unknown --arch {self.arch!r}; known: {', '.join(ARCHITECTURES)}"]
        out = []
        if spec.imagenet is None and self.weights != "none" \
                and not names_checkpoint(self.weights):
            out.append(f"--arch {self.arch} has no pretrained weights (no ImageNet weights exist "
                       f"for it) and trains from scratch only: pass --weights none, "
                       f"not {self.weights!r}")
        if spec.own_stem and self.stem != "auto":
            out.append(f"--stem {self.stem} does not apply to --arch {self.arch}, which has its "
                       "own 3x3 stem for 32 px images: leave --stem auto")
        return out

    @property
    def pretrained(self) -> bool:
        """True when training starts from existing weights (fine-tuning)."""
        return self.weights != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# --help shows each recipe option's default as the table resolve reads describes it.
describe_defaults(TrainConfig, {name: default.describe()
                                for name, default in RECIPE_DEFAULTS.items()})


@dataclass
class EvaluateConfig:
    """Every option of `evaluate`."""

    checkpoint: Path = option(positional=True, help="checkpoint folder to evaluate")
    data: Path = option(positional=True,
                        help="labelled data: class-folder tree, or a CSV with image,labels")
    device: str = option("auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    batch_size: int = option(64, help="images per batch")
    workers: int = option(0, help="DataLoader worker processes")
    amp: bool = option(True, help=AMP_HELP)
    confusion_matrix: bool = option(False, help="include the confusion matrix in the JSON")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help=MAX_PIXELS_HELP)
    unknown: Path | None = option(
        None, metavar="OTHER_DATA",
        help="images unlike the training data (any folder layout): report the share of DATA "
             "accepted and of these rejected by the card's unknown-input rule, and the AUROC")

    def __post_init__(self) -> None:
        for name, value, low in (("--batch-size", self.batch_size, 1),
                                 ("--workers", self.workers, 0),
                                 ("--max-pixels", self.max_pixels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class SynthConfig:
    """Every option of `synth` (checked against the shapes there are by training.synthetic)."""

    out: Path = option(positional=True, help="folder to write the dataset into")
    task: str = option("single", choices=TASK_FLAGS,
                       help="class folders (single) or images/ + labels.csv (multi)")
    size: int = option(32, help="image side in pixels")
    per_class: int = option(200, help="images per class")
    classes: int | None = option(None, help="number of shape classes (max 6; default: all)")
    seed: int = option(0, help="seed of the generator")


@dataclass
class ImportConfig:
    """Every option of `import-torchvision`."""

    output: Path = option(help="checkpoint folder to write")
    arch: str = option("resnet50", choices=IMAGENET_ARCH_CHOICES,
                       help="which of torchvision's ImageNet classifiers")


@dataclass
class CifarImportConfig:
    """Every option of `import-cifar`."""

    src: Path = option(positional=True,
                       help="cifar-10-batches-bin or cifar-100-binary folder (the binary "
                            "version), or the folder holding it")
    out: Path = option(positional=True, help="folder to create, with train/ and test/ inside")
    labels: str = option("fine", choices=("fine", "coarse"),
                         help="CIFAR-100: the 100 fine classes or the 20 coarse superclasses")


@dataclass
class CompareConfig:
    """Every option of `compare`."""

    runs: list[Path] = option(positional=True, nargs="+", metavar="RUN_DIR",
                              help="folders written by `fit --output`")
    output: Path = option(help="folder to write the comparison into (created)")
    overwrite: bool = option(False, help="write into an --output that is not empty")

    def __post_init__(self) -> None:
        runs = [self.runs] if isinstance(self.runs, (str, Path)) else self.runs
        self.runs = [Path(run) for run in runs]
        self.output = Path(self.output)
        if not self.runs:
            raise ConfigError("compare needs at least one RUN_DIR")
