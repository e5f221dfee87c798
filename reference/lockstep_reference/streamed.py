"""A reference trace streamed layer by layer, for models too big for RAM in the trace's dtype.

    python -m lockstep_reference trace --model DIR --tokens 9707 --dtype f64 --streamed --out F.safetensors

(or a `trace-batch` job with `"streamed": true`), in any dtype: f64 (the pure-float64 oracle), f32 or
bf16 (the PyTorch reference). It computes exactly what `tracer.trace_model(model, ids, dtype)` computes
on a model loaded with `from_pretrained(dtype=...)` (the same transformers modules and functions, under
the same `pure_f64_patches` for f64, so there RMSNorm, RoPE and the softmax are float64), and writes the
same tensor names, but never holds more than one decoder layer's weights: a Qwen2.5-7B-size model is
61 GB in float64, one of its layers ~1.9 GB; a Qwen2.5-14B-size one is 29.5 GB in bf16 (more than this
machine's RAM), one of its layers 0.6 GB.

    embed        rows of model.embed_tokens.weight gathered one by one (safe_open get_slice), converted
                 to the dtype as from_pretrained converts them
    mask, RoPE   transformers' own create_causal_mask (eager: additive mask) and the rotary embedding
                 module (patched to float64 for f64), with the arguments Qwen2Model/LlamaModel.forward
                 passes
    layer i      a Qwen2DecoderLayer/LlamaDecoderLayer(config, i) built on the meta device, its stored
                 weights loaded (converted to the dtype) with load_state_dict(assign=True, strict),
                 run with attention_mask, position_embeddings, position_ids, cache=None,
                 use_cache=False, with the tracer's per-layer hooks (taps layers.{i}.*); then freed
    final_norm   the RMSNorm module with the stored model.norm.weight
    logits       lm_head.weight (model.embed_tokens.weight when tied): in f64 in row chunks of
                 `row_chunk` (the 152064 x 3584 head is 4.4 GB in float64); in f32 and bf16 in one
                 matmul, as the model's lm_head runs it (a GEMM's summation order may depend on its shape)

Measured on the make-7b model (Qwen2.5-7B config, bf16 shards), token [9707], 2 shared cores, f64: 88 s
(28 layers 57 s, ~2 s each mostly loading; final norm + lm_head 4 s; the model fingerprint, sha256 of
15 GB, 27 s), peak RSS 2.7 GB. On the small fixtures the streamed trace is bit-identical to the ordinary
trace on every tensor, in every dtype, except the f64 logits of several tokens when the head is read in
row chunks (a vocabulary above `row_chunk`): MKL's float64 matmul sums in an order that depends on the
matrix's width, so those differ in the last bits (~1e-15; the checks allow 1e-12).

Metadata is `tracer.trace_metadata`'s plus "streamed": "true". Checked in
reference/tests/check_reference.py against the ordinary trace on the small fixtures, in each dtype.
"""

from __future__ import annotations

import time
import types

import torch

from . import tracer
from .st_io import checkpoint_files, read_header

ROW_CHUNK = 16384


def _decoder_layer_class(model_type: str):
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    return {"qwen2": modeling_qwen2.Qwen2DecoderLayer, "llama": modeling_llama.LlamaDecoderLayer,
            "mistral": modeling_mistral.MistralDecoderLayer,
            "qwen3": modeling_qwen3.Qwen3DecoderLayer}[model_type]


# The decoder layers `_decoder_layer_class` builds (Qwen3-MoE is not streamed: its experts are fused
# from per-expert tensors at load time).
_STREAMED_TYPES = ("qwen2", "llama", "mistral", "qwen3")


