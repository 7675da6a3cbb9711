"""Named training recipes (`fit --recipe NAME`): option values that replace the defaults of
training.recipe for a run, while the options a user gives still win over them."""

from __future__ import annotations

from typing import Any

# Named recipes: their values replace the kind-of-run defaults; options given still win.
# he2016-cifar is section 4.2 of He et al., "Deep Residual Learning for Image Recognition":
# SGD (momentum 0.9, weight decay 1e-4), batch 128, LR 0.1 divided by 10 at 32k and 48k of
# 64k iterations (50% and 75% of whatever --epochs makes), 4 px padding, a random crop and a
# flip, the single original view for evaluation, no label smoothing and no other augmentation.
PRESETS: dict[str, dict[str, Any]] = {
    "he2016-cifar": {
        "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
        "lr": 0.1, "backbone_lr_scale": 1.0, "schedule": "step", "warmup_epochs": 0.0,
        "label_smoothing": 0.0, "pad_crop": 4, "min_scale": 1.0, "hflip": True,
        "trivial_augment": 0.0, "eval_resize_ratio": 1.0, "normalize": "dataset",
    },
}
# The paper's ResNet-110 starts at LR 0.01 "until the training error is below 80%".
HE2016_DEEP_ARCHS = ("resnet110", "resnet110b")
HE2016_WARMUP_ERROR = 0.8
