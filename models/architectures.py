"""Architectures: one entry per architecture, carrying its own facts.

Every other module asks the entry instead of knowing a name: how to build the network, which
ImageNet weights it fine-tunes from (and so their eval preprocessing), where its classifier
head and its stem are, which convolutions a batch norm follows, the eval resize ratio when no
weights publish one. Adding an architecture is one entry here plus its tests.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from models.cifar_resnet import factory as cifar_factory

logger = logging.getLogger(__name__)


class UnknownArchitectureError(ValueError):
    """The architecture name is not in the table."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded."""


# resize / crop at evaluation (torchvision's classic 256 -> 224) when the weights publish none
DEFAULT_EVAL_RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class ArchSpec:
    """One architecture's facts: its factory, its ImageNet weights, the names of its parts."""

    factory: Callable[..., nn.Module]
    imagenet: WeightsEnum | None = None  # None: no pretrained weights exist for it
    classifier: str = "fc"  # the head: a Linear from pooled features to the classes
    first_conv: str = "conv1"  # the stem's convolution (a small-image stem replaces it)
    stem_pool: str = "maxpool"  # the stem's pooling (a small-image stem removes it)
    conv_bn_prefixes: tuple[str, str] = ("conv", "bn")  # convN is followed by bnN in a block
    eval_resize_ratio: float = DEFAULT_EVAL_RESIZE_RATIO
    own_stem: bool = False  # built with its own stem for its input size: STEMS do not apply

    def head(self, model: nn.Module) -> nn.Linear:
        """The classifier layer of a model built from this entry."""
        return getattr(unwrap(model), self.classifier)

    def imagenet_weights(self) -> WeightsEnum:
        """torchvision's ImageNet weights entry (WeightsUnavailableError when there is none)."""
        if self.imagenet is None:
            raise WeightsUnavailableError(
                f"{self.factory.__name__} has no ImageNet weights: train it with --weights none")
        return self.imagenet

    def pretrained_resize_ratio(self, weights: str) -> float:
        """The eval resize/crop ratio to keep when fine-tuning from `weights`: the ImageNet
        weights' own, else this entry's default (a local weights file says nothing of it)."""
        if weights == "imagenet":
            transforms = self.imagenet_weights().transforms()
            return float(transforms.resize_size[0]) / float(transforms.crop_size[0])
        return self.eval_resize_ratio


# He et al. 2016's CIFAR ResNets (32 px, 6n + 2 layers): option A shortcuts (zero padding)
# as resnet20 ... resnet110, option B (1x1 projections) under a "b" suffix: resnet20b ...
CIFAR_DEPTHS = (20, 32, 44, 56, 110)

ARCHITECTURES: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": ArchSpec(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": ArchSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": ArchSpec(tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V2),
    "resnet152": ArchSpec(tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V2),
}
ARCHITECTURES.update({
    f"resnet{depth}{suffix}": ArchSpec(cifar_factory(depth, shortcut), eval_resize_ratio=1.0,
                                       own_stem=True)
    for depth in CIFAR_DEPTHS for shortcut, suffix in (("A", ""), ("B", "b"))
})


def arch_spec(arch: str) -> ArchSpec:
    """The spec for `arch`, or a clear error listing the known ones."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}"
        ) from None


def imagenet_weights(arch: str) -> WeightsEnum:
    """torchvision's ImageNet weights entry for `arch`."""
    return arch_spec(arch).imagenet_weights()


def imagenet_categories(arch: str) -> list[str]:
    """The 1000 ImageNet class names, from the weights' own metadata."""
    return list(imagenet_weights(arch).meta["categories"])


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision's weights API caches (or would cache) this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_imagenet_state_dict(arch: str, *, download: bool = True) -> dict[str, torch.Tensor]:
    """Load ImageNet weights through torchvision's weights API and its cache.

    Raises WeightsUnavailableError at once (no long network wait) when the file is not cached
    and cannot be fetched, with a message that says where to put it.
    """
    weights = imagenet_weights(arch)
    path = cached_weights_path(weights)
    if not path.is_file() and not download:
        raise WeightsUnavailableError(_missing_weights_message(arch, weights, path, None))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20.0)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not available"
        raise WeightsUnavailableError(
            _missing_weights_message(arch, weights, path, exc)) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _missing_weights_message(arch: str, weights: WeightsEnum, path: Path,
                             exc: Exception | None) -> str:
    reason = f" ({type(exc).__name__}: {exc})" if exc else ""
    return (
        f"ImageNet weights for {arch} ({weights}) are not cached and could not be "
        f"downloaded{reason}. Put {os.path.basename(weights.url)} (from {weights.url}) at "
        f"{path} (the directory follows $TORCH_HOME), or pass --weights none to train from "
        "scratch, or --weights /path/to/weights.pth|.safetensors for a local file."
    )


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local .safetensors or .pth state dict without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights file {path} does not hold a state dict")
    # Weights saved from a DistributedDataParallel wrapper carry its `module.` prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _imagenet_stem(model: nn.Module, spec: ArchSpec) -> None:
    """Keep torchvision's stem: 7x7 stride-2 conv + 3x3 stride-2 max-pool (input / 4)."""


