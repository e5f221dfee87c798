"""Self-checks of the reference side (needs `bash scripts/fixtures.sh` first, the 0.5B-shape model
included; a missing fixture fails the check that needs it).

Run: .venv/bin/python reference/tests/check_reference.py   (pytest also collects the test_* functions)
Ends with the line "N passed, M failed".
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
ROOT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "fixtures")

from lockstep_reference import numpy_oracle, tracer  # noqa: E402
from lockstep_reference.st_io import model_fingerprint  # noqa: E402
from lockstep_reference.vocab_cases import check_tokenizer  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402


def _model(name: str) -> str:
    return os.path.join(ROOT, "models", name)


def _ids(n: int, vocab: int, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _pure_vs_oracle(name: str, n: int) -> tuple[float, float]:
    ids = _ids(n, 2048)
    oracle = numpy_oracle.oracle_trace(_model(name), ids)
    model = tracer.load_model(_model(name), "f64")
    pure = tracer.trace_model(model, ids, "f64")
    worst = max(float(np.abs(pure[k].numpy() - oracle[k]).max()) for k in oracle if k != "tokens")
    f32 = tracer.trace_model(tracer.load_model(_model(name), "f32"), ids, "f32")
    f32_diff = float(np.abs(f32["logits"].numpy().astype(np.float64) - oracle["logits"]).max())
    return worst, f32_diff


def test_pure_f64_matches_numpy_oracle_qwen2():
    worst, f32_diff = _pure_vs_oracle("qwen2-gqa", 300)
    assert worst < 1e-12, worst
    assert 1e-7 < f32_diff < 1e-4, f32_diff


def test_pure_f64_matches_numpy_oracle_llama():
    worst, _ = _pure_vs_oracle("llama-gqa", 300)
    assert worst < 1e-12, worst


def test_pure_f64_matches_numpy_oracle_qwen3_moe():
    """Qwen3-MoE (router softmax lifted to float64 by pure_f64_patches; the expert ids exact)."""
    worst, f32_diff = _pure_vs_oracle("qwen3-moe-small", 300)
    assert worst < 1e-12, worst
    assert 1e-7 < f32_diff < 1e-4, f32_diff
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    assert modeling_qwen3_moe.Qwen3MoeTopKRouter.forward is not tracer._router_forward_f64


def test_sliding_windows_oracle_streamed_and_config():
    """Sliding windows (mistral-swa: 8 on every layer; qwen2-swa: 6 on layers 1-2): the numpy oracle
    and the streamed trace agree with the pure-f64 tracer past the window; the oracle's per-layer
    windows (from config.json) are those transformers' config gives; each query's probabilities
    cover exactly the keys i - w < j <= i."""
    import json

    from lockstep_reference import streamed
    from lockstep_reference.windows import hf_layer_windows, layer_windows

    expected = {"mistral-swa": [8, 8], "qwen2-swa": [None, 6, 6]}
    for name, windows in expected.items():
        d = _model(name)
        assert os.path.exists(os.path.join(d, "config.json")), f"fixture {d} missing"
        with open(os.path.join(d, "config.json")) as f:
            assert layer_windows(json.load(f)) == windows, name
        assert hf_layer_windows(streamed.load_config(d)) == windows, name
        worst, _ = _pure_vs_oracle(name, 40)
        assert worst < 1e-12, (name, worst)
        assert _streamed_vs_pure(name, 30, 50000) <= 1e-12, name
        pure = tracer.trace_model(tracer.load_model(d, "f64"), _ids(20, 2048), "f64")
        for layer, w in enumerate(windows):
            seen = pure[f"layers.{layer}.attn_probs"][0] > 0  # [heads, T, T]
            q = torch.arange(20)[:, None]
            k = torch.arange(20)[None, :]
            want = (k <= q) & ((k > q - w) if w is not None else True)
            assert torch.equal(seen, want.expand_as(seen)), (name, layer)


def test_patches_are_restored():
    before = (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.Qwen2RotaryEmbedding.forward,
              modeling_qwen2.eager_attention_forward, modeling_qwen2.apply_rotary_pos_emb,
              modeling_llama.LlamaRMSNorm.forward, modeling_llama.eager_attention_forward)
    tracer.trace_model(tracer.load_model(_model("qwen2-mqa"), "f64"), [1, 2, 3], "f64")
    after = (modeling_qwen2.Qwen2RMSNorm.forward, modeling_qwen2.Qwen2RotaryEmbedding.forward,
             modeling_qwen2.eager_attention_forward, modeling_qwen2.apply_rotary_pos_emb,
             modeling_llama.LlamaRMSNorm.forward, modeling_llama.eager_attention_forward)
    assert before == after


def test_trace_matches_hf_outputs_bf16():
    ids = _ids(40, 2048, seed=3)
    model = tracer.load_model(_model("qwen2-gqa"), "bf16")
    tr = tracer.trace_model(model, ids, "bf16")
    assert list(tr) == tracer.trace_names(2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    assert torch.equal(tr["logits"], out.logits.float())
    # hidden_states: embeddings, then each layer's output except the last, which is replaced by final_norm
    assert torch.equal(tr["layers.0.out"], out.hidden_states[1].float())
    assert torch.equal(tr["final_norm"], out.hidden_states[2].float())
    resid = (tr["embed"].bfloat16() + tr["layers.0.o_proj"].bfloat16()).float()
    assert torch.equal(resid, tr["layers.0.resid_attn"])


def test_fingerprint_matches_safetensors_library():
    from safetensors import safe_open

    d = _model("qwen2-gqa")
    with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
        lines = [k + ":" + hashlib.sha256(f.get_tensor(k).astype("<f4").tobytes()).hexdigest()
                 for k in sorted(f.keys())]
    with open(os.path.join(d, "config.json"), "rb") as f:
        payload = "\n".join(lines) + "\n" + hashlib.sha256(f.read()).hexdigest()
    assert model_fingerprint(d) == hashlib.sha256(payload.encode()).hexdigest()


def test_serve_answers_each_command_as_a_one_shot_run_does():
    """`serve`: two commands in one process answer what one-shot runs print on stdout, a failing one
    answers its one-line error and the process goes on, a malformed request is refused, and the
    process ends at the end of stdin."""
    import json
    import subprocess
    import tempfile

    d = _model("qwen2-gqa")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")}
    with tempfile.TemporaryDirectory() as tmp:
        texts = os.path.join(tmp, "texts.json")
        with open(texts, "w") as f:
            json.dump(["Hello world", "The quick brown fox"], f)
        tokenize = ["tokenize-batch", "--model", d, "--texts", texts]
        weights = ["weights", "--model", d]
        one_shot = [subprocess.run([sys.executable, "-m", "lockstep_reference", *argv], env=env, check=True,
                                   capture_output=True, text=True).stdout for argv in (tokenize, weights)]
        requests = [tokenize, ["weights", "--model", os.path.join(tmp, "missing")], "not a list", weights]
        served = subprocess.run([sys.executable, "-m", "lockstep_reference", "serve"], env=env, check=True,
                                input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True,
                                text=True, timeout=600)
    answers = [json.loads(line) for line in served.stdout.splitlines()]
    assert len(answers) == 4, served.stdout
    assert answers[0] == {"ok": True, "stdout": one_shot[0]}
    assert answers[1]["ok"] is False and "missing" in answers[1]["error"], answers[1]
    assert "\n" not in answers[1]["error"].strip()
    assert answers[2]["ok"] is False and answers[2]["error"].startswith("bad request"), answers[2]
    assert answers[3] == {"ok": True, "stdout": one_shot[1]}


def test_llama_cpp_vocab_cases():
    n, bad = check_tokenizer(os.path.join(ROOT, "tokenizer", "qwen"),
                             os.path.join(ROOT, "llama-cpp", "ggml-vocab-qwen2.gguf.inp"))
    assert n == 46 and not bad, (n, bad)


def _streamed_vs_pure(name: str, n: int, row_chunk: int) -> float:
    """Max |streamed - pure f64| over every tensor of the trace (same names, shapes and dtypes)."""
    from lockstep_reference import streamed

    d = _model(name)
    ids = _ids(n, streamed.load_config(d).vocab_size, seed=11)
    got, _ = streamed.trace_model_streamed(d, ids, row_chunk=row_chunk)
    want = tracer.trace_model(tracer.load_model(d, "f64"), ids, "f64")
    assert list(got) == list(want)
    worst = 0.0
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        worst = max(worst, float((got[k].double() - want[k].double()).abs().max()))
    return worst


def test_streamed_f64_matches_pure_f64():
    # f32- and bf16-stored, Qwen2 and Llama, untied and tied; row chunks that do not divide the vocab.
    # Measured: bit-identical (0.0) on all of them.
    cases = [("qwen2-gqa", 50, 300), ("llama-gqa", 50, 300), ("qwen2-default-bf16", 30, 50000),
             ("llama-gqa-bf16", 20, 1000), ("qwen2.5-0.5b-random", 10, 40000)]
    # A missing fixture is a failure, not a skipped case (a check that cannot run must not pass).
    for name, _, _ in cases:
        assert os.path.exists(os.path.join(_model(name), "config.json")), \
            f"fixture {_model(name)} missing: create it with `bash scripts/fixtures.sh` (without --no-big)"
    for name, n, chunk in cases:
        worst = _streamed_vs_pure(name, n, chunk)
        assert worst <= 1e-12, (name, worst)


def test_streamed_bf16_and_f32_match_the_whole_model():
    """The PyTorch reference streamed layer by layer (bf16 and f32, for models bigger than RAM) equals the
    whole-model trace bit for bit, on every fixture folder it can stream (all but Qwen3-MoE) of at most
    100 MB (the three 0.5-1 GB ones alone take minutes here; they were checked by hand: identical too)."""
    from lockstep_reference import streamed

    models = os.path.join(ROOT, "models")
    names = sorted(n for n in os.listdir(models) if os.path.exists(os.path.join(models, n, "config.json")))
    assert len(names) >= 20, f"fixtures missing under {models}: create them with `bash scripts/fixtures.sh`"
    checked = 0
    for name in names:
        d = os.path.join(models, name)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        config = streamed.load_config(d)
        if config.model_type not in streamed._STREAMED_TYPES or size > 100_000_000:
            continue
        ids = _ids(12, config.vocab_size, seed=5)
        for dtype in ("bf16", "f32"):
            got, _ = streamed.trace_model_streamed(d, ids, dtype=dtype)
            want = tracer.trace_model(tracer.load_model(d, dtype), ids, dtype)
            assert list(got) == list(want), (name, dtype)
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (name, dtype, k)
        checked += 1
    assert checked >= 20, checked


def test_streamed_group_equals_each_input_alone():
    """Several inputs streamed together (each layer read once for all) give each input exactly the trace
    it gets streamed alone: Qwen2, Llama (bf16-stored), Qwen3 and a sliding window, f64/f32/bf16, inputs
    of different lengths; and trace_streamed_many writes each file and folder as trace_streamed does."""
    import tempfile

    from lockstep_reference import streamed
    from lockstep_reference.batch import streamed_groups
    from lockstep_reference.protocol import TraceJob
    from safetensors import safe_open

    for name in ("qwen2-gqa", "llama-gqa-bf16", "qwen3-small", "mistral-swa"):
        d = _model(name)
        assert os.path.exists(os.path.join(d, "config.json")), f"fixture {d} missing: bash scripts/fixtures.sh"
        vocab = streamed.load_config(d).vocab_size
        lists = [_ids(n, vocab, seed=20 + n) for n in (3, 12, 1)]
        for dtype in ("f64", "f32", "bf16"):
            together, _ = streamed.trace_models_streamed(d, lists, dtype=dtype, row_chunk=700)
            for ids, got in zip(lists, together, strict=True):
                alone, _ = streamed.trace_model_streamed(d, ids, dtype=dtype, row_chunk=700)
                assert list(got) == list(alone), (name, dtype)
                for k in alone:
                    assert torch.equal(got[k], alone[k]), (name, dtype, len(ids), k)

    d = _model("qwen2-mqa")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(os.path.join(tmp, "a.safetensors"), [5, 6, 7]), (os.path.join(tmp, "b") + os.sep, [9]),
                (os.path.join(tmp, "c.safetensors"), [1, 2])]
        streamed.trace_streamed_many(d, jobs, dtype="bf16")
        for out, ids in jobs:
            one = os.path.join(tmp, "one.safetensors")
            alone = streamed.trace_streamed(d, one, token_ids=ids, dtype="bf16")
            if out.endswith(os.sep):
                parts = sorted(os.listdir(out))
                got = {}
                for p in parts:
                    with safe_open(os.path.join(out, p), "pt") as f:
                        got.update({k: f.get_tensor(k) for k in f.keys()})
            else:
                with safe_open(out, "pt") as f, safe_open(one, "pt") as g:
                    assert f.metadata() == g.metadata() and list(f.keys()) == list(g.keys())
                    got = {k: f.get_tensor(k) for k in f.keys()}
            assert sorted(got) == sorted(alone) and all(torch.equal(got[k], alone[k]) for k in alone), out

    # Grouping: by (model, dtype), in order, at most the budget of tokens or one longer job alone.
    def job(model, n, dtype="f64"):
        return TraceJob(model=model, tokens=[1] * n, dtype=dtype, out=f"{model}-{n}-{dtype}", streamed=True)

    jobs = [job("m", 1), job("m", 1), job("m", 3), job("m", 300), job("m", 2), job("n", 1), job("m", 1, "bf16")]
    groups = [[j.out for j in g] for g in streamed_groups(jobs, token_budget=64)]
    assert groups == [["m-1-f64", "m-1-f64", "m-3-f64"], ["m-300-f64"], ["m-2-f64"], ["n-1-f64"], ["m-1-bf16"]], groups


def test_trace_batch_writes_files_and_folders():
    """`trace-batch` writes each job's trace as a file, or as a trace folder (one part file before the
    layers, one per layer, one after) when its `out` is a folder, whole-model and streamed alike: read
    back, the same tensors and metadata."""
    import json
    import tempfile

    from lockstep_reference import batch, streamed
    from safetensors import safe_open

    d = _model("qwen2-gqa")
    config = streamed.load_config(d)
    ids = _ids(6, config.vocab_size, seed=41)

    def read(path):
        files = [os.path.join(path, p) for p in sorted(os.listdir(path))] if path.endswith(os.sep) else [path]
        metas, tensors = [], {}
        for f in files:
            with safe_open(f, "pt") as g:
                metas.append(g.metadata())
                tensors.update({k: g.get_tensor(k) for k in g.keys()})
        assert all(m == metas[0] for m in metas), path
        return metas[0], tensors, len(files)

    with tempfile.TemporaryDirectory() as tmp:
        for stream in (False, True):
            outs = [os.path.join(tmp, f"{stream}.safetensors"), os.path.join(tmp, f"{stream}.trace") + os.sep]
            jobs = [{"model": d, "tokens": ids, "dtype": "f32", "out": o, "streamed": stream} for o in outs]
            jobs_file = os.path.join(tmp, "jobs.json")
            with open(jobs_file, "w") as f:
                json.dump(jobs, f)
            batch.trace_batch(jobs_file)
            (m1, t1, _), (m2, t2, parts) = read(outs[0]), read(outs[1])
            assert parts == config.num_hidden_layers + 2, (stream, parts)
            assert m1 == m2 and sorted(t1) == sorted(t2), stream
            assert all(torch.equal(t1[k], t2[k]) for k in t1), stream


def _ops_outputs(jobs, row_chunk: int | None = None) -> dict[str, tuple[dict, dict]]:
    """`ops.run_jobs(jobs)`, then each output file written: path -> (metadata, tensors in file order)."""
    from lockstep_reference import ops
    from safetensors import safe_open

    ops.run_jobs(jobs, row_chunk=row_chunk)
    out = {}
    for path in [p for j in jobs for p in (j.out_exact, j.out_reference) if p is not None]:
        if path.endswith(os.sep):
            # A trace folder: its parts read in name order, each with the same metadata.
            metas, tensors = [], {}
            for part in sorted(os.listdir(path)):
                with safe_open(os.path.join(path, part), "pt") as f:
                    metas.append(f.metadata())
                    assert not set(f.keys()) & set(tensors), (path, part)
                    tensors.update({k: f.get_tensor(k) for k in f.keys()})
            assert metas and all(m == metas[0] for m in metas), path
            out[path] = (metas[0], tensors)
            continue
        with safe_open(path, "pt") as f:
            out[path] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return out


def _same_ops(got: dict, want: dict, streamed: bool, label, loose: tuple[str, ...] = ()) -> None:
    """Streamed (or not) outputs `got` equal `want` bit for bit: metadata ("streamed": "true" added),
    names, dtypes, values; the tensors named in `loose` of the pure-float64 outputs within 1e-12 instead."""
    for path, (meta, tensors) in want.items():
        got_meta, got_tensors = got[path]
        assert got_meta == ({**meta, "streamed": "true"} if streamed else meta), (label, path)
        assert sorted(got_tensors) == sorted(tensors), (label, path)
        for k, t in tensors.items():
            g = got_tensors[k]
            assert g.dtype == t.dtype and g.shape == t.shape, (label, path, k)
            if k in loose and meta["pure_f64"] == "true":
                assert float((g - t).abs().max()) <= 1e-12, (label, path, k)
            else:
                assert torch.equal(g, t), (label, path, k)


def test_streamed_ops_equal_the_in_memory_ops():
    """The op-level reference streamed layer by layer (for models whose float64 copy does not fit in
    memory) writes exactly the in-memory path's outputs: Qwen2, Llama (bf16-stored), Qwen3, sliding
    windows (Mistral, Qwen2's per-layer types) and dynamic RoPE (an input past the original length, then
    a short one), tiers f64/f32/bf16, test traces in f32 and bf16 of several lengths run together, each
    output equal to the job's run alone. With lm_head in one chunk (a vocab of 2048, below ROW_CHUNK)
    every tensor is bit-identical; cut in chunks (the 151936-row heads, or 700 rows) the float64 logits
    differ in the last bits (MKL's dgemm sums in an order that depends on the matrix's width: measured
    up to ~3e-15 here) and every other tensor is still bit-identical. Written as trace folders (one part
    per layer, as each is done) they read back as the same traces."""
    import dataclasses
    import tempfile

    from lockstep_reference import ops, streamed
    from lockstep_reference.protocol import OpsJob

    cases = [("qwen2-gqa", (3, 12, 1)), ("llama-gqa-bf16", (9, 4)), ("qwen3-small", (7, 2)),
             ("mistral-swa", (20, 5)), ("qwen2-swa", (15, 3)), ("qwen2-dynamic-small", (150, 20))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, lengths in cases:
            d = _model(name)
            assert os.path.exists(os.path.join(d, "config.json")), f"fixture {d} missing: bash scripts/fixtures.sh"
            vocab = streamed.load_config(d).vocab_size
            chunked = ("logits",) if vocab > streamed.ROW_CHUNK else ()
            tests = []
            for k, n in enumerate(lengths):
                tests.append(os.path.join(tmp, f"{name}-{k}.test.safetensors"))
                tracer.trace(d, tests[-1], ("f32", "bf16")[k % 2], token_ids=_ids(n, vocab, seed=30 + n))
            for tier in ("f64", "f32", "bf16"):
                jobs = [OpsJob(model=d, test=t, dtype=tier, out_exact=f"{t}.{tier}.x",
                               out_reference=None if tier == "f64" else f"{t}.{tier}.r") for t in tests]
                label = (name, tier)
                want = _ops_outputs(jobs)
                assert all(m.get("streamed") is None for m, _ in want.values()), label
                stream = [dataclasses.replace(j, streamed=True) for j in jobs]
                if sum(lengths) <= 64:  # one group: each layer read once for all the jobs
                    assert ops._streamed_groups(stream) == [stream], label
                _same_ops(_ops_outputs(stream), want, True, label, chunked)
                # Trace folders (as the verifier names them for a streamed model): each part written as
                # soon as its layer is done, read together the same trace.
                folder = {p: f"{p}.d{os.sep}" for j in jobs for p in (j.out_exact, j.out_reference) if p}
                parted = [dataclasses.replace(j, out_exact=folder[j.out_exact],
                                              out_reference=folder.get(j.out_reference)) for j in stream]
                got = _ops_outputs(parted)
                assert all(len(os.listdir(folder[p])) == streamed.load_config(d).num_hidden_layers + 2
                           for p in want), label
                _same_ops({p: got[folder[p]] for p in want}, want, True, label + ("folders",), chunked)
                for job in stream:
                    alone = {p: v for p, v in want.items() if p in (job.out_exact, job.out_reference)}
                    _same_ops(_ops_outputs([job]), alone, True, label + ("alone",), chunked)
                if name == "qwen2-gqa":
                    _same_ops(_ops_outputs(stream, row_chunk=700), want, True, label + ("chunked",),
                              loose=("logits",))


def test_ops_read_a_test_trace_folder():
    """A test trace given as a trace folder (one part file per layer, as a port may write it) gives the
    op-level reference, in memory and streamed, exactly the ops the same trace as one file gives (but the
    f32 logits, within f32 rounding: MKL's sgemm rounds by the input's alignment in memory)."""
    import tempfile

    from lockstep_reference import streamed
    from lockstep_reference.protocol import OpsJob

    d = _model("qwen2-gqa")
    ids = _ids(7, streamed.load_config(d).vocab_size, seed=43)
    with tempfile.TemporaryDirectory() as tmp:
        file, folder = os.path.join(tmp, "t.safetensors"), os.path.join(tmp, "t.trace") + os.sep
        for out in (file, folder):
            tracer.trace(d, out, "f32", token_ids=ids)
        assert len(os.listdir(folder)) > 2
        for stream in (False, True):
            got = []
            for k, test in enumerate((file, folder)):
                job = OpsJob(model=d, test=test, dtype="f32", out_exact=os.path.join(tmp, f"{stream}{k}.x"),
                             out_reference=os.path.join(tmp, f"{stream}{k}.r"), streamed=stream)
                got.append(list(_ops_outputs([job]).values()))
            for (meta, a), (_, b) in zip(got[0], got[1], strict=True):
                assert sorted(a) == sorted(b), stream
                for n in a:
                    if n == "logits" and meta["pure_f64"] == "false":
                        # MKL's sgemm rounds by where its input lies in memory (the tensor's offset in
                        # the file it was read from: 16 vs 24 bytes past a 64-byte line here).
                        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-5), (stream, n)
                    else:
                        assert torch.equal(a[n], b[n]), (stream, n)


def test_streamed_group_budget_follows_the_memory_available():
    """Streamed jobs are grouped by as many tokens as a third of the memory available holds (at least
    `STREAMED_GROUP_TOKENS`): more memory, bigger groups; more bytes per traced value, smaller ones."""
    from lockstep_reference import batch
    from lockstep_reference.protocol import TraceJob

    d = _model("qwen2-gqa")
    available = batch._available_bytes
    try:
        batch._available_bytes = lambda: 0
        assert batch.group_token_budget(d, 100, 8) == batch.STREAMED_GROUP_TOKENS
        batch._available_bytes = lambda: 3 << 30
        big = batch.group_token_budget(d, 100, 8)
        assert big > batch.STREAMED_GROUP_TOKENS
        assert abs(batch.group_token_budget(d, 100, 4) - 2 * big) <= 2
        batch._available_bytes = lambda: 6 << 30
        assert abs(batch.group_token_budget(d, 100, 8) - 2 * big) <= 2
        # Three 100-token jobs: one group with plenty of memory, one per job with none.
        jobs = [TraceJob(model=d, tokens=[1] * 100, dtype="f64", out=f"o{i}", streamed=True) for i in range(3)]
        assert len(batch.streamed_groups(jobs)) == 1
        batch._available_bytes = lambda: 0
        assert len(batch.streamed_groups(jobs)) == 3
    finally:
        batch._available_bytes = available


def test_streamed_weights_answer_equals_the_loaded_models():
    """`weights --streamed` (tensor by tensor, the model never loaded) gives the same checksums and facts
    as `weights` on the loaded model: untied and tied, f32- and bf16-stored, with and without biases."""
    import contextlib
    import io
    import json

    from lockstep_reference import batch

    for name in ("qwen2-gqa", "qwen2-tied-bf16", "llama-gqa-bf16", "qwen3-small", "mistral-swa"):
        d = _model(name)
        assert os.path.exists(os.path.join(d, "config.json")), f"fixture {d} missing: bash scripts/fixtures.sh"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            batch.weights(d)
        loaded = json.loads(out.getvalue().strip().splitlines()[-1])
        streamed = json.loads(batch.answer_line(batch.streamed_weights(d)))
        assert streamed == loaded, name
        assert len(loaded["checksums"]) > 10, name


def test_streamed_trace_file_and_metadata():
    import tempfile

    from lockstep_reference import streamed
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.safetensors")
        tensors = streamed.trace_streamed(_model("qwen2-mqa"), out, token_ids=[5, 6, 7])
        with safe_open(out, "pt") as f:
            meta = f.metadata()
            assert list(f.keys()) == sorted(tensors)
            assert torch.equal(f.get_tensor("logits"), tensors["logits"])
    assert meta["streamed"] == "true" and meta["pure_f64"] == "true" and meta["dtype"] == "f64"
    assert meta["model_fingerprint"] == model_fingerprint(_model("qwen2-mqa"))


def test_make_7b_writer_matches_fixture_randomization():
    """make_7b's tensor-by-tensor shard writer gives the same bf16 weights as fixtures._randomize on a
    model materialized in bf16, and transformers loads the shards (small configs, forced sharding)."""
    import tempfile

    import transformers
    from lockstep_reference import fixtures as fx
    from lockstep_reference import make_7b
    from transformers import Qwen2Config

    transformers.utils.logging.disable_progress_bar()
    for tied in (False, True):
        config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                             rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256,
                             use_sliding_window=False)
        config.architectures = ["Qwen2ForCausalLM"]
        with torch.device("meta"):
            ref = transformers.Qwen2ForCausalLM(config)
        ref = ref.to(torch.bfloat16).to_empty(device="cpu")
        if tied:
            ref.tie_weights()
        fx._randomize(ref, 99, config.hidden_size)
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            written = make_7b.write_random_checkpoint(config, tmp, 99, shard_bytes=60_000)
            assert len(written["files"]) >= 3, written["files"]
            expected_count = sum(p.numel() for p in ref.parameters())
            checked = make_7b.check_checkpoint(tmp, expected_count)
            assert checked["files"] == len(written["files"])
            loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
            a, b = ref.state_dict(), loaded.state_dict()
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
            assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_qwen25_7b_config_count():
    """The make-7b config has Qwen2.5-7B's 7,615,616,512 parameters (meta device: no memory)."""
    from lockstep_reference import make_7b
    from transformers import Qwen2Config

    plan = make_7b.parameter_plan(Qwen2Config(**make_7b.QWEN25_7B_CONFIG))
    assert sum(make_7b._numel(s) for _, s in plan) == make_7b.QWEN25_7B_PARAMETERS == 7_615_616_512
    assert len(plan) == 339 and not any(n.endswith("o_proj.bias") for n, _ in plan)
    plan = make_7b.parameter_plan(Qwen2Config(**make_7b.QWEN25_14B_CONFIG))
    assert sum(make_7b._numel(s) for _, s in plan) == make_7b.QWEN25_14B_PARAMETERS == 14_770_033_664
    assert len(plan) == 579


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
