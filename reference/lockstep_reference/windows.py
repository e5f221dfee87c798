"""The sliding attention window of each decoder layer, from config.json (a plain dict).

Mirrors what transformers 5.24's config classes derive (and the engine's `config::layer_windows`):

    mistral     every layer: `sliding_window` (MistralConfig default 4096 when absent, none when null)
    qwen3_moe   every layer: `sliding_window` when `use_sliding_window`
    qwen2/qwen3 `sliding_window` when `use_sliding_window`, on the layers `layer_types` marks
                "sliding_attention", or without `layer_types` on layers i >= `max_window_layers` (28)
    others      none

A window `w` lets the query at position i see the keys j with i - w < j <= i (transformers'
`sliding_window_overlay`: `kv_idx > q_idx - sliding_window`). Written without transformers, for the
numpy oracle; `hf_layer_windows` reads the same from a loaded transformers config, for ops.py.
"""

from __future__ import annotations


def layer_windows(config: dict) -> list[int | None]:
    """Per layer, the sliding window or None (full causal attention)."""
    n = config["num_hidden_layers"]
    model_type = config.get("model_type")
    window = config["sliding_window"] if "sliding_window" in config else 4096
    use = bool(config.get("use_sliding_window", False))
    if model_type == "mistral":
        return [window] * n
    if model_type == "qwen3_moe":
        return [window if use else None] * n
    if model_type in ("qwen2", "qwen3"):
        window = window if use else None
        types = config.get("layer_types")
        if types is None:
            first = config.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                     for i in range(n)]
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        out = []
        for t in types:
            if t == "sliding_attention":
                if window is None:
                    raise ValueError("sliding_attention layers without a sliding window")
                out.append(window)
            elif t in ("full_attention", "attention"):
                out.append(None)
            else:
                raise NotImplementedError(f"layer type {t!r}")
        return out
    return [None] * n


def hf_layer_windows(config) -> list[int | None]:
    """The same from a transformers config object, as the modeling files read it: Mistral's
    attention masks every layer with `config.sliding_window`; Qwen2's picks the sliding mask for the
    layers `config.layer_types` marks "sliding_attention"."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("mistral", "qwen3_moe"):
        return [window] * n
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return [window if t == "sliding_attention" else None for t in types]


def blocked(t_q: int, t_k: int, window: int | None, q_offset: int = 0):
    """numpy bool [t_q, t_k]: True where query i (absolute position q_offset + i) may not see key j."""
    import numpy as np

    q = np.arange(t_q)[:, None] + q_offset
    k = np.arange(t_k)[None, :]
    out = k > q
    if window is not None:
        out |= k <= q - window
    return out
