#!/usr/bin/env bash
# `lockstep verify --endpoint` against llama.cpp's own server (a benchmark-style check outside CI:
# it builds llama.cpp once, ~10 min, and the reference runs take minutes on the 0.5B shape).
#
#     bash scripts/endpoint_llama_cpp.sh [MODEL_DIR] [OUTTYPE]      # defaults: the 0.5B-shape fixture, f32
#
# Converts MODEL_DIR with llama.cpp's convert_hf_to_gguf.py (--outtype OUTTYPE), starts llama-server
# on 127.0.0.1 with its defaults (f16 KV cache, flash attention auto), and verifies it in the f32 and
# the bf16 tier. Reports go to reports/endpoint-llama-cpp-{f32,bf16}.{md,json}. Exit 0 when both ran
# (whatever the verdicts: llama.cpp's f16 KV cache is expected to fail the f32 tier), non-zero when
# something could not run.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-fixtures/models/qwen2.5-0.5b-random}
OUTTYPE=${2:-f32}
PORT=${PORT:-8790}
BIN=$(bash scripts/llama_cpp.sh)
SRC=$(bash scripts/llama_cpp.sh --src)
PP=$(bash scripts/llama_cpp.sh --pythonpath)
CACHE=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/gguf
mkdir -p "$CACHE" reports
GGUF=$CACHE/$(basename "$MODEL")-$OUTTYPE.gguf
if [ ! -f "$GGUF" ]; then
    echo "==> converting $MODEL to $GGUF (convert_hf_to_gguf.py --outtype $OUTTYPE)"
    PYTHONPATH=$PP .venv/bin/python "$SRC/convert_hf_to_gguf.py" "$MODEL" --outtype "$OUTTYPE" \
        --outfile "$GGUF.partial" > /dev/null
    mv "$GGUF.partial" "$GGUF"
fi
[ -x target/release/lockstep ] || cargo build --release -p lockstep-cli
echo "==> llama-server on 127.0.0.1:$PORT"
"$BIN/llama-server" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -t "$(nproc)" > reports/llama-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { echo "llama-server exited: see reports/llama-server.log" >&2; exit 1; }
    sleep 1
done
for dtype in f32 bf16; do
    echo "==> lockstep verify --endpoint, $dtype tier"
    set +e
    target/release/lockstep verify --endpoint "http://127.0.0.1:$PORT/v1" --model "$MODEL" --dtype "$dtype" \
        --report "reports/endpoint-llama-cpp-$dtype.md" --json "reports/endpoint-llama-cpp-$dtype.json"
    rc=$?
    set -e
    [ $rc -le 1 ] || { echo "verify could not run ($rc)" >&2; exit $rc; }
done
