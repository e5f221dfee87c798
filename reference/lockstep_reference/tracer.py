"""Trace one forward pass of a Hugging Face Qwen2 / Llama model, tensor by tensor.

The trace is one safetensors file whose tensor names are those of the trace table in docs/trace-format.md,
written in forward order. Capture uses module hooks plus wrappers around the module-level functions
`apply_rotary_pos_emb` and `eager_attention_forward` of transformers' qwen2 and llama modeling files
(in transformers 5.x the attention module looks both up as module globals at call time; for "eager",
`ALL_ATTENTION_FUNCTIONS.get_interface("eager", eager_attention_forward)` returns that global).

Pure float64 (`pure_f64=True`, used when and only when the dtype is f64): HF computes RMSNorm statistics,
the RoPE tables and the attention softmax in float32 even for a float64 model. `pure_f64_patches`
lifts exactly those three to float64 for the duration of a `with` block, so that the f64 run is a true
float64 computation (it matches `numpy_oracle` to ~1e-14).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys

import torch
import transformers
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe

from .moe import sparse_layers
from .rope_scaling import hf_inv_freq_f64, reset_dynamic_rope
from .st_io import model_fingerprint
from .writer import (  # noqa: F401 (re-exported for callers of tracer.*)
    LAYER_TAPS,
    QK_NORM_TYPES,
    ROUTER_TAPS,
    layer_taps,
    trace_names,
)

TORCH_DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
# bf16 runs are stored as float32, which holds every bf16 value exactly.
STORE_DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.float32}
_ST_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}
# Every layer tap suffix (a trace folder puts `layers.{i}.<suffix>` in layer i's part).
LAYER_TAP_SET = frozenset(LAYER_TAPS) | {"q_norm", "k_norm"} | frozenset(ROUTER_TAPS)

# (modeling module, RMSNorm class, rotary embedding class) per supported model_type.
_ARCHS = {
    "qwen2": (modeling_qwen2, modeling_qwen2.Qwen2RMSNorm, modeling_qwen2.Qwen2RotaryEmbedding),
    "llama": (modeling_llama, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaRotaryEmbedding),
    "mistral": (modeling_mistral, modeling_mistral.MistralRMSNorm, modeling_mistral.MistralRotaryEmbedding),
    "qwen3": (modeling_qwen3, modeling_qwen3.Qwen3RMSNorm, modeling_qwen3.Qwen3RotaryEmbedding),
    "qwen3_moe": (modeling_qwen3_moe, modeling_qwen3_moe.Qwen3MoeRMSNorm,
                  modeling_qwen3_moe.Qwen3MoeRotaryEmbedding),
}

# The tap names and their order are defined once, in the torch-free writer (other ports import it).
def trace_names_for(config) -> list[str]:
    """`trace_names` of a model configured like `config` (transformers config or config.json dict)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    return trace_names(get("num_hidden_layers"), get("model_type"), sparse_layers(config))


# ---------------------------------------------------------------------------------------------------
# Pure float64 replacements (only ever installed for float64 models)


def _rmsnorm_forward_f64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm/LlamaRMSNorm.forward with the statistics in float64 instead of float32."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float64)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _rotary_forward_f64(self, x: torch.Tensor, position_ids: torch.Tensor):
    """Rotary embedding forward with inv_freq, freqs, cos and sin all computed in float64.

    inv_freq is recomputed from the config as transformers' rope init computes it (default,
    linear, dynamic, yarn, llama3: `rope_scaling.inv_freq_f64`), but in float64; dynamic's
    sequence length is the largest position + 1, and cos/sin carry the attention factor (yarn).
    """
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    seq_len = int(position_ids.max()) + 1
    inv, attention = hf_inv_freq_f64(cfg, dim, seq_len)
    inv_freq = torch.from_numpy(inv).to(device=x.device)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention
    sin = emb.sin() * attention
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _make_eager_attention_f64(repeat_kv):
    """HF's eager_attention_forward with the softmax in the query dtype (float64) instead of float32."""

    def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = repeat_kv(key, module.num_key_value_groups)
        value_states = repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=query.dtype)
        attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        return attn_output, attn_weights

    return eager_attention_forward


