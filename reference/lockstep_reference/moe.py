"""Which layers of a mixture-of-experts model are sparse (torch-free: the numpy oracle uses it)."""

from __future__ import annotations


def sparse_layers(config) -> list[bool]:
    """Per layer, whether it is a mixture-of-experts layer (Qwen3-MoE's rule in
    Qwen3MoeDecoderLayer.__init__: not in mlp_only_layers, experts > 0 and
    (layer + 1) % decoder_sparse_step == 0); all False for dense model types. `config` is a
    transformers config or a config.json dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    n = get("num_hidden_layers")
    if get("model_type") != "qwen3_moe":
        return [False] * n
    experts = get("num_experts", None) or get("num_local_experts", None) or 128
    step = get("decoder_sparse_step", None) or 1
    dense = get("mlp_only_layers", None) or []
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]
