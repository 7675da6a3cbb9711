#!/usr/bin/env bash
# One command for a GPU window: set up, then `python -m bench.gpu` within 8 minutes in all.
#   bench/gpu.sh                        # the full run on CUDA; report in bench/results/gpu-<date>/
#   bench/gpu.sh --dry-run              # toy sizes on the CPU, in seconds (the test suite runs it)
#   bench/gpu.sh --steps model,compile  # some steps only (any flag of python -m bench.gpu)
#   bench/gpu.sh --download-wheels DIR  # on a machine with a network: the wheels a GPU host
#                                       # without one needs beside its own torch (then WHEELS=DIR)
# Python: $PY, else .venv/bin/python, else python3 (a GPU image's own torch). Modules the
# run needs that it lacks are installed into .venv-gpu (over that Python's packages, its torch
# kept) from $WHEELS when given, else from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
WINDOW_S="${WINDOW_S:-480}"
NEEDED="fastapi uvicorn multipart pydantic_settings fastapi_offline prometheus_client safetensors httpx skimage pytest pytest_asyncio litserve"
PACKAGES="fastapi fastapi-offline uvicorn h11 python-multipart pydantic pydantic-settings prometheus-client safetensors httpx scikit-image pytest pytest-asyncio litserve nvidia-ml-py"

if [ "${1:-}" = "--download-wheels" ]; then
  DIR="${2:?usage: bench/gpu.sh --download-wheels DIR}"
  # for the GPU host's Python (TARGET_PY, default 3.12) on x86-64 Linux; torch is not among them
  python3 -m pip download --dest "$DIR" --only-binary=:all: \
    --python-version "${TARGET_PY:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $PACKAGES
  du -sh "$DIR"
  exit 0
fi

missing() {  # the modules of $NEEDED that $1 cannot import
  "$1" - $NEEDED <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
LACKING="$(missing "$PY")"
if [ -n "$LACKING" ] && [ "$DRY" = "0" ]; then
  echo "set-up: $PY lacks: $LACKING" >&2
  if [ ! -x .venv-gpu/bin/python ]; then "$PY" -m venv --system-site-packages .venv-gpu; fi
  if [ -n "${WHEELS:-}" ]; then
    .venv-gpu/bin/python -m pip install --quiet --no-index --find-links "$WHEELS" $PACKAGES
  else
    .venv-gpu/bin/python -m pip install --quiet $PACKAGES
  fi
  PY=.venv-gpu/bin/python
  LACKING="$(missing "$PY")"
  [ -z "$LACKING" ] || echo "set-up: still lacking $LACKING (those parts report it)" >&2
fi
if [ "$DRY" = "1" ] && [ -n "$LACKING" ]; then
  echo "dry run: $PY lacks $LACKING (those parts report it)" >&2
fi

SPENT=$(( $(date +%s) - START ))
echo "set-up took ${SPENT} s; ${PY} -m bench.gpu $*" >&2
BUDGET=()
if [ "$DRY" = "0" ]; then BUDGET=(--budget-s "$(( WINDOW_S - SPENT ))"); fi
exec "$PY" -m bench.gpu "${BUDGET[@]}" "$@"