class _Weights:
    """Stored tensors of a checkpoint folder read one at a time (safetensors safe_open), converted to
    `dtype` (as `from_pretrained(dtype=...)` converts them)."""

    def __init__(self, model_dir: str, dtype: torch.dtype):
        self.dtype = dtype
        self.path: dict[str, str] = {}
        self.shape: dict[str, list[int]] = {}
        # Converted tensors of a freed layer (`recycle`), by shape, for `get` to convert into; and
        # the storage of every tensor `get` converted (only those are recycled).
        self._spare: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._converted: set[int] = set()
        for path in checkpoint_files(model_dir):
            header, _ = read_header(path)
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if name in self.path:
                    raise ValueError(f"tensor {name} stored twice in {model_dir}")
                self.path[name] = path
                self.shape[name] = entry["shape"]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path[name], framework="pt") as f:
            t = f.get_tensor(name)
        if t.dtype == self.dtype:
            return t
        spare = self._spare.get(tuple(t.shape))
        out = spare.pop().copy_(t) if spare else t.to(self.dtype)
        self._converted.add(out.untyped_storage().data_ptr())
        return out

    def recycle(self, module: torch.nn.Module) -> None:
        """Keep the tensors `get` converted for `module` (a decoder layer that is no longer used) for
        the next layer's tensors of the same shapes to be converted into, in place (`copy_`, the same
        exact widening as `.to`). Each layer of a 7B model is 1.9 GB in float64: converted into fresh
        memory every time, the kernel zeroed 61 GB of new pages a pass; converting in place was
        6-8x faster (2 cores, 2026-12-03)."""
        for t in module.parameters():
            if t.untyped_storage().data_ptr() in self._converted:
                self._spare.setdefault(tuple(t.shape), []).append(t.detach())

    def drop_spares(self) -> None:
        """Free the recycled tensors (after the last layer)."""
        self._spare.clear()
        self._converted.clear()

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor, gathered one by one, as a [len(ids), cols] tensor."""
        from safetensors import safe_open

        with safe_open(self.path[name], framework="pt") as f:
            sl = f.get_slice(name)
            return torch.cat([sl[i:i + 1].to(self.dtype) for i in ids], dim=0)

    def row_range(self, name: str, begin: int, end: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path[name], framework="pt") as f:
            return f.get_slice(name)[begin:end].to(self.dtype)


def _load_layer(config, i: int, weights: _Weights):
    """Decoder layer `i` alone, in the weights' dtype, its weights from the checkpoint (strict: no key
    missing or extra)."""
    with torch.device("meta"):
        layer = _decoder_layer_class(config.model_type)(config, i)
    prefix = f"model.layers.{i}."
    state = {name[len(prefix):]: weights.get(name) for name in weights.path if name.startswith(prefix)}
    layer.load_state_dict(state, strict=True, assign=True)
    del state
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.device.type != "cpu" or t.dtype != weights.dtype:
            raise RuntimeError(f"layer {i} {name} is {t.dtype} on {t.device}")
    return layer.eval()


def load_config(model_dir: str):
    """The folder's config (AutoConfig) with eager attention, as `tracer.load_model` sets it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "eager"
    if config.model_type not in tracer._ARCHS:
        raise ValueError(f"unsupported model_type {config.model_type!r} (supported: {sorted(tracer._ARCHS)})")
    return config


class _Switch:
    """A recorder that forwards to `current`: the function wrappers and hooks are installed once per
    layer while several inputs run through it, each recorded into its own `_Recorder`."""

    def __init__(self, current):
        object.__setattr__(self, "current", current)

    def __getattr__(self, name):
        return getattr(self.current, name)

    def __setattr__(self, name, value):
        if name == "current":
            object.__setattr__(self, name, value)
        else:
            setattr(self.current, name, value)


def trace_model_streamed(model_dir: str, token_ids: list[int], dtype: str = "f64", row_chunk: int = ROW_CHUNK,
                         log=None, flush=None) -> tuple[dict[str, torch.Tensor], object]:
    """The trace in `dtype` ("f64": pure float64; "f32"; "bf16") of one forward pass (batch 1), layer by
    layer. Returns (tensors in trace order, config).

    With `flush(index, tensors)`, each part of a trace folder (before the layers, each layer, after them)
    is handed over as soon as it is complete and not kept: the returned dict is then empty, and at most
    one layer's taps are ever held."""
    flushes = None if flush is None else [flush]
    traces, config = trace_models_streamed(model_dir, [token_ids], dtype, row_chunk, log, flushes)
    return traces[0], config


