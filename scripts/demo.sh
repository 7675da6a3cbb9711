#!/usr/bin/env bash
# From a fresh clone to a served model: venv, synthetic data, a short CPU fine-tune, the
# server, and real requests. Re-running reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${DEMO_PORT:-8000}"
DATA="${DEMO_DATA:-data/demo}"
CKPT_ROOT="${DEMO_CHECKPOINTS:-checkpoints}"
NAME="${DEMO_MODEL:-demo}"
RUN_DIR=".demo"
PY=".venv/bin/python"
URL="http://127.0.0.1:${PORT}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "1/5 environment (.venv)"
make --no-print-directory setup

step "2/5 dataset ($DATA)"
if [ -f "$DATA/.complete" ]; then
  echo "reusing $DATA"
else
  "$PY" -m training synth "$DATA" --task single --classes 4 --per-class 300 --size 32
  touch "$DATA/.complete"
fi

step "3/5 model ($CKPT_ROOT/$NAME)"
if [ -f "$CKPT_ROOT/$NAME/card.json" ]; then
  echo "reusing $CKPT_ROOT/$NAME (delete it to train again)"
else
  if "$PY" -c "import sys; from models.architectures import cached_weights_path, imagenet_weights; sys.exit(0 if cached_weights_path(imagenet_weights('resnet34')).is_file() else 1)"; then
    echo "ImageNet weights for resnet34 are cached: fine-tuning from them"
    WEIGHTS=(--weights imagenet --image-size 64 --epochs 3)
  else
    echo "ImageNet weights are not cached (offline): training resnet34 from scratch instead"
    WEIGHTS=(--weights none --image-size 32 --epochs 6)
  fi
  "$PY" -m training fit "$DATA" --arch resnet34 "${WEIGHTS[@]}" --device cpu --workers 0 \
    --output "$CKPT_ROOT/$NAME"
fi

step "4/5 server on $URL"
mkdir -p "$RUN_DIR"
if [ -f "$RUN_DIR/server.pid" ] && kill -0 "$(cat "$RUN_DIR/server.pid")" 2>/dev/null; then
  echo "stopping the previous demo server (pid $(cat "$RUN_DIR/server.pid")) to pick up any new model"
  kill "$(cat "$RUN_DIR/server.pid")" && sleep 2
fi
nohup "$PY" -m app --checkpoint-dir "$CKPT_ROOT" --host 127.0.0.1 --port "$PORT" \
  >"$RUN_DIR/server.log" 2>&1 &
echo $! >"$RUN_DIR/server.pid"
printf 'waiting for /ready '
for _ in $(seq 1 120); do
  if curl -fsS "$URL/ready" >/dev/null 2>&1; then echo " ok"; break; fi
  if ! kill -0 "$(cat "$RUN_DIR/server.pid")" 2>/dev/null; then
    echo; echo "the server exited; its log:"; tail -n 30 "$RUN_DIR/server.log"; exit 1
  fi
  printf '.'; sleep 1
done
curl -fsS "$URL/ready" >/dev/null || { echo "not ready after 120 s; see $RUN_DIR/server.log"; exit 1; }

step "5/5 requests"
mapfile -t IMAGES < <(find "$DATA" -type f -name '*.png' | sort | awk 'NR % 311 == 1' | head -n 3)
run() { echo "\$ $*"; "$@"; echo; }
run curl -s "$URL/health"
run curl -s -F "file=@${IMAGES[0]}" "$URL/predict?top_k=3"
run curl -s -F "file=@${IMAGES[1]}" -F "file=@${IMAGES[2]}" "$URL/predict?model=$NAME&top_k=1"
run curl -s --data-binary "@${IMAGES[0]}" -H "Content-Type: image/png" "$URL/predict?top_k=1"
run curl -s "$URL/models/$NAME"
echo
echo "The server is still running at $URL (pid $(cat "$RUN_DIR/server.pid"), log $RUN_DIR/server.log)."
echo "Stop it with: kill \$(cat $RUN_DIR/server.pid)    (or: make stop)"
