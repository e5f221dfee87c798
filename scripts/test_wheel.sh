#!/usr/bin/env bash
# Builds the lockstep wheel (pyproject.toml: maturin's bin bindings) with the pinned maturin and
# checks it the way a porter with only Python uses it: in a fresh venv, with no Rust toolchain on
# PATH and outside the repository,
#   - `pip install` of the wheel gives the `lockstep` command and the trace writer
#     (lockstep_reference, the wheel's own copy);
#   - the JAX example port writes its trace with that writer, `lockstep verify --port-trace` passes
#     it, and fails it with a porting mistake at the right tensor;
#   - `lockstep.verify_port` returns the same verdict, status and first divergence as the CLI;
#   - the binary finds the reference on its own: the venv's python, where torch and transformers
#     are importable (no LOCKSTEP_PYTHON).
# The fresh venv sees torch, transformers, jax, numpy and safetensors of the reference environment
# (.venv) through a .pth file instead of downloading them again; nothing else of .venv (its
# editable lockstep_reference is not picked up: .pth files of an added folder are not processed).
# Needs the reference environment and fixtures (scripts/setup.sh). Takes a few minutes: the wheel
# build is a release build of the CLI (incremental on top of target/release).
# Usage: bash scripts/test_wheel.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=${1:-$(mktemp -d /tmp/lockstep-wheel.XXXXXX)}
mkdir -p "$W"
W=$(cd "$W" && pwd)
PY=${PYTHON:-python3}
MODEL=$ROOT/fixtures/models/qwen2-gqa
t0=$(date +%s)

echo "==> building the wheel in $W/dist"
[ -x "$W/build/bin/maturin" ] || { "$PY" -m venv "$W/build" && "$W/build/bin/pip" install --quiet -r reference/requirements-wheel.txt; }
rm -rf "$W/dist"
"$W/build/bin/maturin" build --release --quiet --out "$W/dist"
WHEEL=$(ls "$W"/dist/lockstep-*.whl)
t1=$(date +%s)

echo "==> installing $(basename "$WHEEL") into a fresh venv"
rm -rf "$W/venv"
"$PY" -m venv "$W/venv"
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
VSITE=$("$W/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$SITE" > "$VSITE/lockstep-test-reference-env.pth"
"$W/venv/bin/pip" install --quiet --no-index "$WHEEL"

# Everything below: no cargo/rustc on PATH, no LOCKSTEP_PYTHON, outside the repository.
clean() { env -i HOME="$HOME" PATH="$W/venv/bin:/usr/bin:/bin" LOCKSTEP_CACHE="$W/cache" "$@"; }
cd "$W"
if clean bash -c 'command -v cargo || command -v rustc'; then
    echo "FAIL: a Rust toolchain is on the test PATH" >&2
    exit 1
fi
clean python - <<'EOF'
import lockstep, lockstep_reference, os, shutil, sys
venv = os.path.realpath(os.path.join(os.environ["PATH"].split(":")[0], ".."))
for mod in (lockstep, lockstep_reference):
    assert os.path.realpath(mod.__file__).startswith(venv), f"{mod.__name__} from {mod.__file__}, not the wheel"
assert str(lockstep.binary()).startswith(venv), lockstep.binary()
assert shutil.which("lockstep").startswith(venv)
from lockstep_reference.writer import TraceWriter  # the writer porters import
print("wheel: lockstep and lockstep_reference from", venv)
EOF

echo "==> the JAX example port writes its traces with the wheel's writer"
clean python "$ROOT/examples/jax_qwen2/port.py" --model "$MODEL" --tokens 5,17,300,2 --dtype f32 --out "$W/port.safetensors"
clean python "$ROOT/examples/jax_qwen2/port.py" --model "$MODEL" --tokens 5,17,300,2 --dtype f32 --mistake no-qkv-bias --out "$W/mistake.safetensors"

check() {  # check NAME TRACE EXPECTED_RC EXPECTED_FIRST_DIVERGENCE
    local name=$1 trace=$2 want_rc=$3 want_first=$4 rc=0
    echo "==> lockstep verify --port-trace ($name)"
    clean lockstep verify --model "$MODEL" --port-trace "$trace" \
        --report "$W/$name.md" --json "$W/$name.json" --plot "$W/$name.svg" --html "$W/$name.html" \
        > "$W/$name.out" 2> "$W/$name.err" || rc=$?
    tail -1 "$W/$name.out"
    if [ "$rc" != "$want_rc" ]; then
        echo "FAIL: the CLI exited $rc, expected $want_rc" >&2
        cat "$W/$name.out" "$W/$name.err" >&2
        exit 1
    fi
    clean python - "$MODEL" "$trace" "$W/$name.json" "$rc" "$want_first" <<'EOF'
import json, sys
import lockstep
model, trace, cli_json, rc, want_first = sys.argv[1:]
cli = json.load(open(cli_json))
r = lockstep.verify_port(model, [trace], dtype="f32")
assert r.passed == (rc == "0") == cli["passed"], (r.passed, rc, cli["passed"])
assert r.returncode == int(rc), r.returncode
assert r.status == cli["status"], (r.status, cli["status"])
first = r.first_divergence.tensor if r.first_divergence else "none"
assert first == (cli["first_divergence"] or "none") == want_first, (first, cli["first_divergence"], want_first)
assert [p.name for p in r.phases] == [p["name"] for p in cli["phases"]]
assert [p.status for p in r.phases] == [p["status"] for p in cli["phases"]]
layers = {row.layer for row in r.per_layer}
n = json.load(open(f"{model}/config.json"))["num_hidden_layers"]
assert layers == set(range(n)), layers
print(f"verify_port: {r.verdict} ({r.status}), first divergence {first}, {len(r.phases)} phases, "
      f"{len(r.per_layer)} per-layer rows: same as the CLI")
EOF
}
check careful "$W/port.safetensors" 0 none
check mistake "$W/mistake.safetensors" 1 layers.0.q

echo "==> a python without torch gets a clear one-line error"
rm -f "$VSITE/lockstep-test-reference-env.pth"
rc=0
clean lockstep verify --model "$MODEL" --port-trace "$W/port.safetensors" --report "$W/x.md" \
    --json "$W/x.json" --plot "$W/x.svg" --html "$W/x.html" > /dev/null 2> "$W/notorch.err" || rc=$?
cat "$W/notorch.err"
[ "$rc" = 2 ] && grep -q "lacks torch, transformers" "$W/notorch.err" || { echo "FAIL: exit $rc" >&2; exit 1; }
t2=$(date +%s)
echo "wheel OK: build $((t1 - t0)) s, checks $((t2 - t1)) s"
