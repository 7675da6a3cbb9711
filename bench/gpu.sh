#!/usr/bin/env bash
# One command for a GPU window: set up, then `python -m bench.gpu` within 8 minutes in all.
#   bench/gpu.sh                        # the full run on CUDA; report in bench/results/gpu-<date>/
#   bench/gpu.sh --dry-run              # toy sizes on the CPU, in seconds (the test suite runs it)
#   bench/gpu.sh --steps model,compile  # some steps only (any flag of python -m bench.gpu)
#   bench/gpu.sh --pack DIR             # on a machine with a network: what a GPU host without
#                                       # one needs (wheels, wrk); there, PACK=DIR bench/gpu.sh
# Python: $PY, else .venv/bin/python, else python3 (a GPU image's own torch). Packages the run
# needs that it lacks are installed into .venv-gpu (over that Python's packages, its torch
# kept) from $PACK when given, else from the network; wrk from $PACK/bin when there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
WINDOW_S="${WINDOW_S:-480}"
# module:package, for every module the run imports beside torch and torchvision
NEEDED="fastapi:fastapi uvicorn:uvicorn multipart:python-multipart
pydantic_settings:pydantic-settings fastapi_offline:fastapi-offline
prometheus_client:prometheus-client safetensors:safetensors httpx:httpx skimage:scikit-image
pytest:pytest pytest_asyncio:pytest-asyncio litserve:litserve pynvml:nvidia-ml-py"
# the wheels --pack fetches, with their dependencies: the above less what a GPU image
# with PyTorch already carries (scikit-image with its scipy and numpy is 60 MB of wheels)
DOWNLOAD="fastapi fastapi-offline uvicorn python-multipart pydantic-settings litserve
pytest-asyncio nvidia-ml-py typing-extensions"

if [ "${1:-}" = "--pack" ]; then
  DIR="${2:?usage: bench/gpu.sh --pack DIR}"
  # for the GPU host's Python (TARGET_PY, default 3.12) on x86-64 Linux; torch is not among them
  # shellcheck disable=SC2086
  python3 -m pip download --dest "$DIR" --only-binary=:all: \
    --python-version "${TARGET_PY:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $DOWNLOAD
  if WRK="$(command -v wrk)"; then  # and the load generator, with the LuaJIT it links
    mkdir -p "$DIR/bin" "$DIR/lib"
    cp "$WRK" "$DIR/bin/"
    ldd "$WRK" | grep -o '/[^ ]*libluajit[^ ]*' | xargs -r -I{} cp -L {} "$DIR/lib/"
  else
    echo "no wrk here (apt-get install wrk): the GPU host will load with httpx" >&2
  fi
  du -sh "$DIR"
  exit 0
fi

lacking() {  # the packages of $NEEDED whose module Python $1 cannot import
  # shellcheck disable=SC2086
  "$1" -c 'import importlib.util as u, sys
print(" ".join(p for m, p in (a.split(":") for a in sys.argv[1:]) if u.find_spec(m) is None))
' $NEEDED
}

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DRY=0
for arg in "$@"; do if [ "$arg" = "--dry-run" ]; then DRY=1; fi; done
LACKING="$(lacking "$PY")"
CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [ -n "$LACKING" ] && [ "$DRY" = "0" ] && [ "$CUDA" = "1" ]; then  # else bench.gpu says why
  echo "set-up: $PY lacks $LACKING; installing into .venv-gpu" >&2
  if [ ! -x .venv-gpu/bin/python ]; then "$PY" -m venv --system-site-packages .venv-gpu; fi
  FROM=()
  if [ -n "${PACK:-}" ]; then FROM=(--no-index --find-links "$PACK"); fi
  # shellcheck disable=SC2086
  if ! .venv-gpu/bin/python -m pip install --quiet "${FROM[@]}" $LACKING; then
    for package in $LACKING; do  # one at a time: what can be installed is
      .venv-gpu/bin/python -m pip install --quiet "${FROM[@]}" "$package" \
        || echo "set-up: $package did not install" >&2
    done
  fi
  PY=.venv-gpu/bin/python
  LACKING="$(lacking "$PY")"
fi
if [ -n "$LACKING" ]; then echo "$PY lacks $LACKING: the parts that need them say so" >&2; fi

if [ -n "${PACK:-}" ] && [ -x "$PACK/bin/wrk" ] && ! command -v wrk >/dev/null; then
  PACK_DIR="$(cd "$PACK" && pwd)"
  if LD_LIBRARY_PATH="$PACK_DIR/lib" "$PACK_DIR/bin/wrk" -v 2>/dev/null | grep -q '^wrk'; then
    export PATH="$PACK_DIR/bin:$PATH" LD_LIBRARY_PATH="$PACK_DIR/lib:${LD_LIBRARY_PATH:-}"
  fi
fi

SPENT=$(( $(date +%s) - START ))
echo "set-up took ${SPENT} s; $PY -m bench.gpu $*" >&2
BUDGET=()
if [ "$DRY" = "0" ]; then BUDGET=(--budget-s "$(( WINDOW_S - SPENT ))"); fi
exec "$PY" -m bench.gpu "${BUDGET[@]}" "$@"