def trace_models_streamed(model_dir: str, token_id_lists: list[list[int]], dtype: str = "f64",
                          row_chunk: int = ROW_CHUNK, log=None,
                          flushes=None) -> tuple[list[dict[str, torch.Tensor]], object]:
    """`trace_model_streamed` of several inputs at once: each decoder layer (and the lm_head) is read
    from the checkpoint once and every input runs through it in turn, each a separate batch-1 forward
    pass with its own trace (so each trace is exactly the one `trace_model_streamed` gives alone). For a
    model bigger than RAM this reads the checkpoint once instead of once per input. `flushes[j]` is
    input j's `flush`. Returns (one dict per input, config)."""
    import contextlib

    config = load_config(model_dir)
    if config.model_type not in _STREAMED_TYPES:
        raise ValueError(f"streamed traces support {sorted(_STREAMED_TYPES)}, not {config.model_type!r}")
    torch_dtype = tracer.TORCH_DTYPES[dtype]
    module, norm_cls, rope_cls = tracer._ARCHS[config.model_type]
    vocab = config.vocab_size
    if not token_id_lists:
        raise ValueError("no inputs to trace")
    for token_ids in token_id_lists:
        if not token_ids:
            raise ValueError("no tokens to trace")
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}) for this model")
    if flushes is not None and len(flushes) != len(token_id_lists):
        raise ValueError("one flush per input")
    weights = _Weights(model_dir, torch_dtype)
    n_layers = config.num_hidden_layers
    inputs = range(len(token_id_lists))
    recs = [tracer._Recorder(tracer.STORE_DTYPES[dtype]) for _ in inputs]
    for rec, token_ids in zip(recs, token_id_lists, strict=True):
        rec.tensors["tokens"] = torch.tensor([token_ids], dtype=torch.int64).clone()
        rec.qk_norm = config.model_type in tracer.QK_NORM_TYPES
    switch = _Switch(recs[0])
    flushed: list[list[str]] = [[] for _ in inputs]

    def hand_over(j: int, index: int) -> None:
        if flushes is not None:
            part = dict(recs[j].tensors)
            flushed[j].extend(part)
            recs[j].tensors.clear()
            flushes[j](index, part)

    # Qwen2Model picks each layer's mask by config.layer_types; LlamaModel has one causal mask;
    # MistralModel one sliding-window mask for every layer when config.sliding_window is set.
    if config.model_type == "mistral":
        kind = "full_attention" if config.sliding_window is None else "sliding_attention"
        layer_types = [kind] * n_layers
    else:
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers

    pure = tracer.pure_f64_patches() if dtype == "f64" else contextlib.nullcontext()
    with torch.no_grad(), pure, tracer._function_wrappers(switch):
        rope = rope_cls(config=config)
        states = []  # per input: (hidden, masks, position_embeddings, position_ids)
        for j, token_ids in enumerate(token_id_lists):
            switch.current = recs[j]
            embeds = weights.rows("model.embed_tokens.weight", token_ids).unsqueeze(0)
            recs[j].put("embed", embeds)
            hand_over(j, 0)
            position_ids = torch.arange(len(token_ids)).unsqueeze(0)
            mask_kwargs = {"config": config, "inputs_embeds": embeds, "attention_mask": None, "cache": None,
                           "position_ids": position_ids}
            masks = {"full_attention": module.create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = module.create_sliding_window_causal_mask(**mask_kwargs)
            states.append([embeds, masks, rope(embeds, position_ids), position_ids])
        for i in range(n_layers):
            t0 = time.time()
            layer = _load_layer(config, i, weights)
            t_load = time.time() - t0
            for j, state in enumerate(states):
                switch.current = recs[j]
                hidden, masks, position_embeddings, position_ids = state
                handles = tracer._layer_hooks(layer, i, switch, config.num_key_value_heads)
                try:
                    state[0] = layer(hidden, attention_mask=masks[layer_types[i]],
                                     position_embeddings=position_embeddings, position_ids=position_ids,
                                     cache=None, use_cache=False)
                finally:
                    for h in handles:
                        h.remove()
                hand_over(j, i + 1)
            weights.recycle(layer)
            del layer
            if log is not None:
                log(f"layer {i + 1}/{n_layers}: load {t_load:.1f} s, total {time.time() - t0:.1f} s "
                    f"({len(states)} input(s))")

        weights.drop_spares()
        t0 = time.time()
        norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps).to(torch_dtype)
        norm.weight.copy_(weights.get("model.norm.weight"))
        finals = []
        for j, state in enumerate(states):
            switch.current = recs[j]
            finals.append(norm(state[0]))
            recs[j].put("final_norm", finals[-1])
        del states

        logits, rows = lm_head_logits(weights, config, finals, torch_dtype,
                                      row_chunk if dtype == "f64" else None)
        row_chunk = row_chunk if dtype == "f64" else rows
        for j in inputs:
            recs[j].put("logits", logits[j])
            logits[j] = None
            hand_over(j, n_layers + 1)
        if log is not None:
            log(f"final norm + lm_head ({rows} rows, chunks of {row_chunk}): {time.time() - t0:.1f} s")

    expected = tracer.trace_names_for(config)
    out = []
    for j in inputs:
        seen = set(recs[j].tensors) | set(flushed[j])
        missing = [n for n in expected if n not in seen]
        extra = [n for n in seen if n not in expected]
        if missing or extra:
            raise RuntimeError(f"trace incomplete: missing {missing}, unexpected {extra}")
        out.append({name: recs[j].tensors[name] for name in expected if name in recs[j].tensors})
    return out, config


