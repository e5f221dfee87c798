"""Write a lockstep trace from any Python port (JAX, numpy, PyTorch, ...).

A port taps its intermediate tensors under the canonical names (docs/trace-format.md) and saves one
safetensors file that `lockstep compare` and `lockstep verify --port-trace` can check:

    from lockstep_reference.writer import TraceWriter

    w = TraceWriter("path/to/model")              # a checkpoint folder, a config.json, or a dict
    w.tap("embed", h)                             # numpy, JAX or torch arrays, batch dim kept
    for i, layer in enumerate(layers):
        ...
        w.tap(f"layers.{i}.q", q)                 # [1, heads, T, head_dim]
    w.tap("logits", logits)
    w.save("port.safetensors", {"producer": "my-jax-port", "dtype": "bf16", "token_ids": ids},
           weights=params)                        # the parameter arrays the port computes with

`weights` (a dict of checkpoint name -> array: numpy, JAX or torch, e.g.
`model.layers.0.self_attn.q_proj.weight`) records per-parameter checksums in the `weights_sha256`
metadata (see `weight_checksums`); `lockstep verify --port-trace` compares them with the
checkpoint's tensors, so a port that loaded, transposed or cast a weight wrongly fails the weights
phase naming that tensor. Without it the verifier sees only the fingerprint of the folder the
writer was given, not the weights the port computes with, and skips the weights phase.

A trace must hold every canonical tensor (tokens, embed, the 14 tensors of every layer,
final_norm, logits): lockstep fails a tensor the reference holds and the port's trace lacks as
MISSING, naming it. `save` writes a partial trace when asked (`missing()` lists what is not tapped
yet), but that trace cannot pass `lockstep compare` or `lockstep verify`.

Every name is checked against the canonical names for the config's layer count and every shape
against the config (hidden size, heads, kv heads, head dim, intermediate size, vocabulary) and
against the other taps (one T for all of them). bf16 arrays are stored as float32, which holds bf16
values exactly (numpy has no bf16). Errors are `TraceWriterError`, one line each.

This module needs only numpy and safetensors (no torch, no transformers), so it installs into a JAX
environment with `pip install ./reference` and nothing else. Files are written with
`safetensors.numpy.save_file`: the same format `tracer.write_safetensors` writes (tensor order in
the file differs; readers order tensors by the canonical forward order).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping

import numpy as np

from .moe import sparse_layers
from .st_io import model_fingerprint

# The canonical names (shared with the PyTorch tracer; tracer.py itself needs torch and transformers).
LAYER_TAPS = (
    "input_norm", "q", "k", "v", "q_rope", "k_rope", "attn_probs", "attn_out", "o_proj",
    "resid_attn", "post_norm", "mlp_act", "mlp_out", "out",
)
DTYPES = ("f64", "f32", "bf16")
# The numpy dtype each compute dtype stores its floating tensors in.
STORE = {"f64": np.float64, "f32": np.float32, "bf16": np.float32}


# Qwen3 / Qwen3-MoE: q_norm, k_norm after v; a sparse (MoE) layer: the router taps instead of mlp_act.
QK_NORM_TYPES = ("qwen3", "qwen3_moe")
ROUTER_TAPS = ("router_logits", "router_topk_ids", "router_topk_weights")
# Taps holding integer ids (int64 in the trace).
ID_TAPS = ("router_topk_ids",)


def layer_taps(model_type: str = "qwen2", sparse: bool = False) -> tuple[str, ...]:
    """The per-layer taps of a model type, in forward order (q_norm, k_norm after v for Qwen3; a
    sparse MoE layer has the router taps in place of mlp_act)."""
    taps = LAYER_TAPS
    if model_type in QK_NORM_TYPES:
        i = taps.index("v") + 1
        taps = taps[:i] + ("q_norm", "k_norm") + taps[i:]
    if sparse:
        i = taps.index("mlp_act")
        taps = taps[:i] + ROUTER_TAPS + taps[i + 1:]
    return taps


def trace_names(num_layers: int, model_type: str = "qwen2", sparse: list[bool] | None = None) -> list[str]:
    """All tensor names of a trace of a model with `num_layers` decoder layers, in forward order."""
    names = ["tokens", "embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{tap}" for tap in layer_taps(model_type, bool(sparse and sparse[i]))]
    return names + ["final_norm", "logits"]


class TraceWriterError(ValueError):
    """A tap or save that would write a trace lockstep cannot check (unknown name, wrong shape,
    missing metadata, ...)."""


def _load_config(config) -> tuple[dict, str | None]:
    """(config dict, checkpoint folder or None) from a folder, a config.json path or a dict."""
    if isinstance(config, Mapping):
        return dict(config), None
    path = os.fspath(config)
    if os.path.isdir(path):
        model_dir, path = path, os.path.join(path, "config.json")
    else:
        model_dir = os.path.dirname(path) or "."
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise TraceWriterError(f"no model config at {path} (give a checkpoint folder, its config.json, "
                               "or the config as a dict)") from None
    except json.JSONDecodeError as e:
        raise TraceWriterError(f"{path} is not valid JSON: {e}") from None
    return cfg, model_dir


def _to_numpy(name: str, x) -> tuple[np.ndarray, str]:
    """(numpy array, name of the original dtype) of a numpy, JAX or torch array (bf16 -> float32)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach().cpu()
        src = str(t.dtype).replace("torch.", "")
        if src in ("bfloat16", "float16"):
            t = t.float()
        return t.numpy(), src
    if mod.startswith("jax"):
        jax = sys.modules.get("jax")
        if jax is not None and isinstance(x, jax.core.Tracer):
            raise TraceWriterError(
                f"tap({name!r}) got a JAX tracer, not a value: tap outside jax.jit (or return the "
                "intermediates from the jitted function and tap them afterwards)")
        src = str(x.dtype)
        if src == "bfloat16":
            import jax.numpy as jnp

            x = x.astype(jnp.float32)
        return np.asarray(x), src
    a = np.asarray(x)
    src = str(a.dtype)
    if src == "bfloat16":  # ml_dtypes bfloat16 arrays
        a = a.astype(np.float32)
    return a, src


