"""Class activation maps: where in the crop a GAP + linear classifier found its class.

A ResNet ends in global average pooling of its last stage's feature map A [K, h, w] and one
linear layer (weights W [C, K], bias b [C]). Both are linear, so the logit of class c splits
exactly into one share per location of the map:

    CAM_c(x, y) = (sum_k W[c, k] * A_k(x, y) + b_c) / (h * w),   sum over (x, y) = logit_c

No gradient and no approximation: the map comes from the same forward pass that gives the
logits (`ClassActivationModel` runs the body up to the pooling, keeps the feature map, pools
it and applies the head itself). The more common way of writing it, sum_k W A + b / (hw),
differs from this one by a scale and an offset only, which the [0, 1] normalisation of the
heatmap removes; this one is kept because its sum IS the logit, which the tests check.

The explainer shares the predictor's own network (batch norms folded, already on the
device), so explaining costs no second copy of the weights.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.card import ModelCard
from models.device import Accelerator
from models.outputs import probabilities
from models.preprocessing import Normalize

logger = logging.getLogger(__name__)

LOGIT_TOLERANCE = 1e-3  # how far the pooled map's logits may differ from the model's own


class CamUnsupportedError(ValueError):
    """The model does not end in global average pooling and one linear layer."""


class ClassActivationModel(nn.Module):
    """A GAP + linear classifier answering (logits [N, C], last-stage map [N, K, h, w]).

    The body is the model's children before its AdaptiveAvgPool2d, run in order (as a
    torchvision ResNet's forward does); the head is the model's child `head_name`. The
    layers are shared with the wrapped model, which is not changed.
    """

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        children = list(model.named_children())
        pool_at = next((i for i, (_, child) in enumerate(children)
                        if isinstance(child, nn.AdaptiveAvgPool2d)), None)
        head = getattr(model, head_name, None)
        if pool_at is None or not isinstance(head, nn.Linear):
            raise CamUnsupportedError(f"{type(model).__name__} has no global average pooling "
                                      f"followed by a Linear {head_name!r}")
        self.body = nn.Sequential(OrderedDict(children[:pool_at]))
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.body(x)
        return self.head(maps.mean(dim=(2, 3))), maps


def class_maps(maps: torch.Tensor, head: nn.Linear, classes: torch.Tensor) -> torch.Tensor:
    """[N, K, h, w] feature maps, a head, [N] class indices -> [N, h, w] float32 maps, each
    location's share of the image's logit of its class (they sum to that logit)."""
    weights = head.weight.float()[classes]  # [N, K]
    bias = (head.bias.float()[classes] if head.bias is not None
            else torch.zeros(len(classes), device=maps.device))
    area = maps.shape[2] * maps.shape[3]
    shares = torch.einsum("nk,nkhw->nhw", weights, maps.float()) + bias[:, None, None]
    return shares / area


@dataclass(frozen=True)
class Explanation:
    """One image's explained class, its served score and its raw map (float32 [h, w], CPU)."""

    class_index: int
    score: float
    cam: torch.Tensor


ExplainItem = tuple[torch.Tensor, int | None]  # a uint8 [3, H, W] crop, a class (None: top)


class Explainer:
    """Runs batches of crops through a GAP + linear network and answers their maps."""

    def __init__(self, network: nn.Module, card: ModelCard, accelerator: Accelerator, *,
                 head_name: str) -> None:
        """`network` takes normalised [N, 3, H, W] input on `accelerator`'s device and
        answers the card's logits (the predictor's own); checked here on one probe."""
        self.card = card
        self.accelerator = accelerator
        self.model = ClassActivationModel(network, head_name).eval()
        device = next(network.parameters()).device
        self.normalize = Normalize(card.preprocessing).to(device)
        self._check(network, device)

    @torch.inference_mode()
    def _check(self, network: nn.Module, device: torch.device) -> None:
        crop = self.card.preprocessing.crop
        probe = torch.randn((1, 3, crop, crop), generator=torch.Generator().manual_seed(0))
        probe = probe.to(device)
        expected = network(probe).float()
        logits, _ = self.model(probe)
        worst = float((logits.float() - expected).abs().max())
        if logits.shape != expected.shape or worst > LOGIT_TOLERANCE * max(
                1.0, float(expected.abs().max())):
            raise CamUnsupportedError("pooling the last stage's map does not give the "
                                      f"model's logits (off by {worst:.3g})")

    @torch.inference_mode()
    def run_batch(self, items: Sequence[ExplainItem]) -> list[Explanation]:
        """The batch function: (crop, class or None) pairs -> one Explanation per pair."""
        crops = torch.stack([crop for crop, _ in items])
        x = self.normalize(self.accelerator.to_device(crops))
        if self.accelerator.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.accelerator.autocast():
            logits, maps = self.model(x)
        logits = logits.float()
        top = logits.argmax(dim=1)
        asked = torch.tensor([-1 if c is None else c for _, c in items], device=logits.device)
        chosen = torch.where(asked >= 0, asked, top)
        cams = class_maps(maps, self.model.head, chosen).cpu()
        scores = probabilities(logits, self.card.task, self.card.temperature)
        picked = scores.gather(1, chosen[:, None]).squeeze(1).cpu().tolist()
        return [Explanation(int(c), float(s), cam)
                for c, s, cam in zip(chosen.cpu().tolist(), picked, cams, strict=True)]
