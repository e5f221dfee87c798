"""Self-checks of the reference side (needs `bash scripts/fixtures.sh --no-big` first).

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


def test_llama_cpp_vocab_cases():
    n, bad = check_tokenizer(os.path.join(ROOT, "tokenizer", "qwen"),
                             os.path.join(ROOT, "llama-cpp", "ggml-vocab-qwen2.gguf.inp"))
    assert n == 46 and not bad, (n, bad)


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
