#!/usr/bin/env bash
# The from-scratch recipe sweep behind docs/training-recipe.md (one row per line there).
#   bash bench/recipe_sweep.sh [/tmp/recipe-data]     (needs scikit-learn for the digits set)
set -euo pipefail
ROOT=${1:-/tmp/recipe-data}
PY=${PY:-.venv/bin/python}
[ -d "$ROOT/digits" ] || "$PY" -m bench.recipe_sweep build "$ROOT"
sweep() { "$PY" -m bench.recipe_sweep run "$@"; }

T=$ROOT/textures D=$ROOT/digits
sweep "$T" --arch resnet18 --epochs 5 --label baseline
sweep "$T" --arch resnet18 --epochs 5 --label stem-small -- --stem small
sweep "$T" --arch resnet18 --epochs 5 --label stem-imagenet -- --stem imagenet
sweep "$T" --arch resnet18 --epochs 5 --label min-scale-0.35 -- --min-scale 0.35
sweep "$T" --arch resnet18 --epochs 5 --label lr-5e-3 -- --lr 5e-3
sweep "$T" --arch resnet18 --epochs 5 --label batch-64 -- --batch-size 64
sweep "$T" --arch resnet18 --epochs 5 --label ta-0.5 -- --trivial-augment 0.5
sweep "$T" --arch resnet18 --epochs 5 --label smoothing-0 -- --label-smoothing 0
sweep "$T" --arch resnet18 --epochs 10 --label baseline
sweep "$T" --arch resnet18 --epochs 10 --label ta-1.0 -- --trivial-augment 1.0
sweep "$T" --arch resnet34 --epochs 5 --label baseline
sweep "$T" --arch resnet50 --epochs 5 --label baseline
sweep "$D" --arch resnet18 --epochs 5 --label baseline
sweep "$D" --arch resnet18 --epochs 5 --label stem-small -- --stem small
sweep "$D" --arch resnet18 --epochs 5 --label stem-imagenet -- --stem imagenet
sweep "$D" --arch resnet18 --epochs 5 --label min-scale-0.35 -- --min-scale 0.35
sweep "$ROOT/shapes" --arch resnet18 --epochs 5 --label baseline
