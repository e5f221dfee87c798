"""An independent float64 numpy implementation of the Qwen2 / Llama forward pass (the f64 oracle).

It shares no code with transformers: it reads the checkpoint bytes itself (`st_io.load_f64`) and
config.json, and computes every trace tensor in float64 with plain numpy. The pure-f64 tracer must
agree with it to ~1e-12 on logits; the tracer without the pure-f64 patches differs by ~1e-6.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .moe import sparse_layers
from .rope_scaling import inv_freq_f64, rope_params
from .st_io import load_f64
from .windows import blocked, layer_windows


def rope_theta(config: dict) -> float:
    """rope_theta from a config dict: v5 `rope_parameters.rope_theta`, else v4 top-level `rope_theta`."""
    return float(rope_params(config)["rope_theta"])


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def forward(weights: dict[str, np.ndarray], config: dict, token_ids: list[int]) -> dict[str, np.ndarray]:
    """Compute every trace tensor (docs/trace-format.md names, batch dim 1) in float64.

    Returns them in forward order."""
    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    qwen3 = config.get("model_type") in ("qwen3", "qwen3_moe")
    # Qwen3Config's head_dim defaults to 128, not hidden_size / heads (Qwen3-MoE's does not).
    head_dim = config.get("head_dim") or (128 if config.get("model_type") == "qwen3" else hidden // n_heads)
    sparse = sparse_layers(config)
    eps = float(config["rms_norm_eps"])
    n_layers = config["num_hidden_layers"]
    group = n_heads // n_kv
    t = len(token_ids)
    out: dict[str, np.ndarray] = {"tokens": np.asarray([token_ids], dtype=np.int64)}

    def linear(x, prefix):
        y = x @ weights[prefix + ".weight"].T
        bias = weights.get(prefix + ".bias")
        return y if bias is None else y + bias

    # RoPE (scaled as config.json asks: rope_scaling.inv_freq_f64; dynamic for this length).
    inv_freq, attention = inv_freq_f64(config, head_dim, t)
    freqs = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)
    cos, sin = np.cos(emb) * attention, np.sin(emb) * attention  # [T, D]
    windows = layer_windows(config)  # per layer: None (causal) or a sliding window

    x = weights["model.embed_tokens.weight"][np.asarray(token_ids)]
    out["embed"] = x
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tp = f"layers.{i}."
        h = _rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        out[tp + "input_norm"] = h
        q = linear(h, p + "self_attn.q_proj").reshape(t, n_heads, head_dim).transpose(1, 0, 2)
        k = linear(h, p + "self_attn.k_proj").reshape(t, n_kv, head_dim).transpose(1, 0, 2)
        v = linear(h, p + "self_attn.v_proj").reshape(t, n_kv, head_dim).transpose(1, 0, 2)
        out[tp + "q"], out[tp + "k"], out[tp + "v"] = q, k, v
        if qwen3:  # RMSNorm over each head's D values, before RoPE
            q = _rms_norm(q, weights[p + "self_attn.q_norm.weight"], eps)
            k = _rms_norm(k, weights[p + "self_attn.k_norm.weight"], eps)
            out[tp + "q_norm"], out[tp + "k_norm"] = q, k
        q_rope = q * cos + _rotate_half(q) * sin
        k_rope = k * cos + _rotate_half(k) * sin
        out[tp + "q_rope"], out[tp + "k_rope"] = q_rope, k_rope
        k_full = np.repeat(k_rope, group, axis=0)  # query head h uses kv head h // group
        v_full = np.repeat(v, group, axis=0)
        scores = (q_rope @ k_full.transpose(0, 2, 1)) * head_dim**-0.5
        scores = np.where(blocked(t, t, windows[i]), -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        e = np.exp(scores)
        probs = e / e.sum(axis=-1, keepdims=True)
        out[tp + "attn_probs"] = probs
        attn = (probs @ v_full).transpose(1, 0, 2).reshape(t, n_heads * head_dim)
        out[tp + "attn_out"] = attn
        o = linear(attn, p + "self_attn.o_proj")
        out[tp + "o_proj"] = o
        x = x + o
        out[tp + "resid_attn"] = x
        h = _rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        out[tp + "post_norm"] = h
        if sparse[i]:
            x = x + _moe(h, weights, p + "mlp.", config, out, tp)
            out[tp + "out"] = x
            continue
        gate = linear(h, p + "mlp.gate_proj")
        act = gate / (1.0 + np.exp(-gate)) * linear(h, p + "mlp.up_proj")
        out[tp + "mlp_act"] = act
        m = linear(act, p + "mlp.down_proj")
        out[tp + "mlp_out"] = m
        x = x + m
        out[tp + "out"] = x
    h = _rms_norm(x, weights["model.norm.weight"], eps)
    out["final_norm"] = h
    tied = config.get("tie_word_embeddings", False)
    lm_head = weights["model.embed_tokens.weight"] if tied else weights["lm_head.weight"]
    out["logits"] = h @ lm_head.T
    return {name: (a if name == "tokens" else np.ascontiguousarray(a[None])) for name, a in out.items()}


def _moe(h, weights, p, config, out, tp):
    """Qwen3-MoE's sparse block in float64: softmax over every expert, top-k, optional
    renormalisation, each expert on its tokens; records the router taps and mlp_out."""
    k = config.get("num_experts_per_tok", 8)
    logits = h @ weights[p + "gate.weight"].T  # [T, E]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, ids, axis=-1)
    if config.get("norm_topk_prob", False):
        w = w / w.sum(axis=-1, keepdims=True)
    out[tp + "router_logits"], out[tp + "router_topk_ids"], out[tp + "router_topk_weights"] = logits, ids, w
    m = np.zeros_like(h)
    for ex in np.unique(ids):
        tok, slot = np.nonzero(ids == ex)
        q = f"{p}experts.{ex}."
        x = h[tok]
        gate = x @ weights[q + "gate_proj.weight"].T
        act = gate / (1.0 + np.exp(-gate)) * (x @ weights[q + "up_proj.weight"].T)
        m[tok] += (act @ weights[q + "down_proj.weight"].T) * w[tok, slot][:, None]
    out[tp + "mlp_out"] = m
    return m


def oracle_trace(model_dir: str, token_ids: list[int]) -> dict[str, np.ndarray]:
    """Load a checkpoint folder and run `forward` on it."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") not in ("qwen2", "llama", "mistral", "qwen3", "qwen3_moe"):
        raise ValueError(f"unsupported model_type {config.get('model_type')!r}")
    return forward(load_f64(model_dir), config, token_ids)
