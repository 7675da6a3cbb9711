#!/usr/bin/env bash
# The from-scratch recipe sweep behind docs/training-recipe.md, most informative runs first.
#   bash bench/recipe_sweep.sh [/tmp/recipe-data]     (needs scikit-learn for the digits set)
set -euo pipefail
ROOT=${1:-/tmp/recipe-data}
PY=${PY:-.venv/bin/python}
[ -d "$ROOT/digits" ] || "$PY" -m bench.recipe_sweep build "$ROOT"
sweep() { "$PY" -m bench.recipe_sweep run "$@"; }

for d in textures digits; do
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label baseline
done
for d in textures digits; do
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label stem-imagenet -- --stem imagenet
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label min-scale-0.35 -- --min-scale 0.35
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label lr-5e-3 -- --lr 5e-3
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label batch-64 -- --batch-size 64
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label stem-small -- --stem small
done
for d in textures digits; do
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label ta-0.5 -- --trivial-augment 0.5
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label lr-1e-3 -- --lr 1e-3
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label smoothing-0 -- --label-smoothing 0
  sweep "$ROOT/$d" --arch resnet18 --epochs 5 --label batch-16 -- --batch-size 16
done
for d in textures digits; do
  sweep "$ROOT/$d" --arch resnet34 --epochs 5 --label baseline
  sweep "$ROOT/$d" --arch resnet18 --epochs 10 --label baseline
  sweep "$ROOT/$d" --arch resnet18 --epochs 10 --label ta-1.0 -- --trivial-augment 1.0
  sweep "$ROOT/$d" --arch resnet50 --epochs 5 --label baseline
done