def _router_forward_f64(self, hidden_states):
    """Qwen3MoeTopKRouter.forward with the softmax and the renormalisation in the logits' dtype
    (float64) instead of float32."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = nn.functional.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=router_logits.dtype, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    return router_logits, router_top_value, router_indices


@contextlib.contextmanager
def _patched(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def pure_f64_patches():
    """Within the block, Qwen2/Llama RMSNorm, rotary tables and eager softmax compute in float64.

    Patches (and restores on exit): `Qwen2RMSNorm.forward`, `LlamaRMSNorm.forward`,
    `Qwen2RotaryEmbedding.forward`, `LlamaRotaryEmbedding.forward`, and the module globals
    `eager_attention_forward` of modeling_qwen2 and modeling_llama, and Qwen3-MoE's router
    (`Qwen3MoeTopKRouter.forward`: its softmax in float64). Use only with float64 models.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(modeling_qwen3_moe.Qwen3MoeTopKRouter, "forward", _router_forward_f64))
        for module, norm_cls, rope_cls in _ARCHS.values():
            stack.enter_context(_patched(norm_cls, "forward", _rmsnorm_forward_f64))
            stack.enter_context(_patched(rope_cls, "forward", _rotary_forward_f64))
            stack.enter_context(
                _patched(module, "eager_attention_forward", _make_eager_attention_f64(module.repeat_kv))
            )
        yield


# ---------------------------------------------------------------------------------------------------
# Capture


class _Recorder:
    def __init__(self, store_dtype: torch.dtype):
        self.store_dtype = store_dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.layer: int | None = None
        self.qk_norm = False
        self.batch = 1

    def put(self, name: str, t: torch.Tensor) -> None:
        if name in self.tensors:
            raise RuntimeError(f"trace tensor {name} captured twice")
        self.tensors[name] = t.detach().to("cpu", self.store_dtype).contiguous().clone()

    def put_ids(self, name: str, t: torch.Tensor) -> None:
        """Integer ids, stored as int64 whatever the trace's float dtype."""
        if name in self.tensors:
            raise RuntimeError(f"trace tensor {name} captured twice")
        self.tensors[name] = t.detach().to("cpu", torch.int64).contiguous().clone()


def _layer_hooks(layer, i: int, rec: _Recorder, n_kv: int) -> list:
    """Install the hooks of decoder layer `layer` (taps named layers.{i}.*); return their handles."""
    p = f"layers.{i}."

    def out_hook(name):
        def hook(_mod, _args, output):
            rec.put(name, output[0] if isinstance(output, tuple) else output)
        return hook

    def in_hook(name):
        def hook(_mod, args):
            rec.put(name, args[0])
        return hook

    def enter_layer(_mod, _args):
        rec.layer = i

    def heads_hook(name, n):
        def hook(_mod, _args, output):
            b, t, _ = output.shape
            rec.put(p + name, output.view(b, t, n, -1).transpose(1, 2))
        return hook

    v_hook = heads_hook("v", n_kv)
    attn = layer.self_attn
    extra = []
    if rec.qk_norm:  # q, k are the projections; the rope wrapper's inputs are q_norm, k_norm
        extra = [attn.q_proj.register_forward_hook(heads_hook("q", attn.config.num_attention_heads)),
                 attn.k_proj.register_forward_hook(heads_hook("k", n_kv))]
    if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):  # Qwen3-MoE sparse layer
        def router_hook(_mod, _args, output):
            logits, weights, ids = output
            b = rec.batch
            rec.put(p + "router_logits", logits.view(b, -1, logits.shape[-1]))
            rec.put_ids(p + "router_topk_ids", ids.view(b, -1, ids.shape[-1]))
            rec.put(p + "router_topk_weights", weights.view(b, -1, weights.shape[-1]))
        extra.append(layer.mlp.gate.register_forward_hook(router_hook))
    else:
        extra.append(layer.mlp.down_proj.register_forward_pre_hook(in_hook(p + "mlp_act")))
    return extra + [
        layer.register_forward_pre_hook(enter_layer),
        layer.input_layernorm.register_forward_hook(out_hook(p + "input_norm")),
        attn.v_proj.register_forward_hook(v_hook),
        attn.o_proj.register_forward_pre_hook(in_hook(p + "attn_out")),
        attn.o_proj.register_forward_hook(out_hook(p + "o_proj")),
        layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "resid_attn")),
        layer.post_attention_layernorm.register_forward_hook(out_hook(p + "post_norm")),
        layer.mlp.register_forward_hook(out_hook(p + "mlp_out")),
        layer.register_forward_hook(out_hook(p + "out")),
    ]


