"""Tests of the trace writer (lockstep_reference.writer): arrays from numpy, JAX and torch, name,
shape and metadata errors, and a roundtrip read by `lockstep compare`.

Run: .venv/bin/python reference/tests/test_writer.py   (pytest also collects the test_* functions)
Ends with the line "N passed, M failed". The roundtrip tests run the lockstep binary: $LOCKSTEP_BIN,
else target/release/lockstep (cargo build --release).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
REPO = os.path.dirname(os.path.dirname(HERE))
MODEL = os.path.join(REPO, "fixtures", "models", "qwen2-gqa")  # H 128, 4/2 heads, D 32, I 256, V 2048

from lockstep_reference import numpy_oracle  # noqa: E402
from lockstep_reference.st_io import model_fingerprint  # noqa: E402
from lockstep_reference.writer import TraceWriter, TraceWriterError, trace_names  # noqa: E402

IDS = [5, 17, 300, 2]
TMP = tempfile.mkdtemp(prefix="lockstep-writer-")


def _lockstep() -> str:
    exe = os.environ.get("LOCKSTEP_BIN") or os.path.join(REPO, "target", "release", "lockstep")
    assert os.path.exists(exe), f"{exe} missing: cargo build --release -p lockstep-cli (or set LOCKSTEP_BIN)"
    return exe


def _raises(fn, *fragments) -> str:
    try:
        fn()
    except TraceWriterError as e:
        msg = str(e)
        for frag in fragments:
            assert frag in msg, f"{frag!r} not in error: {msg}"
        assert "\n" not in msg, f"error is not one line: {msg}"
        return msg
    raise AssertionError(f"no TraceWriterError (expected one mentioning {fragments})")


def _oracle() -> dict[str, np.ndarray]:
    if not hasattr(_oracle, "cache"):
        _oracle.cache = numpy_oracle.oracle_trace(MODEL, IDS)
    return _oracle.cache


def _full_writer(arrays: dict[str, np.ndarray]) -> TraceWriter:
    w = TraceWriter(MODEL)
    for name in trace_names(w.num_layers):
        if name != "tokens":
            w.tap(name, arrays[name])
    return w


def _compare(ref: str, test: str, *extra: str) -> tuple[int, dict, str]:
    js = os.path.join(TMP, "cmp.json")
    o = subprocess.run([_lockstep(), "compare", ref, test, "--json", js, *extra], capture_output=True, text=True)
    report = {}
    if os.path.exists(js):
        with open(js) as f:
            report = json.load(f)
        os.remove(js)
    return o.returncode, report, o.stdout + o.stderr


# -- roundtrips ---------------------------------------------------------------------------------


def test_roundtrip_numpy_f64_read_by_lockstep_compare():
    """The numpy f64 oracle written through the writer passes against lockstep's own f64 trace at
    1e-9, and a changed tensor is named as the first divergence."""
    ref = os.path.join(TMP, "lockstep-f64.safetensors")
    subprocess.run([_lockstep(), "trace", "--model", MODEL, "--tokens", ",".join(map(str, IDS)),
                    "--dtype", "f64", "--out", ref], check=True, capture_output=True)
    arrays = _oracle()
    out = os.path.join(TMP, "writer-f64.safetensors")
    _full_writer(arrays).save(out, {"producer": "numpy-oracle", "dtype": "f64", "token_ids": IDS})
    rc, js, text = _compare(ref, out)
    assert rc == 0 and js["first_divergence"] is None, text

    changed = dict(arrays)
    changed["layers.1.k"] = arrays["layers.1.k"].copy()
    changed["layers.1.k"][0, 1, 2, 3] += 1e-6
    out2 = os.path.join(TMP, "writer-f64-changed.safetensors")
    _full_writer(changed).save(out2, {"producer": "numpy-oracle", "dtype": "f64", "token_ids": IDS})
    rc, js, text = _compare(ref, out2)
    assert rc == 1 and js["first_divergence"] == "layers.1.k", text


def test_metadata_written():
    out = os.path.join(TMP, "meta.safetensors")
    w = TraceWriter(MODEL)
    w.tap("logits", _oracle()["logits"])
    w.save(out, {"producer": "p", "dtype": "f64", "token_ids": json.dumps(IDS), "prompt": "hi", "n": 3})
    from safetensors import safe_open

    with safe_open(out, "np") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["logits", "tokens"]
        assert f.get_tensor("tokens").dtype == np.int64 and f.get_tensor("tokens").tolist() == [IDS]
        assert f.get_tensor("logits").dtype == np.float64
    assert json.loads(meta["token_ids"]) == IDS
    assert meta["producer"] == "p" and meta["dtype"] == "f64" and meta["prompt"] == "hi" and meta["n"] == "3"
    assert meta["num_layers"] == "2" and meta["model_type"] == "qwen2"
    assert meta["model_fingerprint"] == model_fingerprint(MODEL)
    assert json.loads(meta["config"])["hidden_size"] == 128


def test_same_content_as_tracer_write_safetensors():
    """The writer's file holds what the PyTorch tracer's writer would write for the same tensors."""
    import torch
    from lockstep_reference.tracer import write_safetensors
    from safetensors import safe_open

    arrays = _oracle()
    ours = os.path.join(TMP, "ours.safetensors")
    theirs = os.path.join(TMP, "theirs.safetensors")
    w = _full_writer(arrays)
    w.save(ours, {"producer": "x", "dtype": "f64", "token_ids": IDS})
    with safe_open(ours, "np") as f:
        meta = f.metadata()
    write_safetensors(theirs, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in w.tensors.items()}, meta)
    with safe_open(ours, "np") as a, safe_open(theirs, "np") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k
    rc, js, text = _compare(theirs, ours)
    assert rc == 0, text


def test_jax_and_torch_arrays_bf16_stored_exactly():
    import jax
    import jax.numpy as jnp
    import torch
    from safetensors import safe_open

    arrays = _oracle()
    emb = arrays["embed"].astype(np.float32)
    w = TraceWriter(MODEL)
    w.tap("embed", jnp.asarray(emb).astype(jnp.bfloat16))
    t = torch.from_numpy(arrays["final_norm"].astype(np.float32)).to(torch.bfloat16).requires_grad_(True)
    w.tap("final_norm", t * 1)  # a non-leaf tensor that requires grad
    w.tap("logits", jnp.asarray(arrays["logits"].astype(np.float32)))
    with pytest_raises_jit():
        jax.jit(lambda x: w.tap("layers.0.input_norm", x) or x)(jnp.asarray(emb))
    out = os.path.join(TMP, "bf16.safetensors")
    w.save(out, {"producer": "jax", "dtype": "bf16", "token_ids": IDS})
    with safe_open(out, "np") as f:
        e = f.get_tensor("embed")
        assert e.dtype == np.float32
        assert np.array_equal(e, np.asarray(jnp.asarray(emb).astype(jnp.bfloat16).astype(jnp.float32)))
        fn = f.get_tensor("final_norm")
        assert np.array_equal(fn, t.detach().float().numpy())
        assert f.get_tensor("logits").dtype == np.float32


class pytest_raises_jit:
    """Context: the JAX tracer inside jit must be refused with a clear message."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        assert typ is not None, "tap inside jax.jit was accepted"
        assert "JAX tracer" in str(exc), str(exc)
        return True


