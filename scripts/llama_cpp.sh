#!/usr/bin/env bash
# Builds llama.cpp from the `llama-cpp-python` source archive's vendored tree (the registry has no
# llama.cpp release of its own) and prints the folder its programs are in:
#   llama-server    the OpenAI-compatible server (`lockstep verify --endpoint` is tested against it)
#   llama-bench     the speed comparison (scripts/bench_compare.py --llama-cpp)
#   llama-quantize  Q8_0 / Q4_K_M fixtures from llama.cpp's own quantizer
#   llama-cli       a plain run
# plus convert_hf_to_gguf.py and the gguf-py it needs, in the source folder beside them.
#
#     bash scripts/llama_cpp.sh            # build (once; ~10 min on 2 cores), print the bin folder
#     bash scripts/llama_cpp.sh --src      # print the source folder (convert_hf_to_gguf.py)
#     bash scripts/llama_cpp.sh --pythonpath   # the PYTHONPATH convert_hf_to_gguf.py needs with
#                                              # the reference venv's python (gguf-py, sentencepiece)
#
# Needs python3 and network access to the package registry; cmake comes from its PyPI wheel in a
# venv of its own. Everything goes under ${LOCKSTEP_CACHE:-~/.cache/lockstep}/llama.cpp-VERSION.
set -euo pipefail
VERSION=0.3.36
CMAKE_VERSION=4.4.4
ROOT=${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/llama.cpp-$VERSION
SRC=$ROOT/src
BIN=$ROOT/build/bin
TARGETS=(llama-server llama-bench llama-quantize llama-cli)
SENTENCEPIECE_VERSION=0.2.3

if [ "${1:-}" = "--src" ]; then
    echo "$SRC"
    exit 0
fi
if [ "${1:-}" = "--pythonpath" ]; then
    # What convert_hf_to_gguf.py needs beside the reference environment (torch, transformers,
    # numpy): the vendored gguf-py and sentencepiece, installed into a folder of their own.
    if [ ! -d "$ROOT/convert-deps/sentencepiece" ]; then
        python3 -m pip install --quiet --target "$ROOT/convert-deps" "sentencepiece==$SENTENCEPIECE_VERSION" >&2
    fi
    echo "$SRC/gguf-py:$ROOT/convert-deps"
    exit 0
fi

have_all() {
    for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}
if have_all; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$ROOT"
if [ ! -x "$ROOT/tools/bin/cmake" ]; then
    echo "==> cmake $CMAKE_VERSION (PyPI wheel) in $ROOT/tools" >&2
    python3 -m venv "$ROOT/tools"
    "$ROOT/tools/bin/pip" install --quiet "cmake==$CMAKE_VERSION" >&2
fi
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "==> llama-cpp-python $VERSION source archive" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$tmp" "llama-cpp-python==$VERSION" >&2
    tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    rm -rf "$SRC"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
fi
echo "==> building ${TARGETS[*]} (Release, native CPU, $(nproc) jobs)" >&2
"$ROOT/tools/bin/cmake" -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
"$ROOT/tools/bin/cmake" --build "$ROOT/build" -j "$(nproc)" --target "${TARGETS[@]}" >&2
have_all || { echo "llama.cpp build finished without every program in $BIN" >&2; exit 1; }
echo "$BIN"