@contextlib.contextmanager
def _function_wrappers(rec: _Recorder):
    """Wrap the module-level apply_rotary_pos_emb and eager_attention_forward (q, k, q_rope, k_rope,
    attn_probs taps) for the duration of the block."""

    def rope_wrapper(orig):
        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            q_out, k_out = orig(q, k, cos, sin, *args, **kwargs)
            p = f"layers.{rec.layer}."
            rec.put(p + ("q_norm" if rec.qk_norm else "q"), q)
            rec.put(p + ("k_norm" if rec.qk_norm else "k"), k)
            rec.put(p + "q_rope", q_out)
            rec.put(p + "k_rope", k_out)
            return q_out, k_out
        return apply_rotary_pos_emb

    def eager_wrapper(orig):
        def eager_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
            attn_output, attn_weights = orig(module, query, key, value, attention_mask, *args, **kwargs)
            rec.put(f"layers.{module.layer_idx}.attn_probs", attn_weights)
            return attn_output, attn_weights
        return eager_attention_forward

    with contextlib.ExitStack() as stack:
        for module, _norm, _rope in _ARCHS.values():
            # Look the globals up now, so that wrappers stack on top of pure_f64_patches.
            stack.enter_context(
                _patched(module, "apply_rotary_pos_emb", rope_wrapper(module.apply_rotary_pos_emb))
            )
            stack.enter_context(
                _patched(module, "eager_attention_forward", eager_wrapper(module.eager_attention_forward))
            )
        yield


