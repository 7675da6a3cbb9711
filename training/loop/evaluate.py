"""Temperature scaling of a validation pass: fit on its logits, rescore, record ECE."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from models.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from models.outputs import probabilities
from training.loop import EvalOutput

logger = logging.getLogger(__name__)

CARD_FIELDS = ("temperature", "ece_before", "ece_after", "bins")


@dataclass
class CalibratedOutput(EvalOutput):
    """A validation pass whose `scores` are the calibrated probabilities (what the checkpoint
    will serve); `calibration` holds the temperature, ECE before/after and diagram data."""

    calibration: dict[str, Any] = field(default_factory=dict)


def calibrate(validation: EvalOutput, task: str, *, bins: int = ECE_BINS) -> CalibratedOutput:
    """Fit the temperature on `validation.logits` and rescore with it."""
    if validation.logits is None:
        raise ValueError("calibration needs the validation logits")
    targets = validation.targets.astype(int) if task == "single_label" else validation.targets
    temperature = fit_temperature(validation.logits, targets, task)
    logits = torch.as_tensor(validation.logits, dtype=torch.float32)
    before = probabilities(logits, task).numpy()
    after = probabilities(logits, task, temperature).numpy()
    record = {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, targets, task, bins=bins),
        "ece_after": expected_calibration_error(after, targets, task, bins=bins),
        "bins": bins,
        "reliability_before": reliability(before, targets, task, bins=bins),
        "reliability_after": reliability(after, targets, task, bins=bins),
    }
    logger.info("calibration: temperature %s, ECE %.4f -> %.4f", _shown(temperature),
                record["ece_before"], record["ece_after"])
    kept = {f.name: getattr(validation, f.name) for f in fields(EvalOutput)}
    return CalibratedOutput(**{**kept, "scores": after}, calibration=record)


def card_calibration(record: dict[str, Any]) -> dict[str, Any]:
    """The card's `calibration` field: the temperature, ECE before/after and the bin count."""
    return {k: record[k] for k in CARD_FIELDS}


def _shown(temperature: float | list[float]) -> str:
    if isinstance(temperature, list):
        return "[" + ", ".join(f"{t:.3g}" for t in temperature) + "]"
    return f"{temperature:.3g}"
