#!/usr/bin/env bash
# A 7B-shape quantized GGUF made by llama.cpp's own tools, and lockstep's `generate` on it (a
# measurement outside CI: ~35 GB of disk while it converts, ~20 min on 2 cores).
#
#     bash scripts/gguf_7b.sh [TYPE...]      # default: Q4_K_M
#
# 1. the random model of the exact Qwen2.5-7B config (`make-7b`, bf16 shards, 15.2 GB) in
#    fixtures/big/qwen2.5-7b-random, unless it is there;
# 2. llama.cpp's convert_hf_to_gguf.py --outtype bf16 (lossless from bf16 shards), then
#    llama-quantize to each TYPE; the bf16 GGUF is deleted afterwards (the files stay in
#    ${LOCKSTEP_CACHE:-~/.cache/lockstep}/gguf);
# 3. per TYPE: `lockstep generate` (16 prompt tokens, 32 new, greedy, EOS ignored) under
#    /usr/bin/time -v (peak RSS of the process, the file size beside it), then llama-bench on the
#    same file (`-p 16 -n 32`, 2 threads) for its decode speed in the same minutes.
# Prints one summary line per TYPE; the full outputs go to reports/gguf-7b/.
set -euo pipefail
cd "$(dirname "$0")/.."
TYPES=("$@")
[ ${#TYPES[@]} -gt 0 ] || TYPES=(Q4_K_M)
MODEL=fixtures/big/qwen2.5-7b-random
BIN=$(bash scripts/llama_cpp.sh)
SRC=$(bash scripts/llama_cpp.sh --src)
PP=$(bash scripts/llama_cpp.sh --pythonpath)
CACHE=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/gguf
OUT=reports/gguf-7b
mkdir -p "$CACHE" "$OUT"
[ -x target/release/lockstep ] || cargo build --release -p lockstep-cli
BF16=$CACHE/qwen2.5-7b-random-bf16.gguf
need_bf16=0
for t in "${TYPES[@]}"; do [ -f "$CACHE/qwen2.5-7b-random-$t.gguf" ] || need_bf16=1; done
if [ $need_bf16 = 1 ]; then
    if [ ! -f "$MODEL/lockstep-fixture.json" ]; then
        echo "==> make-7b into $MODEL"
        (cd reference && ../.venv/bin/python -m lockstep_reference make-7b --out "../$MODEL")
    fi
    if [ ! -f "$BF16" ]; then
        echo "==> convert_hf_to_gguf.py --outtype bf16 -> $BF16"
        PYTHONPATH=$PP .venv/bin/python "$SRC/convert_hf_to_gguf.py" "$MODEL" --outtype bf16 \
            --outfile "$BF16.partial" > "$OUT/convert.log" 2>&1
        mv "$BF16.partial" "$BF16"
    fi
    for t in "${TYPES[@]}"; do
        f=$CACHE/qwen2.5-7b-random-$t.gguf
        [ -f "$f" ] && continue
        echo "==> llama-quantize $t -> $f"
        LD_LIBRARY_PATH=$BIN "$BIN/llama-quantize" "$BF16" "$f.partial" "$t" "$(nproc)" > "$OUT/quantize-$t.log" 2>&1
        mv "$f.partial" "$f"
    done
    rm -f "$BF16"
fi
TOKENS=$(seq -s, 1000 1015)
for t in "${TYPES[@]}"; do
    f=$CACHE/qwen2.5-7b-random-$t.gguf
    echo "==> lockstep generate on $f"
    /usr/bin/time -v target/release/lockstep generate --model "$f" --tokens "$TOKENS" --max-new-tokens 32 \
        --ignore-eos --json > "$OUT/generate-$t.out" 2> "$OUT/generate-$t.err"
    rss_kib=$(awk -F': ' '/Maximum resident set size/{print $2}' "$OUT/generate-$t.err")
    echo "==> llama-bench on $f"
    LD_LIBRARY_PATH=$BIN "$BIN/llama-bench" -m "$f" -p 16 -n 32 -t "$(nproc)" -r 3 -o json > "$OUT/llama-bench-$t.json" 2> /dev/null
    .venv/bin/python - "$f" "$rss_kib" "$OUT/generate-$t.out" "$OUT/llama-bench-$t.json" <<'EOF'
import json, os, sys
path, rss_kib, gen, bench = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
g = json.loads(open(gen).read().strip().splitlines()[-1])
b = json.load(open(bench))
tg = [r["avg_ts"] for r in b if r.get("n_gen", 0) > 0]
size = os.path.getsize(path)
print(f"{os.path.basename(path)}: file {size / 2**30:.2f} GiB, lockstep generate peak RSS {rss_kib / 2**20:.2f} GiB "
      f"({rss_kib * 1024 / size:.2f}x the file), decode {g['decode_tok_s']:.2f} tok/s, prefill {g['prefill_tok_s']:.2f} tok/s; "
      f"llama.cpp decode {tg[0]:.2f} tok/s (lockstep {g['decode_tok_s'] / tg[0]:.2f}x)")
EOF
done