def lm_head_logits(weights, config, hiddens: list[torch.Tensor], dtype: torch.dtype,
                   row_chunk: int | None) -> tuple[list[torch.Tensor], int]:
    """The logits of each hidden state (`[..., hidden]` -> `[..., vocab]` in `dtype`), with
    lm_head.weight (model.embed_tokens.weight when tied) read once for all of them, `row_chunk`
    rows at a time (None: whole); and the number of rows."""
    head = "lm_head.weight" if "lm_head.weight" in weights.path else None
    if head is None:
        if not config.tie_word_embeddings:
            raise ValueError("no lm_head.weight stored and tie_word_embeddings is false")
        head = "model.embed_tokens.weight"
    rows = weights.shape[head][0]
    chunk = rows if row_chunk is None else row_chunk
    logits = [torch.empty((*hidden.shape[:-1], rows), dtype=dtype) for hidden in hiddens]
    for begin in range(0, rows, chunk):
        end = min(begin + chunk, rows)
        w = weights.row_range(head, begin, end)
        for out, hidden in zip(logits, hiddens, strict=True):
            out[..., begin:end] = torch.nn.functional.linear(hidden, w)
        del w
    return logits, rows


def streamed_metadata(model_dir: str, config, token_ids: list[int], dtype: str,
                      prompt: str | None) -> dict[str, str]:
    """`tracer.trace_metadata` plus "streamed": "true"."""
    meta = tracer.trace_metadata(model_dir, types.SimpleNamespace(config=config), token_ids, dtype, prompt)
    meta["streamed"] = "true"
    return meta


def trace_streamed(model_dir: str, out_path: str, token_ids: list[int] | None = None,
                   prompt: str | None = None, dtype: str = "f64", log=None) -> dict[str, torch.Tensor]:
    """Streamed trace in `dtype` of the model in `model_dir`, written to `out_path`. Returns the tensors."""
    if (token_ids is None) == (prompt is None):
        raise ValueError("give exactly one of token_ids and prompt")
    if prompt is not None:
        token_ids = tracer.tokenize(model_dir, prompt)
    if tracer.is_trace_folder(out_path):
        # A folder: every part written as soon as it is complete, with the metadata computed first.
        t0 = time.time()
        meta = streamed_metadata(model_dir, load_config(model_dir), token_ids, dtype, prompt)
        if log is not None:
            log(f"metadata (model fingerprint: sha256 of every stored tensor): {time.time() - t0:.1f} s")
        tracer.clear_parts(out_path)
        written: dict[str, torch.Tensor] = {}

        def flush(index: int, part: dict[str, torch.Tensor]) -> None:
            tracer.write_part(out_path, index, part, meta)
            # Names, dtypes and the token ids only: the values are in the files.
            written.update({k: (v if k == "tokens" else v[..., :0]) for k, v in part.items()})

        trace_model_streamed(model_dir, token_ids, dtype=dtype, log=log, flush=flush)
        return written
    tensors, config = trace_model_streamed(model_dir, token_ids, dtype=dtype, log=log)
    t0 = time.time()
    meta = streamed_metadata(model_dir, config, token_ids, dtype, prompt)
    if log is not None:
        log(f"metadata (model fingerprint: sha256 of every stored tensor): {time.time() - t0:.1f} s")
    tracer.write_safetensors(out_path, tensors, meta)
    return tensors


def trace_streamed_many(model_dir: str, jobs: list[tuple[str, list[int]]], dtype: str = "f64",
                        log=None) -> None:
    """Streamed traces in `dtype` of several token lists `(out_path, token_ids)` of one model, each
    layer read once for all of them (`trace_models_streamed`); each file (or trace folder) is exactly
    what `trace_streamed` writes for that job alone."""
    if not jobs:
        return
    config = load_config(model_dir)
    metas = [streamed_metadata(model_dir, config, ids, dtype, None) for _, ids in jobs]
    # Folders are written part by part as each is complete; files are written whole at the end.
    collected: list[dict[str, torch.Tensor]] = [{} for _ in jobs]
    flushes = []
    for j, ((out, _), meta) in enumerate(zip(jobs, metas, strict=True)):
        if tracer.is_trace_folder(out):
            tracer.clear_parts(out)
            flushes.append(lambda index, part, out=out, meta=meta: tracer.write_part(out, index, part, meta))
        else:
            flushes.append(lambda index, part, c=collected[j]: c.update(part))
    trace_models_streamed(model_dir, [ids for _, ids in jobs], dtype=dtype, log=log, flushes=flushes)
    expected = tracer.trace_names_for(config)
    for j, ((out, _), meta) in enumerate(zip(jobs, metas, strict=True)):
        if not tracer.is_trace_folder(out):
            tracer.write_safetensors(out, {n: collected[j][n] for n in expected}, meta)
            collected[j].clear()


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

