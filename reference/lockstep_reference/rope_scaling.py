"""RoPE scaling (`rope_type` linear, dynamic, yarn, llama3) in float64, for the pure-f64 reference.

transformers 5.24 computes the scaled inverse frequencies in float32 (`modeling_rope_utils.py`).
`inv_freq_f64` is the same computation, step by step, in float64: the pure-f64 tracer's rotary
forward (tracer.py), ops.py through it, streamed.py and the numpy oracle use it. `hf_table` writes
transformers' own float32 values (its `ROPE_INIT_FUNCTIONS`) next to these float64 ones, the table
the engine's unit tests check against (crates/lockstep-engine/src/kernels/rope_hf_table.json;
regenerate with `python -m lockstep_reference.rope_scaling > that file`).

`dynamic` is stateless here: the sequence length is the largest position of the forward pass + 1,
and up to `max_position_embeddings` the init frequencies are used. transformers' stateful
`dynamic_rope_update` gives the same whenever a model's passes never shrink past the original
length after growing (one pass per fresh model, or generation, whose length only grows).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np


def rope_params(config: dict) -> dict:
    """The standardized RoPE parameter dict of a config.json dict (as transformers standardizes it):
    `rope_scaling` when non-empty, else `rope_parameters`; `rope_type` defaulted from `type`;
    `rope_theta` from the dict or the top level (10000); `original_max_position_embeddings` for
    llama3/yarn from the top level, the dict, or `max_position_embeddings`."""
    p = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    p.setdefault("rope_type", p.get("type", "default"))
    if p.get("rope_theta") is None:
        p["rope_theta"] = config.get("rope_theta", 10000.0)
    if p["rope_type"] in ("llama3", "yarn"):
        if config.get("original_max_position_embeddings") is not None:
            p["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        elif p.get("original_max_position_embeddings") is None:
            p["original_max_position_embeddings"] = config.get("max_position_embeddings", 32768)
    prf = p.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1.0):
        raise NotImplementedError(f"partial_rotary_factor {prf}")
    return p


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_f64(config: dict, head_dim: int, seq_len: int) -> tuple[np.ndarray, float]:
    """(inv_freq, attention_factor) in float64 for a forward pass whose largest position is
    `seq_len - 1`; the formulas of transformers' `_compute_*_parameters`, every step in float64."""
    p = rope_params(config)
    kind = p["rope_type"]
    base = float(p["rope_theta"])
    dim = head_dim
    exps = np.arange(0, dim, 2, dtype=np.float64) / dim
    if kind == "default":
        return 1.0 / (base ** exps), 1.0
    if kind == "linear":
        return (1.0 / (base ** exps)) / float(p["factor"]), 1.0
    if kind == "dynamic":
        factor = float(p["factor"])
        max_pos = config.get("max_position_embeddings", 32768)
        s = max(seq_len, max_pos)
        base = base * ((factor * s / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exps), 1.0
    if kind == "llama3":
        inv = 1.0 / (base ** exps)
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = p["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor")
        if factor is None:
            factor = config.get("max_position_embeddings", 32768) / orig
        att = p.get("attention_factor")
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if att is None:
            att = (_get_mscale(factor, mscale) / _get_mscale(factor, mscale_all)
                   if mscale and mscale_all else _get_mscale(factor))
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1

        def corr(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr(beta_fast), corr(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos = base ** exps
        extra = 1.0 / pos
        inter = 1.0 / (factor * pos)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        ef = 1 - ramp
        return inter * (1 - ef) + extra * ef, float(att)
    raise NotImplementedError(f"rope_type {kind}")


# Configs the engine's unit test covers: (name, config.json RoPE keys, head_dim, seq_lens).
TABLE_CASES = [
    ("linear", {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}, 32, [1]),
    ("dynamic", {"rope_theta": 10000.0, "max_position_embeddings": 64,
                 "rope_scaling": {"type": "dynamic", "factor": 4.0}}, 32, [10, 64, 65, 300, 333]),
    ("llama31", {"max_position_embeddings": 131072, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, 64, [1]),
    ("llama32", {"max_position_embeddings": 131072, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, 128, [1]),
    ("llama3-small", {"max_position_embeddings": 1024, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, 32, [1]),
    ("qwen25-yarn", {"rope_theta": 1000000.0, "max_position_embeddings": 32768,
                     "rope_scaling": {"type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768}}, 64, [1]),
    ("yarn-mscale", {"rope_theta": 10000.0, "max_position_embeddings": 4096,
                     "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0,
                                      "mscale_all_dim": 0.707, "beta_fast": 16,
                                      "original_max_position_embeddings": 128}}, 64, [1]),
    ("yarn-untruncated", {"rope_theta": 10000.0, "max_position_embeddings": 4096,
                          "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "truncate": False,
                                              "attention_factor": 1.25,
                                              "original_max_position_embeddings": 256}}, 32, [1]),
    ("yarn-no-factor", {"rope_theta": 10000.0, "max_position_embeddings": 2048,
                        "rope_parameters": {"rope_type": "yarn", "factor": None,
                                            "original_max_position_embeddings": 512}}, 32, [1]),
]


def hf_table() -> list[dict]:
    """transformers' own float32 inv_freq and attention factor (and the float64 ones) per case."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rows = []
    for name, keys, head_dim, seq_lens in TABLE_CASES:
        cfg_dict = {"hidden_size": head_dim * 4, "num_attention_heads": 4, "head_dim": head_dim, **keys}
        cfg = LlamaConfig(**cfg_dict)
        kind = cfg.rope_parameters["rope_type"]
        for s in seq_lens:
            if kind == "dynamic":
                # The forward pass's path: dynamic_rope_update passes a tensor seq_len past the
                # original length; up to it the init frequencies (seq_len None) stay.
                max_pos = cfg.max_position_embeddings
                arg = torch.tensor(s) if s > max_pos else None
                inv, att = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=arg)
            else:
                inv, att = ROPE_INIT_FUNCTIONS[kind](cfg, None)
            inv64, att64 = inv_freq_f64(cfg_dict, head_dim, s)
            rows.append({
                "name": name, "config": cfg_dict, "head_dim": head_dim, "seq_len": s,
                "inv_freq_f32": [float(x) for x in inv.to(torch.float32)],
                "attention_factor": float(att),
                "inv_freq_f64": [float(x) for x in inv64], "attention_factor_f64": att64,
            })
    return rows


if __name__ == "__main__":
    json.dump(hf_table(), sys.stdout, indent=None)
    sys.stdout.write("\n")


def hf_inv_freq_f64(config, head_dim: int, seq_len: int) -> tuple[np.ndarray, float]:
    """`inv_freq_f64` for a transformers config object (its standardized `rope_parameters`)."""
    return inv_freq_f64({"rope_parameters": dict(config.rope_parameters),
                         "max_position_embeddings": config.max_position_embeddings}, head_dim, seq_len)


def reset_dynamic_rope(model) -> None:
    """Put a loaded model's rotary embedding back in its state at load (transformers' `dynamic`
    rope keeps the frequencies of the longest sequence seen while later passes stay past the
    original length): every forward pass of the reference then computes as a fresh model's."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or "dynamic" not in str(getattr(rotary, "rope_type", "")):
        return
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len