def test_weight_checksums_of_numpy_jax_and_torch_arrays():
    """`weights=` records each parameter's dtype, shape and the sha256 of its little-endian C-order
    values in the dtype it is held in; the same values from numpy, JAX and torch hash alike."""
    import hashlib

    import jax.numpy as jnp
    import ml_dtypes
    import torch
    from lockstep_reference.writer import weight_checksums
    from safetensors import safe_open

    a = np.array([[0.1, 2.5], [3.0, 4.0]], dtype=np.float32)
    sums = weight_checksums({
        "np": a, "np64": a.astype(np.float64), "np_bf16": a.astype(ml_dtypes.bfloat16),
        "jax_bf16": jnp.asarray(a).astype(jnp.bfloat16), "torch_bf16": torch.from_numpy(a).to(torch.bfloat16),
        "torch_t": torch.from_numpy(a).t(),  # a transposed view: hashed in C order of its own shape
    })
    assert sums["np"] == {"dtype": "F32", "shape": [2, 2], "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    assert sums["np64"]["dtype"] == "F64"
    assert sums["np64"]["sha256"] == hashlib.sha256(a.astype("<f8").tobytes()).hexdigest()
    assert sums["np_bf16"] == sums["jax_bf16"] == sums["torch_bf16"] and sums["np_bf16"]["dtype"] == "BF16"
    assert sums["torch_t"]["sha256"] == hashlib.sha256(np.ascontiguousarray(a.T).tobytes()).hexdigest()
    # The same literals the Rust side's unit test checks (port_weights.rs).
    assert sums["np_bf16"]["sha256"] == "4af4d0d32f5dd7e2d4faaf481d8a744c6b32f88635b13e80e56c5fd5485d1ccd"
    assert sums["np64"]["sha256"] == "ca246287678378ced09c02be67de4cc7c1517d6a301a3825f0350aa9a2684972"

    out = os.path.join(TMP, "weights.safetensors")
    w = TraceWriter(MODEL)
    w.tap("logits", _oracle()["logits"])
    w.save(out, {"producer": "p", "dtype": "f64", "token_ids": IDS}, weights={"np": a})
    with safe_open(out, "np") as f:
        assert json.loads(f.metadata()["weights_sha256"]) == {"np": sums["np"]}
    _raises(lambda: weight_checksums({"ids": np.arange(3)}), "weight ids is int64")
    _raises(lambda: w.save(out, {"producer": "p", "dtype": "f64", "token_ids": IDS}, weights={}),
            "weights is empty")


# -- errors -------------------------------------------------------------------------------------


def test_unknown_names():
    w = TraceWriter(MODEL)
    x = np.zeros((1, 4, 128))
    _raises(lambda: w.tap("layers.0.qq", x), "unknown trace name 'layers.0.qq'", "layer tensors are")
    _raises(lambda: w.tap("layers.2.q", x), "'layers.2.q'", "2 layers: 0..1")
    _raises(lambda: w.tap("logit", x), "unknown trace name 'logit'", "final_norm, logits")
    _raises(lambda: w.tap("model.layers.0.mlp", x), "unknown trace name")


def test_wrong_shapes():
    w = TraceWriter(MODEL)
    _raises(lambda: w.tap("layers.0.q", np.zeros((1, 2, 4, 32))), "layers.0.q has shape [1, 2, 4, 32]",
            "expected [1, 4, T, 32]", "heads=4")
    _raises(lambda: w.tap("embed", np.zeros((4, 128))), "batch dimension is missing")
    _raises(lambda: w.tap("embed", np.zeros((2, 4, 128))), "batch 1")
    _raises(lambda: w.tap("layers.0.attn_probs", np.zeros((1, 4, 4, 5))), "expected [1, 4, T, T]")
    w.tap("embed", np.zeros((1, 4, 128)))  # fixes T = 4
    _raises(lambda: w.tap("layers.0.k", np.zeros((1, 2, 5, 32))), "expected [1, 2, 4, 32]", "T = 4 tokens")
    _raises(lambda: w.tap("logits", np.zeros((1, 4, 2047))), "V=2048")
    _raises(lambda: w.tap("layers.0.mlp_act", np.zeros((1, 4, 128))), "expected [1, 4, 256]")
    _raises(lambda: w.tap("tokens", np.array([[1, 2, 3]])), "tokens has shape [1, 3]")
    _raises(lambda: w.tap("tokens", np.array([1, 2, 3, 4.0])), "integer ids")
    _raises(lambda: w.tap("tokens", np.array([1, 2, 3, 9999])), "[0, 2048)")
    _raises(lambda: w.tap("final_norm", np.zeros((1, 4, 128), dtype=np.int32)), "floating point")
    _raises(lambda: w.tap("embed", np.zeros((1, 4, 128))), "tapped twice")


def test_missing_or_bad_metadata():
    def writer():
        w = TraceWriter(MODEL)
        w.tap("logits", np.zeros((1, 4, 2048)))
        return w

    out = os.path.join(TMP, "never.safetensors")
    _raises(lambda: writer().save(out, {"dtype": "f64", "token_ids": IDS}), "'producer'")
    _raises(lambda: writer().save(out, {"producer": "p", "token_ids": IDS}), "'dtype'")
    _raises(lambda: writer().save(out, {"producer": "p", "dtype": "fp16", "token_ids": IDS}),
            "f64, f32, bf16", "'fp16'")
    _raises(lambda: writer().save(out, {"producer": "p", "dtype": "f64"}), "'token_ids'")
    _raises(lambda: writer().save(out, {"producer": "p", "dtype": "f64", "token_ids": "1,2"}), "JSON array")
    _raises(lambda: writer().save(out, {"producer": "p", "dtype": "f64", "token_ids": [1, 2, 3]}),
            "tokens has shape [1, 3]")

    def mismatch():
        w = writer()
        w.tap("tokens", np.array([[5, 17, 300, 3]]))
        w.save(out, {"producer": "p", "dtype": "f64", "token_ids": IDS})

    _raises(mismatch, "differ from the tapped tokens")
    _raises(lambda: writer().save(out, {"producer": "p", "dtype": "f32", "token_ids": IDS}),
            "logits was computed in float64", "dtype is f32")

    def f32_claims_f64():
        w = TraceWriter(MODEL)
        w.tap("logits", np.zeros((1, 4, 2048), dtype=np.float32))
        w.save(out, {"producer": "p", "dtype": "f64", "token_ids": IDS})

    _raises(f32_claims_f64, "float32", "jax_enable_x64")

    def only_tokens():
        TraceWriter(MODEL).save(out, {"producer": "p", "dtype": "f64", "token_ids": IDS})

    _raises(only_tokens, "nothing to save")
    assert not os.path.exists(out)


def test_config_forms_and_errors():
    with open(os.path.join(MODEL, "config.json")) as f:
        cfg = json.load(f)
    for c in (MODEL, os.path.join(MODEL, "config.json"), cfg):
        w = TraceWriter(c)
        assert (w.hidden, w.heads, w.kv_heads, w.head_dim, w.intermediate, w.vocab, w.num_layers) == \
            (128, 4, 2, 32, 256, 2048, 2)
    _raises(lambda: TraceWriter(os.path.join(TMP, "nowhere")), "no model config")
    _raises(lambda: TraceWriter({"hidden_size": 8}), "no 'num_attention_heads'")


if __name__ == "__main__":
    tests = [(k, v) for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
