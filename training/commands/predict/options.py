"""Every option of `predict` (one flag per field, as for the other commands)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.decoding import DEFAULT_MAX_PIXELS
from models.device import DEVICE_CHOICES
from training.commands.predict.rows import output_format
from training.config import AMP_HELP, DEVICE_HELP, default_workers
from training.data.images import DEFAULT_DECODE_MEMORY_MB, DEFAULT_DECODE_SECONDS
from training.exceptions import ConfigError
from training.options import Range, option, range_problems

MAX_TOP_K = 10_000  # as /predict: larger values are mistakes


@dataclass
class PredictConfig:
    """Every option of `predict`."""

    checkpoint: Path = option(positional=True, help="checkpoint folder to predict with")
    sources: list[Path] = option(
        positional=True, nargs="+", metavar="SOURCE",
        help="image folders (searched recursively), CSVs with an 'image' column, text files "
             "of paths (one a line), or image files; paths in a CSV or text file are relative "
             "to its folder")
    output: Path = option(help="file to write, JSON Lines (.jsonl) or CSV (.csv); when it "
                               "exists, the run continues after its last complete row")
    top_k: int = option(5, within=Range(1, MAX_TOP_K),
                        help="single-label: labels per image (clamped to the class count)")
    threshold: float | None = option(
        None, within=Range(0.0, 1.0),
        help="multi-label: one score cut-off for every label (default: the card's tuned "
             "per-class thresholds)")
    all_scores: bool = option(False, help="add every label's score to each row")
    reject_unknown: bool = option(False,
                                  help="give no labels to images flagged unknown (unlike the "
                                       "training data)")
    batch_size: int = option(64, within=Range(1, 65_536), help="images per batch")
    workers: int = option(default_factory=default_workers, within=Range(0, 1024),
                          help="decoding processes (default: min(4, CPUs - 1))")
    device: str = option("auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    amp: bool = option(True, help=AMP_HELP)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, within=Range(1, 2**40),
                             help="most pixels in one decoded image, as the server's "
                                  "--max-pixels; a larger image is an error row")
    decode_seconds: float = option(
        DEFAULT_DECODE_SECONDS, within=Range(0.01, 86_400.0),
        help="time budget for decoding one image; an image over it is an error row")
    decode_memory_mb: int = option(
        DEFAULT_DECODE_MEMORY_MB, within=Range(64, 1_048_576),
        help="memory a decoding process may use beyond its footprint at start, in MiB; an "
             "image that needs more is an error row (needs --workers >= 1)")
    progress: bool = option(True, help="a progress bar on stderr (images/s and time left)")

    def __post_init__(self) -> None:
        sources = [self.sources] if isinstance(self.sources, (str, Path)) else self.sources
        self.sources = [Path(s) for s in sources]
        self.checkpoint, self.output = Path(self.checkpoint), Path(self.output)
        problems = range_problems(self)
        if not self.sources:
            problems.append("predict needs at least one SOURCE")
        if problems:
            raise ConfigError("; ".join(problems))
        output_format(self.output)  # a suffix that names no format is refused before any work
