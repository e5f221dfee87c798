"""Write a Hugging Face Qwen2/Llama checkpoint as a GGUF file laid out the way llama.cpp's converter
(`convert_hf_to_gguf.py`) lays it out: llama.cpp tensor names, dims fastest-first, Llama q/k rows
permuted for llama.cpp's RoPE, metadata under `{arch}.*`. The 2-D weights are stored in the ggml
types given (cycling through them, so one small model exercises every type), quantized with gguf-py
(K-quants, which gguf-py cannot quantize to, as random blocks); 1-D tensors (norms, biases) and rows
that do not fill whole blocks stay F32.

Llama 3 RoPE scaling (`rope_type: llama3`) is written as the converter writes it: no scaling
metadata, a `rope_freqs.weight` tensor of per-frequency divisors (`LlamaModel.generate_extra_tensors`,
[`llama3_rope_freqs`]).

Used by lockstep's GGUF tests: the file is then loaded both by lockstep and by `transformers`
(`from_pretrained(dir, gguf_file=...)`), and the two must hold bit-identical weights."""

from __future__ import annotations

import json
import os

import numpy as np

_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf
    layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{_HF_TO_GGUF[module]}.{kind}"


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): HF rotate-half rows -> interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# K-quant blocks: byte offsets of their float16 scale fields. gguf-py cannot quantize to these
# types, so the test files hold random blocks (every bit pattern is a valid block once the float16
# fields are finite); what matters is that both loaders read the same values out of them.
_K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_k_blocks(shape: tuple, qt, rng) -> np.ndarray:
    """Random `qt` blocks for a tensor of `shape` (uint8, one row of blocks per tensor row), with
    small finite float16 scales."""
    import gguf

    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qt]
    n_blocks = int(np.prod(shape)) // per_block
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in _K_SCALES[qt.name]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // per_block * block_bytes)


def llama3_rope_freqs(cfg: dict) -> np.ndarray | None:
    """The `rope_freqs.weight` llama.cpp's converter writes for a config with `llama3` RoPE scaling
    (`LlamaModel.generate_extra_tensors`, computed as it computes it: float32 torch frequencies,
    its defaults, and `original_max_position_embeddings` read from the top level of config.json,
    i.e. 8192 for the Llama 3.x configs, which keep it inside `rope_scaling`); None without llama3."""
    import math

    import torch

    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = cfg.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor([float(f) for f in factors], dtype=torch.float32).numpy()


def _load_f32(path: str) -> dict:
    """Every tensor of a safetensors file as float32 numpy (bfloat16 included, exactly)."""
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(path).items()}


def make_gguf(model_dir: str, out: str, types: list[str]) -> dict:
    """Write `model_dir` (config.json + model.safetensors) to `out`; return {gguf tensor name: type}."""
    import gguf

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = _ARCH[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tensors = _load_f32(os.path.join(model_dir, "model.safetensors"))
    qtypes = [gguf.GGMLQuantizationType[t.upper()] for t in types]

    w = gguf.GGUFWriter(out, arch)
    w.add_name(os.path.basename(os.path.normpath(model_dir)))
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 32768))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    eos = cfg.get("eos_token_id")
    if eos is not None:
        w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

    chosen = {}
    rope_freqs = llama3_rope_freqs(cfg) if arch == "llama" else None
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
        chosen["rope_freqs.weight"] = "F32"
    rng = np.random.default_rng(1234)
    i = 0
    for name in sorted(tensors):
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        a = np.ascontiguousarray(tensors[name].astype(np.float32))
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = permute(a, heads, heads if ".q_proj." in name else kv_heads)
        g = gguf_name(name)
        if a.ndim == 1:
            w.add_tensor(g, a)
            chosen[g] = "F32"
            continue
        qt = qtypes[i % len(qtypes)]
        i += 1
        if a.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] != 0:
            qt = gguf.GGMLQuantizationType.F32  # rows that do not fill whole blocks stay F32
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, a.astype(np.float16))
        elif qt.name in _K_SCALES:
            w.add_tensor(g, _random_k_blocks(a.shape, qt, rng), raw_dtype=qt)
        else:
            w.add_tensor(g, gguf.quants.quantize(a, qt), raw_dtype=qt)
        chosen[g] = qt.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return chosen
