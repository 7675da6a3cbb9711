"""The CIFAR ResNets of He et al. 2016 (section 4.2): 6n + 2 layers for 32x32 inputs.

A 3x3 convolution with 16 filters, then three stages of n basic blocks (two 3x3 convolutions
each) on maps of 32, 16 and 8 px with 16, 32 and 64 filters, the first block of the second
and third stage subsampling by stride 2; global average pooling and one linear layer.

Shortcuts are identities. Where a stage doubles the channels, option A subsamples the input
and pads the new channels with zeros (no parameters: the paper's CIFAR models); option B
projects with a 1x1 stride-2 convolution and a batch norm.

The parts carry torchvision's ResNet names (conv1/bn1 stem, layerN stages, convN/bnN in a
block, avgpool, fc), and the forward pass runs the children in order, so the architecture
entry, batch-norm folding, class activation maps and the unknown-input rule treat these
networks like any other ResNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

STAGE_WIDTHS = (16, 32, 64)
SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A: the input subsampled by `stride`, with zero channels appended up to `out`."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norms, added to the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = (PadShortcut(out_channels, stride) if shortcut == "A" else
                             nn.Sequential(nn.Conv2d(in_channels, out_channels, 1,
                                                     stride=stride, bias=False),
                                           nn.BatchNorm2d(out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """A 6n + 2 layer ResNet for 32x32 images (`blocks` = n per stage)."""

    def __init__(self, blocks: int, *, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        channels = STAGE_WIDTHS[0]
        for index, width in enumerate(STAGE_WIDTHS, start=1):
            stage = []
            for block in range(blocks):
                stride = 2 if block == 0 and index > 1 else 1
                stage.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation (normal, fan_out) of the convolutions; batch norms 1 and 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, shortcut: str = "A", *, weights: object = None,
                 num_classes: int = 10, zero_init_residual: bool = False) -> CifarResNet:
    """The factory an architecture entry calls, with torchvision's keywords.

    `weights` must be None (no pretrained weights exist); `zero_init_residual` is accepted
    and not used: these networks keep the paper's initialisation.
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"a CIFAR ResNet has 6n + 2 layers, got depth {depth}")
    if weights is not None:
        raise ValueError(f"resnet{depth} has no pretrained weights")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut)


def factory(depth: int, shortcut: str = "A") -> Callable[..., CifarResNet]:
    """`cifar_resnet` for one depth and shortcut, named like its entry (resnet20, resnet20b)."""

    def make(*, weights: object = None, num_classes: int = 10,
             zero_init_residual: bool = False) -> CifarResNet:
        return cifar_resnet(depth, shortcut, weights=weights, num_classes=num_classes,
                            zero_init_residual=zero_init_residual)

    make.__name__ = make.__qualname__ = f"resnet{depth}" + ("b" if shortcut == "B" else "")
    return make