@contextlib.contextmanager
def _capture(model, rec: _Recorder):
    """Install hooks and function wrappers that fill `rec` during one forward pass."""
    inner = model.model
    n_kv = model.config.num_key_value_heads
    rec.qk_norm = model.config.model_type in QK_NORM_TYPES

    def out_hook(name):
        def hook(_mod, _args, output):
            rec.put(name, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [inner.embed_tokens.register_forward_hook(out_hook("embed"))]
    try:
        for i, layer in enumerate(inner.layers):
            handles += _layer_hooks(layer, i, rec, n_kv)
        handles.append(inner.norm.register_forward_hook(out_hook("final_norm")))
        with _function_wrappers(rec):
            yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
# Public API


def gguf_file(path: str) -> str | None:
    """The llama.cpp GGUF file a model path names: the path itself when it is a `.gguf` file, or the
    only `.gguf` of a folder without safetensors weights; None for a safetensors checkpoint."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.abspath(path)
    if os.path.isdir(path) and not any(
            os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) == 1:
            return os.path.abspath(os.path.join(path, found[0]))
    return None


def pretrained_source(path: str) -> tuple[str, dict]:
    """`(folder, kwargs)` for transformers' `from_pretrained`: a GGUF model loads from its folder with
    `gguf_file=name` (tensors dequantized by transformers, tokenizer built from the file's metadata)."""
    gguf = gguf_file(path)
    if gguf is None:
        return path, {}
    folder, name = os.path.split(gguf)
    return folder, {"gguf_file": name}


def load_tokenizer(model_dir: str):
    """The transformers tokenizer of a checkpoint folder or GGUF file."""
    folder, kwargs = pretrained_source(model_dir)
    return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)


def experts_kwargs(folder: str) -> dict:
    """`experts_implementation="eager"` for a mixture-of-experts checkpoint: transformers' own loop
    over the experts hit (each on its tokens only, `index_add_` in expert order), the computation
    lockstep mirrors (its default, grouped_mm where available, orders the sums otherwise)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            moe = json.load(f).get("model_type") == "qwen3_moe"
    except (OSError, ValueError):
        moe = False
    return {"experts_implementation": "eager"} if moe else {}


def load_model(model_dir: str, dtype: str, device: str | None = None, device_map=None):
    """Load a Qwen2/Llama checkpoint folder (or GGUF file) in the compute dtype ("f64", "f32",
    "bf16"), eager attention.

    The weights are loaded directly in that dtype; the rotary `inv_freq` buffer must stay float32 (as HF
    computes it) and is asserted to be so. `device` ("cuda:0", ...) moves the model there; `device_map`
    ("auto", or accelerate's {module: device} map) spreads it over devices as accelerate does, for a
    reference made on another machine's GPUs (the trace records where it ran; its numbers are that
    device's, not this CPU's).
    """
    transformers.utils.logging.disable_progress_bar()
    folder, kwargs = pretrained_source(model_dir)
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=TORCH_DTYPES[dtype], attn_implementation="eager", **experts_kwargs(folder), **kwargs
    )
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    if model.config.model_type not in _ARCHS:
        raise ValueError(f"unsupported model_type {model.config.model_type!r} (supported: {sorted(_ARCHS)})")
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"attention implementation is {model.config._attn_implementation}, not eager")
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32, f"inv_freq is {inv_freq.dtype}, expected float32"
    for name, param in model.named_parameters():
        assert param.dtype == TORCH_DTYPES[dtype], f"{name} is {param.dtype}"
    return model


def trace_model(model, token_ids: list[int], dtype: str) -> dict[str, torch.Tensor]:
    """Run one forward pass (batch 1, no grad) of a loaded model and return the trace tensors in order.

    With dtype "f64" the pass runs under `pure_f64_patches` (true float64 math).
    """
    vocab = model.config.vocab_size
    if min(token_ids) < 0 or max(token_ids) >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}) for this model")
    rec = _Recorder(STORE_DTYPES[dtype])
    ids = torch.tensor([token_ids], dtype=torch.int64)
    rec.tensors["tokens"] = ids.clone()
    pure = contextlib.nullcontext() if dtype != "f64" else pure_f64_patches()
    with torch.no_grad(), pure, _capture(model, rec):
        reset_dynamic_rope(model)
        out = model(input_ids=ids.to(model.device), use_cache=False)
    rec.put("logits", out.logits)
    expected = trace_names_for(model.config)
    missing = [n for n in expected if n not in rec.tensors]
    extra = [n for n in rec.tensors if n not in expected]
    if missing or extra:
        raise RuntimeError(f"trace incomplete: missing {missing}, unexpected {extra}")
    return {name: rec.tensors[name] for name in expected}


def _placement(model) -> str:
    """Where a loaded model runs: "cpu", one device, or accelerate's device map as JSON."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map and set(map(str, device_map.values())) - {"cpu"}:
        return json.dumps({k: str(v) for k, v in device_map.items()}, separators=(",", ":"))
    device = getattr(model, "device", None)
    return "cpu" if device is None else str(device)


def trace_metadata(model_dir: str, model, token_ids: list[int], dtype: str, prompt: str | None) -> dict[str, str]:
    """The `__metadata__` of a trace (all values strings)."""
    gguf = gguf_file(model_dir)
    if gguf is None:
        with open(os.path.join(model_dir, "config.json")) as f:
            config_text = json.dumps(json.load(f), separators=(",", ":"))
    else:  # the config transformers derived from the GGUF metadata
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        config_text = json.dumps(config, separators=(",", ":"), default=str)
    meta = {
        "producer": "transformers",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "dtype": dtype,
        "attn_implementation": "eager",
        "pure_f64": "true" if dtype == "f64" else "false",
        "model_type": model.config.model_type,
        "num_layers": str(model.config.num_hidden_layers),
        "token_ids": json.dumps(list(token_ids)),
        "config": config_text,
    }
    placement = _placement(model)
    if placement != "cpu":  # traces made elsewhere say where (CPU traces keep the metadata they had)
        meta["device"] = placement
    if gguf is None:  # the fingerprint is defined on safetensors checkpoints (docs/trace-format.md)
        meta["model_fingerprint"] = model_fingerprint(model_dir)
    if prompt is not None:
        meta["prompt"] = prompt
    return meta


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors to a safetensors file keeping the given order in header and data (8-byte aligned header)."""
    assert sys.byteorder == "little"
    header: dict = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name, t in tensors.items():
        # The tensor's own bytes (native order, asserted little-endian above), not a copy: a 7B
        # trace's 260-token input is 3.8 GB in float64, and `tobytes` doubled that in memory and
        # took ~6 s of one core in each of the reference's passes (2026-12-03).
        data = memoryview(t.detach().contiguous().reshape(-1).numpy()).cast("B")
        header[name] = {
            "dtype": _ST_DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def is_trace_folder(path: str) -> bool:
    """Whether `path` names a trace folder (an existing folder, or a path ending in a separator)."""
    return path.endswith(os.sep) or path.endswith("/") or os.path.isdir(path)


def trace_part(name: str) -> int | None:
    """The layer a canonical `layers.{i}.*` name belongs to; None for the rest (docs/trace-format.md)."""
    if name.startswith("layers."):
        i, _, suffix = name[len("layers."):].partition(".")
        if i.isdigit() and suffix in LAYER_TAP_SET:
            return int(i)
    return None


def clear_parts(folder: str) -> None:
    """Creates `folder` when missing and removes the part files of an earlier trace in it."""
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.startswith("part-") and f.endswith(".safetensors"):
            os.remove(os.path.join(folder, f))


def write_part(folder: str, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One part file of a trace folder: `part-{index:05}.safetensors`."""
    write_safetensors(os.path.join(folder, f"part-{index:05}.safetensors"), tensors, metadata)


def write_parts(folder: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A trace as a folder of part files, as lockstep's `write_parts` splits one: part 0 what comes before
    the first layer (tokens, embed), then one part per layer, then the rest (final_norm, logits). Every
    part carries the same metadata."""
    before = {k: v for k, v in tensors.items() if k in ("tokens", "embed")}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    after = {}
    for k, v in tensors.items():
        i = trace_part(k)
        if i is not None:
            layers.setdefault(i, {})[k] = v
        elif k not in before:
            after[k] = v
    clear_parts(folder)
    parts = ([before] if before else []) + [layers[i] for i in sorted(layers)] + ([after] if after else [])
    for index, part in enumerate(parts):
        write_part(folder, index, part, metadata)


def write_trace(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A trace file, or a trace folder when `path` is a folder (see `is_trace_folder`)."""
    if is_trace_folder(path):
        write_parts(path, tensors, metadata)
    else:
        write_safetensors(path, tensors, metadata)


def tokenize(model_dir: str, text: str) -> list[int]:
    """Token ids of `text` from the folder's transformers tokenizer, no special tokens added."""
    tok = load_tokenizer(model_dir)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def trace(model_dir: str, out_path: str, dtype: str, token_ids: list[int] | None = None,
          prompt: str | None = None, device: str | None = None, device_map=None) -> dict[str, torch.Tensor]:
    """Trace one forward pass of the model in `model_dir` and write it to `out_path`.

    Give either `token_ids` or `prompt` (tokenized with the folder's tokenizer). Returns the tensors.
    """
    if (token_ids is None) == (prompt is None):
        raise ValueError("give exactly one of token_ids and prompt")
    if prompt is not None:
        token_ids = tokenize(model_dir, prompt)
    if not token_ids:
        raise ValueError("no tokens to trace")
    model = load_model(model_dir, dtype, device=device, device_map=device_map)
    tensors = trace_model(model, token_ids, dtype)
    write_trace(out_path, tensors, trace_metadata(model_dir, model, token_ids, dtype, prompt))
    return tensors
