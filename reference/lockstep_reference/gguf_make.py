"""Write a Hugging Face Qwen2/Llama checkpoint as a GGUF file laid out the way llama.cpp's converter
(`convert_hf_to_gguf.py`) lays it out: llama.cpp tensor names, dims fastest-first, Llama q/k rows
permuted for llama.cpp's RoPE, metadata under `{arch}.*`. The 2-D weights are stored in the ggml
types given (cycling through them, so one small model exercises every type), quantized with gguf-py;
1-D tensors (norms, biases) stay F32 as llama.cpp keeps them.

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


def make_gguf(model_dir: str, out: str, types: list[str]) -> dict:
    """Write `model_dir` (config.json + model.safetensors) to `out`; return {gguf tensor name: type}."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = _ARCH[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
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
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, a.astype(np.float16))
        else:
            w.add_tensor(g, gguf.quants.quantize(a, qt), raw_dtype=qt)
        chosen[g] = qt.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return chosen
