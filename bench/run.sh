#!/usr/bin/env bash
# The whole benchmark in one go: raw ceiling, the service, LitServe and a naive FastAPI
# endpoint, for each architecture, under the same allocator and thread settings; then the front
# end alone (bench.frontend: a stand-in model, the service against LitServe). Loopback only.
#   bench/run.sh                       # resnet34 and resnet50, CPU (or CUDA when present)
#   ARCHS=resnet50 CONC=1,16,32 SECONDS_PER_LEVEL=5 bench/run.sh
#   WORKERS=2 FRONTEND=0 bench/run.sh  # the service with 2 worker processes; no front-end part
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
ARCHS="${ARCHS:-resnet34 resnet50}"
CONC="${CONC:-1,4,16,32,64}"
IMAGES="${IMAGES:-1,8}"
PEER_IMAGES="${PEER_IMAGES:-1}"
SECS="${SECONDS_PER_LEVEL:-10}"
DEVICE="${DEVICE:-auto}"
WORKERS="${WORKERS:-0}"  # the service's --workers (0: its automatic choice, 1 on a CPU)
BACKEND="${BACKEND:-torch}"  # onnxruntime: the service and the ceiling on ONNX Runtime (peers stay on torch)
PORT="${PORT:-8190}"
OUT="bench/results/$(date -u +%Y-%m-%dT%H%M)"
mkdir -p "$OUT"

# the fast allocator, for every process of the run (service, peers and raw alike)
if [ -z "${LD_PRELOAD:-}" ]; then
  TCMALLOC="$(ldconfig -p | grep -o '/[^ ]*libtcmalloc_minimal\.so\.4' | head -n 1 || true)"
  if [ -n "$TCMALLOC" ]; then export LD_PRELOAD="$TCMALLOC"; else
    echo "tcmalloc not found (apt-get install libtcmalloc-minimal4): using glibc malloc" >&2
  fi
fi
echo "results in $OUT (LD_PRELOAD=${LD_PRELOAD:-none})" >&2

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    pkill -TERM -P "$SERVER_PID" 2>/dev/null || true  # LitServe's worker processes too
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    pkill -KILL -P "$SERVER_PID" 2>/dev/null || true
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
  PORT=$((PORT + 1))  # a fresh port for the next server: worker processes may hold the old one a moment
}
trap stop_server EXIT

wait_for() {  # url, seconds
  for _ in $(seq 1 "$2"); do
    if "$PY" -c "import httpx,sys; sys.exit(httpx.get('$1', timeout=2).status_code != 200)" 2>/dev/null; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server died" >&2; return 1; fi
    sleep 1
  done
  echo "timed out waiting for $1" >&2; return 1
}

run_peer() {  # name, title, extra flags: start a peer on the same checkpoint and load it
  local name="$1" title="$2"; shift 2
  echo "== $ARCH: $title" >&2
  "$PY" -m bench.peers "$name" --checkpoint "$CKPT" --port "$PORT" --device "$DEVICE" "$@" \
    >"$OUT/$name-$ARCH.log" 2>&1 &
  SERVER_PID=$!
  wait_for "http://127.0.0.1:$PORT/health" 300
  "$PY" -m bench.load --url "http://127.0.0.1:$PORT" --concurrency "$CONC" \
    --images "$PEER_IMAGES" --seconds "$SECS" --server-pid "$SERVER_PID" >"$OUT/load-$name-$ARCH.json"
  stop_server
}

for ARCH in $ARCHS; do
  ROOT="bench/results/checkpoints/$ARCH"
  CKPT="$("$PY" -c "from bench.common import benchmark_checkpoint; print(benchmark_checkpoint('$ARCH', '$ROOT'))")"
  echo "== $ARCH: raw ceiling" >&2
  "$PY" -m bench.raw --checkpoint "$CKPT" --device "$DEVICE" --backend "$BACKEND" --seconds "$SECS" >"$OUT/raw-$ARCH.json"
  BEST="$("$PY" -c "import json; print(json.load(open('$OUT/raw-$ARCH.json'))['best_batch'])")"

  echo "== $ARCH: service (max batch $BEST)" >&2
  "$PY" -m app --checkpoint-dir "$ROOT" --port "$PORT" --device "$DEVICE" --backend "$BACKEND" \
    --workers "$WORKERS" \
    --max-batch-size "$BEST" --max-queue 1024 --max-images-per-request 64 \
    --log-level warning >"$OUT/service-$ARCH.log" 2>&1 &
  SERVER_PID=$!
  wait_for "http://127.0.0.1:$PORT/ready" 300
  "$PY" -m bench.load --url "http://127.0.0.1:$PORT" --concurrency "$CONC" --images "$IMAGES" \
    --seconds "$SECS" --server-pid "$SERVER_PID" >"$OUT/load-service-$ARCH.json"
  stop_server

  run_peer litserve "LitServe (batch ${LITSERVE_BATCH:-16}, ${LITSERVE_WAIT:-0.01} s wait)" \
    --max-batch-size "${LITSERVE_BATCH:-16}" --batch-timeout "${LITSERVE_WAIT:-0.01}"
  run_peer naive "naive FastAPI"
done

if [ "${FRONTEND:-1}" = "0" ]; then
  echo "FRONTEND=0: skipping the front-end benchmark" >&2
elif command -v wrk >/dev/null 2>&1; then
  echo "== front end: the service and LitServe with a stand-in model, loaded by wrk" >&2
  "$PY" -m bench.frontend --seconds "$SECS" --workers "${FRONTEND_WORKERS:-1,2}" \
    --out-dir "$OUT/frontend" >"$OUT/frontend.json"
else
  echo "wrk not found (apt-get install wrk): skipping the front-end benchmark" >&2
fi

"$PY" -m bench.report "$OUT"
