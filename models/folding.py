"""Batch norms folded into the convolutions before them, for inference."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)


def fold_batch_norms(model: nn.Module, probe: torch.Tensor, *,
                     conv_bn_prefixes: tuple[str, str]) -> nn.Module:
    """An inference copy of `model` with each BatchNorm folded into the convolution before it.

    Folds the pairs the architecture entry names (for a ResNet `convN` followed by `bnN` in
    one block: prefixes ("conv", "bn")), and a Conv2d followed by a BatchNorm2d in an
    nn.Sequential (the downsample branch). The result computes the same
    function with one op fewer per convolution; it is checked on `probe` (one input batch)
    and `model` itself is returned when the outputs differ or nothing could be folded.
    `model` is never changed.
    """
    folded = copy.deepcopy(model).eval()
    pairs = 0
    for parent in list(folded.modules()):
        children = dict(parent.named_children())
        for name, conv in children.items():
            bn_name = _batch_norm_after(parent, name, children, conv_bn_prefixes)
            if bn_name is None or not isinstance(conv, nn.Conv2d):
                continue
            bn = children[bn_name]
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
                continue
            setattr(parent, name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            pairs += 1
    if not pairs:
        return model
    was_training = model.training
    model.eval()
    probe = probe.to(next(model.parameters()).device)
    try:
        with torch.inference_mode():
            expected, got = model(probe), folded(probe)
    finally:
        model.train(was_training)
    tolerance = 1e-3 * max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or float((got - expected).abs().max()) > tolerance:
        logger.warning("folding batch norms changed the outputs of %s; running it unfolded",
                       type(model).__name__)
        return model
    return folded


def _batch_norm_after(parent: nn.Module, name: str, children: dict[str, nn.Module],
                      prefixes: tuple[str, str]) -> str | None:
    """The name of the BatchNorm that follows the convolution `name` in `parent`, if any."""
    if isinstance(parent, nn.Sequential) and name.isdigit():
        after = str(int(name) + 1)
        return after if after in children else None
    conv, bn = prefixes
    if name.startswith(conv) and f"{bn}{name[len(conv):]}" in children:
        return f"{bn}{name[len(conv):]}"
    return None
