#!/usr/bin/env bash
# The old report replayed: the JAX example on the old report's prompts ("Hello", "The", "123") in bf16
# against PyTorch bf16 (judged against the pure-f64 oracle), once as written and once per classic
# porting mistake, and what `lockstep verify --port-trace` says about each. The same runs in the f32
# and f64 tiers show what the old report's setup could not see.
#
#   bash examples/jax_qwen2/replay_old_report.sh [MODEL]      (default: fixtures/models/qwen2-default)
#
# REPLAY_EXTRA_PROMPT="some text" adds one prompt to the three (e.g. a 16-token sentence: several
# mistakes change nothing on a single token, where attention and RoPE are trivial).
#
# Needs the reference environment with JAX (bash scripts/setup.sh). Writes traces and reports under
# $REPLAY_DIR (default target/jax-replay). About five CPU-minutes (20 min wall on 2 busy cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-fixtures/models/qwen2-default}
OUT=${REPLAY_DIR:-target/jax-replay}
PY=${LOCKSTEP_PYTHON:-.venv/bin/python}
export LOCKSTEP_PYTHON=$PY
# Reuse JAX's compiled kernels across the runs (the port runs op by op, like PyTorch eager).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
if [ -z "${LOCKSTEP:-}" ]; then
    cargo build --release -q -p lockstep-cli
    LOCKSTEP=target/release/lockstep
fi
mkdir -p "$OUT"

# The bf16 tier's oracle must run on the very weights bf16 uses: a bf16-stored copy of the model.
BF16_MODEL="$OUT/$(basename "$MODEL")-bf16"
if [ ! -f "$BF16_MODEL/model.safetensors" ] || [ "$MODEL/config.json" -nt "$BF16_MODEL/model.safetensors" ]; then
    echo "==> bf16-stored copy of $MODEL in $BF16_MODEL"
    "$PY" examples/jax_qwen2/to_bf16.py "$MODEL" "$BF16_MODEL" >/dev/null
fi

jsons=()
for dtype in bf16 f32 f64; do
    model=$MODEL
    [ "$dtype" = bf16 ] && model=$BF16_MODEL
    echo "==> JAX port in $dtype on \"Hello\", \"The\", \"123\": as written and with each mistake"
    rm -f "$OUT/$dtype"-*.safetensors
    extra=()
    [ -n "${REPLAY_EXTRA_PROMPT:-}" ] && extra=(--extra-prompt "$REPLAY_EXTRA_PROMPT")
    mapfile -t traces < <("$PY" examples/jax_qwen2/replay.py traces --model "$model" --dtype "$dtype" --out-dir "$OUT" "${extra[@]}")
    echo "==> lockstep verify --model $model --port-trace (${#traces[@]} traces)"
    set +e
    "$LOCKSTEP" verify --model "$model" --port-trace "${traces[@]}" \
        --report "$OUT/verify-$dtype.md" --json "$OUT/verify-$dtype.json" --plot "$OUT/verify-$dtype.svg" \
        >/dev/null 2>"$OUT/verify-$dtype.log"
    rc=$?
    set -e
    if [ "$rc" -gt 1 ]; then
        cat "$OUT/verify-$dtype.log" >&2
        exit "$rc"
    fi
    jsons+=("$OUT/verify-$dtype.json")
done

echo
echo "What lockstep says (first diverging tensor; reports in $OUT/verify-{bf16,f32,f64}.md):"
echo
"$PY" examples/jax_qwen2/replay.py summary "${jsons[@]}"