# Safetensors names of the floating dtypes a weight may be held in.
_WEIGHT_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _weight_bytes(name: str, x) -> tuple[str, list[int], bytes]:
    """(safetensors dtype name, shape, little-endian C-order bytes) of one parameter array in the
    dtype it is held in (numpy, ml_dtypes bfloat16, JAX or torch)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach().cpu().contiguous()
        src = str(t.dtype).replace("torch.", "")
        if src not in _WEIGHT_DTYPES:
            raise TraceWriterError(f"weight {name} is {src}: lockstep compares float64/32, bfloat16, float16")
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
        a = t.view(bits).numpy()
    else:
        if mod.startswith("jax"):
            jax = sys.modules.get("jax")
            if jax is not None and isinstance(x, jax.core.Tracer):
                raise TraceWriterError(f"weight {name} is a JAX tracer, not a value: pass the concrete arrays")
        a = np.asarray(x)
        src = str(a.dtype)
        if src not in _WEIGHT_DTYPES:
            raise TraceWriterError(f"weight {name} is {src}: lockstep compares float64/32, bfloat16, float16")
        a = np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")
    raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return _WEIGHT_DTYPES[src], [int(d) for d in a.shape], raw


def weight_checksums(params: Mapping) -> dict:
    """The `weights_sha256` record of a port's parameters: name -> `{"dtype", "shape", "sha256"}`,
    with `dtype` the safetensors name of the dtype the array is held in (`F64`, `F32`, `BF16`,
    `F16`) and `sha256` the hex sha256 of its values in that dtype, little-endian, C order (the
    bytes safetensors would store). The verifier hashes the checkpoint's tensors the same way:
    as stored when the dtypes agree, widened exactly when the port holds a wider dtype (an f32 or
    f64 port of bf16 weights), rounded to nearest even when it holds a narrower one (accepted only
    when that is the trace's compute dtype)."""
    out = {}
    for name in sorted(params):
        dtype, shape, raw = _weight_bytes(name, params[name])
        out[str(name)] = {"dtype": dtype, "shape": shape, "sha256": hashlib.sha256(raw).hexdigest()}
    return out


class TraceWriter:
    """Collects the tapped tensors of one forward pass (batch 1) and writes them as a trace.

    `config`: a checkpoint folder (its config.json is read and the trace records the model
    fingerprint, so the verifier can tell it was made from the same weights), a path to a
    config.json, or the config as a dict.
    """

    def __init__(self, config):
        self.config, self.model_dir = _load_config(config)
        c = self.config
        try:
            self.hidden = int(c["hidden_size"])
            self.heads = int(c["num_attention_heads"])
            self.kv_heads = int(c.get("num_key_value_heads") or self.heads)
            self.head_dim = int(c.get("head_dim") or self.hidden // self.heads)
            self.intermediate = int(c["intermediate_size"])
            self.vocab = int(c["vocab_size"])
            self.num_layers = int(c["num_hidden_layers"])
            self.experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
            self.top_k = int(c.get("num_experts_per_tok") or 0)
        except KeyError as e:
            raise TraceWriterError(f"the model config has no {e.args[0]!r}") from None
        self.names = trace_names(self.num_layers, c.get("model_type", ""), sparse_layers(c))
        self._known = set(self.names)
        self.tensors: dict[str, np.ndarray] = {}
        self.source_dtypes: dict[str, str] = {}
        self.tokens: int | None = None  # T, fixed by the first tap that shows it

    # -- shapes -------------------------------------------------------------------------------

    def _expected(self, name: str) -> list:
        """The expected shape of `name`, with "T" where the token count goes."""
        if name == "tokens":
            return [1, "T"]
        if name in ("embed", "final_norm"):
            return [1, "T", self.hidden]
        if name == "logits":
            return [1, "T", self.vocab]
        tap = name.split(".", 2)[2]
        return {
            "input_norm": [1, "T", self.hidden],
            "q": [1, self.heads, "T", self.head_dim],
            "k": [1, self.kv_heads, "T", self.head_dim],
            "v": [1, self.kv_heads, "T", self.head_dim],
            "q_norm": [1, self.heads, "T", self.head_dim],
            "k_norm": [1, self.kv_heads, "T", self.head_dim],
            "router_logits": [1, "T", self.experts],
            "router_topk_ids": [1, "T", self.top_k],
            "router_topk_weights": [1, "T", self.top_k],
            "q_rope": [1, self.heads, "T", self.head_dim],
            "k_rope": [1, self.kv_heads, "T", self.head_dim],
            "attn_probs": [1, self.heads, "T", "T"],
            "attn_out": [1, "T", self.heads * self.head_dim],
            "o_proj": [1, "T", self.hidden],
            "resid_attn": [1, "T", self.hidden],
            "post_norm": [1, "T", self.hidden],
            "mlp_act": [1, "T", self.intermediate],
            "mlp_out": [1, "T", self.hidden],
            "out": [1, "T", self.hidden],
        }[tap]

    @staticmethod
    def _match(expected: list, shape: tuple, t: int | None) -> int | None:
        """T implied by `shape` matching `expected` given the known T (None: no match)."""
        if len(expected) != len(shape):
            return None
        for d, s in zip(expected, shape, strict=False):
            if d == "T":
                if t is None:
                    t = int(s)
                elif s != t:
                    return None
            elif s != d:
                return None
        return t

    def _check_shape(self, name: str, shape: tuple) -> None:
        expected = self._expected(name)
        t = self.tokens
        new_t = self._match(expected, shape, t)
        if not new_t:  # no match, or T = 0
            why = ""
            if self._match(expected[1:], shape, t):
                why = " (the batch dimension is missing: shapes keep it, batch 1)"
            elif len(shape) == len(expected) and shape[0] != 1 and self._match(expected[1:], shape[1:], t):
                why = " (traces are batch 1)"
            elif t is not None and self._match(expected, shape, None):
                why = f" (T = {t} tokens, set by the earlier taps)"
            elif new_t == 0:
                why = " (no tokens)"
            show = "[" + ", ".join(str(t if (d == "T" and t is not None) else d) for d in expected) + "]"
            raise TraceWriterError(
                f"{name} has shape {list(shape)}, expected {show} for this model "
                f"(H={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads}, D={self.head_dim}, "
                f"I={self.intermediate}, V={self.vocab}){why}")
        self.tokens = new_t

    # -- public API ---------------------------------------------------------------------------

    def tap(self, name: str, array) -> None:
        """Record one tensor under its canonical name (see docs/trace-format.md)."""
        if name not in self._known:
            hint = ""
            if name.startswith("layers."):
                parts = name.split(".")
                if len(parts) == 3 and parts[2] in LAYER_TAPS + ROUTER_TAPS + ("q_norm", "k_norm") \
                        and parts[1].isdigit():
                    hint = f" (the model has {self.num_layers} layers: 0..{self.num_layers - 1})"
                elif len(parts) == 3:
                    hint = f" (layer tensors are {', '.join(LAYER_TAPS)})"
            if not hint:
                hint = (f"; names are tokens, embed, layers.{{i}}.{{{','.join(LAYER_TAPS)}}}, "
                        "final_norm, logits (docs/trace-format.md)")
            raise TraceWriterError(f"unknown trace name {name!r}{hint}")
        if name in self.tensors:
            raise TraceWriterError(f"{name} was tapped twice")
        a, src = _to_numpy(name, array)
        if name == "tokens":
            if a.dtype.kind not in "iu":
                raise TraceWriterError(f"tokens must be integer ids, got {a.dtype}")
            if a.ndim == 1:
                a = a[None, :]
            self._check_shape(name, a.shape)
            if a.size and (a.min() < 0 or a.max() >= self.vocab):
                raise TraceWriterError(f"token ids must lie in [0, {self.vocab}) for this model")
            a = a.astype(np.int64)
        elif name.rsplit(".", 1)[-1] in ID_TAPS:
            if a.dtype.kind not in "iu":
                raise TraceWriterError(f"{name} must be integer expert ids, got {src}")
            self._check_shape(name, a.shape)
            if a.size and (a.min() < 0 or a.max() >= self.experts):
                raise TraceWriterError(f"{name}: expert ids must lie in [0, {self.experts})")
            a = a.astype(np.int64)
        else:
            if a.dtype.kind != "f":
                raise TraceWriterError(f"{name} must be floating point, got {src}")
            if a.dtype == np.float16:
                raise TraceWriterError(f"{name} is float16: lockstep's tiers are f64, f32 and bf16")
            self._check_shape(name, a.shape)
        self.tensors[name] = np.ascontiguousarray(a)
        self.source_dtypes[name] = src

    def missing(self) -> list[str]:
        """Canonical names not tapped yet. Each one fails `lockstep compare` / `lockstep verify` as
        MISSING (the reference trace holds every canonical name; `tokens` alone may instead come from
        the `token_ids` metadata, which `save` turns into the tensor)."""
        return [n for n in self.names if n not in self.tensors]

    def _check_dtypes(self, dtype: str) -> None:
        allowed = {"f64": ("float64",), "f32": ("float32",), "bf16": ("bfloat16", "float32")}[dtype]
        hints = {
            "f64": " (JAX: jax.config.update('jax_enable_x64', True) before creating any array)",
            "f32": "",
            "bf16": "",
        }
        for name, src in self.source_dtypes.items():
            if name != "tokens" and name.rsplit(".", 1)[-1] not in ID_TAPS and src not in allowed:
                raise TraceWriterError(
                    f"{name} was computed in {src}, but the trace's dtype is {dtype}: every floating "
                    f"tensor must be {' or '.join(allowed)}{hints[dtype]}")

    def save(self, path, metadata: Mapping, weights: Mapping | None = None) -> str:
        """Write the trace. `metadata` needs `producer` (your port's name), `dtype` (`f64`, `f32`
        or `bf16`, the compute dtype: it selects the precision tier) and `token_ids` (unless
        `tokens` was tapped); `prompt` and anything else are kept as strings. Returns the path.
        `weights`: the parameter arrays the port computed with, by checkpoint name; their
        checksums go into the `weights_sha256` metadata (`weight_checksums`).
        A trace saved with tensors still `missing()` is written, but fails verification as MISSING."""
        meta = dict(metadata or {})
        for key in ("producer", "dtype"):
            if not meta.get(key):
                raise TraceWriterError(f"metadata needs {key!r} (producer: your port's name; "
                                       "dtype: f64, f32 or bf16)")
        dtype = str(meta["dtype"])
        if dtype not in DTYPES:
            raise TraceWriterError(f"metadata dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        ids = meta.get("token_ids")
        if isinstance(ids, str):
            try:
                ids = json.loads(ids)
            except json.JSONDecodeError:
                raise TraceWriterError(f"metadata token_ids must be a JSON array of ids, got {ids!r}") from None
        if ids is not None:
            ids = [int(i) for i in np.asarray(ids).reshape(-1).tolist()]
            if "tokens" in self.tensors:
                if self.tensors["tokens"].reshape(-1).tolist() != ids:
                    raise TraceWriterError("metadata token_ids differ from the tapped tokens")
            else:
                self.tap("tokens", np.asarray(ids, dtype=np.int64))
        elif "tokens" in self.tensors:
            ids = self.tensors["tokens"].reshape(-1).tolist()
        else:
            raise TraceWriterError("metadata needs 'token_ids' (the input ids), or tap 'tokens'")
        if len(self.tensors) < 2:
            raise TraceWriterError("nothing to save: tap at least one tensor besides tokens")
        self._check_dtypes(dtype)

        meta["token_ids"] = json.dumps(ids)
        meta.setdefault("num_layers", str(self.num_layers))
        if "model_type" in self.config:
            meta.setdefault("model_type", str(self.config["model_type"]))
        meta.setdefault("config", json.dumps(self.config, separators=(",", ":")))
        if self.model_dir is not None and "model_fingerprint" not in meta:
            try:
                meta["model_fingerprint"] = model_fingerprint(self.model_dir)
            except (OSError, ValueError, KeyError):
                pass  # a config without its checkpoint: no fingerprint
        if weights is not None:
            if not weights:
                raise TraceWriterError("weights is empty: give the port's parameter arrays by checkpoint name")
            meta["weights_sha256"] = json.dumps(weight_checksums(weights), separators=(",", ":"))
        meta.setdefault("writer", "lockstep_reference.writer")
        meta = {k: v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (list, dict, bool))
                                                 else str(v)) for k, v in meta.items()}

        store = STORE[dtype]
        out = {n: (t if t.dtype == np.int64 else t.astype(store)) for n, t in self.tensors.items()}
        from safetensors.numpy import save_file

        path = os.fspath(path)
        tmp = path + ".tmp"
        save_file(out, tmp, metadata=meta)
        os.replace(tmp, path)
        return path