def _small_stem(model: nn.Module, spec: ArchSpec) -> None:
    """3x3 stride-1 conv, no max-pool: layer1 sees the full input (for ~32 px images)."""
    _replace_stem(model, spec, stride=1)


def _small_stride2_stem(model: nn.Module, spec: ArchSpec) -> None:
    """3x3 stride-2 conv, no max-pool: layer1 sees input / 2 (for ~48-96 px images)."""
    _replace_stem(model, spec, stride=2)


def _replace_stem(model: nn.Module, spec: ArchSpec, *, stride: int) -> None:
    channels = getattr(model, spec.first_conv).out_channels
    setattr(model, spec.first_conv,
            nn.Conv2d(3, channels, 3, stride=stride, padding=1, bias=False))
    setattr(model, spec.stem_pool, nn.Identity())


OWN_STEM = "imagenet"  # the stem key that leaves a network's stem as built

# The stem decides how much the first layers downsample; the rest of the network is unchanged.
STEMS: dict[str, Callable[[nn.Module, ArchSpec], None]] = {
    "imagenet": _imagenet_stem,
    "small": _small_stem,
    "small_stride2": _small_stride2_stem,
}


def build(arch: str, *, num_classes: int, weights: str | Path | None = None,
          stem: str = "imagenet") -> nn.Module:
    """Build `arch` with a fresh `num_classes` head.

    `weights` is None/"none" (random init), "imagenet" (torchvision's weights), or a path to a
    local .pth/.safetensors state dict. Backbone weights are loaded strictly; the classifier is
    kept only when its shape already fits `num_classes`. `stem` is a key of STEMS; with a stem
    other than "imagenet", a pretrained first convolution (another shape) is left fresh.
    """
    spec = arch_spec(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
    if spec.own_stem and stem != OWN_STEM:
        raise ValueError(f"{arch} has its own stem; stem {stem!r} does not apply (build it "
                         f"with stem={OWN_STEM!r}, the stem left as built)")
    scratch = weights is None or str(weights) == "none"
    # From scratch, zero-initialised residual branches make each block start as the identity,
    # which trains faster and more stably in short runs (no effect on loaded weights).
    model = spec.factory(weights=None, num_classes=num_classes, zero_init_residual=scratch)
    STEMS[stem](model, spec)
    if scratch:
        return model
    if str(weights) == "imagenet":
        state = load_imagenet_state_dict(arch)
    else:
        state = load_weights_file(weights)
    _load_backbone(model, spec, state, source=str(weights))
    return model


def _load_backbone(model: nn.Module, spec: ArchSpec, state: dict[str, torch.Tensor], *,
                   source: str) -> None:
    own = model.state_dict()
    stem_weight, head_prefix = f"{spec.first_conv}.weight", f"{spec.classifier}."
    if stem_weight in state and own[stem_weight].shape != state[stem_weight].shape:
        state = {k: v for k, v in state.items() if k != stem_weight}  # a small-image stem
    head = {k: v for k, v in state.items() if k.startswith(head_prefix)}
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    head_fits = all(k in own and own[k].shape == v.shape for k, v in head.items()) and head
    try:
        missing, unexpected = model.load_state_dict(
            {**body, **(head if head_fits else {})}, strict=False)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"weights from {source} do not fit: {exc}") from exc
    missing = [k for k in missing if not k.startswith(head_prefix) and k != stem_weight]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights from {source} do not fit this architecture: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    logger.info("loaded backbone weights from %s (head %s)", source,
                "kept" if head_fits else "new")


def classifier_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """The parameters of the classification head (for head-only warm-up and higher LR)."""
    return list(arch_spec(arch).head(model).parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, without a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
