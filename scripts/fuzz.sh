#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS each (default 15) from its committed seed corpus.
# Needs a nightly toolchain; cargo-fuzz is not needed (this passes the flags it would). New
# corpus entries go to a scratch folder, so the committed corpus stays as make_corpus.py wrote it.
# A crash stops the script with the input saved under fuzz/artifacts/<target>/.
# The mutation sequence starts from FUZZ_SEED (default 1), so a run is reproducible: CI's short
# run is a prefix of a longer run with the same seed on the same code. Pass another seed (or 0 for
# a random one) for new ground in long runs by hand.
#   [FUZZ_SEED=N] bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-15}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors_checkpoint gguf_header config_json tokenizer_json chat_template trace_read)
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros (as cargo-fuzz does).
triple=$(rustc +nightly -vV | sed -n "s/^host: //p")
cargo +nightly build --release --target "$triple" --target-dir target/sancov --bins
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
total=0
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  echo "==> fuzz $t (${secs}s)"
  status=0
  "target/sancov/$triple/release/$t" "$scratch/$t" "corpus/$t" -max_total_time="$secs" \
    -rss_limit_mb=2048 -timeout=30 -seed="${FUZZ_SEED:-1}" -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || status=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY)" "$scratch/$t.log" || true
  if [ "$status" -ne 0 ] || ls "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
    tail -n 30 "$scratch/$t.log"
    echo "fuzz $t failed (exit $status): $(ls "artifacts/$t")"
    exit 1
  fi
  execs=$(sed -n "s/^stat::number_of_executed_units: *//p" "$scratch/$t.log")
  if [ -z "$execs" ] || [ "$execs" -eq 0 ]; then
    tail -n 30 "$scratch/$t.log"
    echo "fuzz $t ran no input"
    exit 1
  fi
  total=$((total + execs))
done
echo "==> fuzzing: ${#targets[@]} targets, $total executions, no crash"
