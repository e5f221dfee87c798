"""Op-level ("teacher forcing") reference: every traced op recomputed on the *test side's own inputs*.

End-to-end comparison judges a tensor after all the rounding accumulated before it, so a mistake smaller
than that accumulated noise (a softmax or an RMSNorm variance computed in bf16, RoPE frequencies
rounded to bf16) hides in it, or shows several ops later. Here each op of a test trace is recomputed
from the test trace's own copies of that op's inputs:

    embed        <- tokens                     q, k, v        <- input_norm
    input_norm   <- embed / layers.{i-1}.out   q_norm, k_norm <- q, k (Qwen3: per-head RMSNorm)
    q_rope, k_rope <- q_norm, k_norm (Qwen3) or q, k (positions 0..T-1)
    attn_probs   <- q_rope, k_rope (causal,     attn_out       <- attn_probs, v
                    the layer's sliding window)
    o_proj       <- attn_out                   resid_attn     <- layer input + o_proj
    post_norm    <- resid_attn                 mlp_act        <- post_norm
    mlp_out      <- mlp_act                    out            <- resid_attn + mlp_out
    final_norm   <- layers.{L-1}.out           logits         <- final_norm

and in Qwen3-MoE's sparse layers, in place of mlp_act / mlp_out:

    router_logits <- post_norm                 router_topk_weights <- router_logits
    mlp_out       <- post_norm, router_topk_ids, router_topk_weights (the experts on the test's routing)

twice: with transformers' own modules and functions in the tier's dtype (what the reference's kernels
make of exactly these inputs: its *local* rounding) and in pure float64 (`pure_f64_patches`: the exact
value of the op on these inputs). The verifier then judges the test's local error (test − exact)
against the reference's (reference − exact), op by op (crates/lockstep-verify/src/local.rs).

Every op is computed the way transformers 5.24's Qwen2/Llama decoder computes it in eager mode: the
module objects themselves (RMSNorm, Linear, act_fn, rotary embedding) and the modeling module's own
`apply_rotary_pos_emb`, `repeat_kv` and `eager_attention_forward` (looked up at call time, so the pure
float64 patches apply). Only the glue (reshapes, residual adds, the causal mask) is written here, as
the decoder layer writes it.

The in-memory path (`local_ops`) runs on a loaded model. The streamed path (an `OpsJob` with
`"streamed": true`, for models whose float64 copy does not fit in memory: a Qwen2.5-7B-size model is
61 GB in float64) computes the same ops with the same modules and functions, as streamed.py
computes a trace: the jobs of one model and tier run together (grouped as trace-batch
groups streamed traces, `batch.streamed_groups`), each decoder layer is built alone
(`streamed._load_layer`) and read from the checkpoint once in float64 and once in the tier's dtype,
every job's ops of that layer are computed on it, and it is freed. The embed op gathers the tokens'
rows of the stored embedding, final_norm is the RMSNorm module with the stored `model.norm.weight`,
logits are lm_head (the embedding when tied) in row chunks of `streamed.ROW_CHUNK` in float64 and in
one matmul in f32/bf16, as the model's lm_head runs it; the rotary embedding is a fresh module per
job (the state `reset_dynamic_rope` gives a loaded model). The test traces are read tensor by tensor
as the ops need them (safetensors `safe_open`), never whole. Held in memory: one decoder layer in
float64 (~1.9 GB at 7B) or the tier's dtype at a time, one row chunk of lm_head (0.5 GB in float64 at
7B; the whole head in f32/bf16), and the group's outputs until they are written: one layer's when the
outputs are trace folders (what the verifier asks for when it streams; each part written as its layer
is done), all of them for files (at 7B ~17 MB per token in float64 plus half that in f32, a quarter in
bf16, the attention probabilities aside). A test trace may be a file or a trace folder.
Outputs carry "streamed": "true" in their metadata. Checked against the in-memory path in
reference/tests/check_reference.py: bit-identical, except the float64 logits when the head is cut in
chunks (a vocab above `ROW_CHUNK`): MKL's dgemm sums in an order that depends on the matrix's width,
so they differ from the whole-head matmul in the last bits (~1e-15 on the fixtures). Measured on the
0.5B-shape fixture (24 layers, bf16-stored), one 100-token input, 2 cores: bf16 tier 3.8 s and 1.7 GB
peak RSS streamed against 7.5 s and 6.3 GB in memory; f64 tier 2.8 s, 1.6 GB against 6.0 s, 5.6 GB.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .batch import streamed_groups
from .protocol import OpsJob, parse_list
from .rope_scaling import reset_dynamic_rope
from .streamed import _STREAMED_TYPES, ROW_CHUNK, _load_layer, _Weights, lm_head_logits, load_config, peak_rss_mib
from .tracer import (
    _ARCHS,
    STORE_DTYPES,
    TORCH_DTYPES,
    clear_parts,
    is_trace_folder,
    load_model,
    pure_f64_patches,
    trace_names_for,
    write_part,
    write_trace,
)
from .windows import hf_layer_windows


def _causal_mask(t: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """The additive eager mask transformers builds for a causal batch without padding: 0 where a
    query may attend, the dtype's most negative value where it may not. Shape [1, 1, t, t]. With a
    sliding `window`, query i also may not see keys j <= i - window (`sliding_window_overlay`)."""
    blocked = torch.ones(t, t, dtype=torch.bool).triu(1)
    if window is not None:
        blocked |= torch.ones(t, t, dtype=torch.bool).tril(-window)
    return torch.zeros(t, t, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def _numerics(pure: bool):
    """`pure_f64_patches` when `pure` (float64 only), else nothing."""
    return pure_f64_patches() if pure else contextlib.nullcontext()


class _Test:
    """A test trace's tensors as the ops read them: whether present, and each one cast to the compute
    dtype `dtype` (exactly, for values the dtype holds). `get(name)` returns the stored tensor."""

    def __init__(self, names: Iterable[str], get: Callable[[str], torch.Tensor], dtype: torch.dtype):
        self.names = frozenset(names)
        self.get = get
        self.dtype = dtype

    def have(self, *names: str) -> bool:
        """Whether the test trace holds every one of `names`."""
        return all(n in self.names for n in names)

    def x(self, name: str) -> torch.Tensor:
        """Tensor `name` in the compute dtype."""
        return self.get(name).to(self.dtype)

    def ids(self, name: str) -> torch.Tensor:
        """Integer tensor `name` (token or expert ids) as int64."""
        return self.get(name).to(torch.int64)


class _Positions:
    """What every layer's attention of one input shares: batch b, length t, the rotary tables
    (`rope`, a rotary embedding module, on positions 0..t-1) and the causal mask of each layer's
    sliding window (`hf_layer_windows`), in `dtype`. Built inside `_numerics(pure)`."""

    def __init__(self, rope, config, b: int, t: int, dtype: torch.dtype):
        self.b, self.t = b, t
        positions = torch.arange(t, dtype=torch.int64).unsqueeze(0).expand(b, t)
        self.cos, self.sin = rope(torch.zeros(1, dtype=dtype), positions)
        self.windows = hf_layer_windows(config)
        self.masks = {w: _causal_mask(t, dtype, w) for w in set(self.windows)}

    def mask(self, i: int) -> torch.Tensor:
        """Layer `i`'s additive attention mask."""
        return self.masks[self.windows[i]]


def local_ops(model, test: dict[str, torch.Tensor], pure: bool) -> dict[str, torch.Tensor]:
    """Each traced op of `model` applied to the test trace's own inputs of that op.

    `test` maps trace names to tensors (any float dtype; cast to the model's dtype, exactly for values
    the dtype holds). An op whose input is absent from the test trace is left out. With `pure` the
    computation runs under `pure_f64_patches` (only for float64 models).
    """
    dt = model.dtype
    inner = model.model
    modeling = _ARCHS[model.config.model_type][0]
    inputs = _Test(test, test.__getitem__, dt)
    out: dict[str, torch.Tensor] = {}
    tokens = test["tokens"].to(torch.int64)
    with torch.no_grad(), _numerics(pure):
        out["embed"] = inner.embed_tokens(tokens)
        reset_dynamic_rope(inner)
        pos = _Positions(inner.rotary_emb, model.config, *tokens.shape, dt)
        for i, layer in enumerate(inner.layers):
            _layer_ops(layer, i, modeling, pos, inputs, out, pure)
        last = f"layers.{len(inner.layers) - 1}.out"
        if inputs.have(last):
            out["final_norm"] = inner.norm(inputs.x(last))
        if inputs.have("final_norm"):
            out["logits"] = model.lm_head(inputs.x("final_norm"))
    return out


def _layer_ops(layer, i: int, modeling, pos: _Positions, test: _Test, out: dict[str, torch.Tensor],
              pure: bool) -> None:
    """Decoder layer `i`'s ops (`layers.{i}.*`) on the test's inputs, into `out`: `layer` is the model's
    layer or one loaded alone (`streamed._load_layer`), `modeling` its transformers modeling module.
    Run inside `torch.no_grad()` and `_numerics(pure)`."""
    p = f"layers.{i}."
    prev = "embed" if i == 0 else f"layers.{i - 1}.out"
    attn, mlp = layer.self_attn, layer.mlp
    have, x = test.have, test.x

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.view(pos.b, pos.t, -1, attn.head_dim).transpose(1, 2)

    if have(prev):
        out[p + "input_norm"] = layer.input_layernorm(x(prev))
    if have(p + "input_norm"):
        h = x(p + "input_norm")
        out[p + "q"] = heads(attn.q_proj(h))
        out[p + "k"] = heads(attn.k_proj(h))
        out[p + "v"] = heads(attn.v_proj(h))
    qk = (p + "q", p + "k")
    if hasattr(attn, "q_norm"):  # Qwen3: the norm acts on [b, t, heads, D], as the module does
        if have(*qk):
            out[p + "q_norm"] = attn.q_norm(x(p + "q").transpose(1, 2)).transpose(1, 2)
            out[p + "k_norm"] = attn.k_norm(x(p + "k").transpose(1, 2)).transpose(1, 2)
        qk = (p + "q_norm", p + "k_norm")
    if have(*qk):
        q_rope, k_rope = modeling.apply_rotary_pos_emb(x(qk[0]), x(qk[1]), pos.cos, pos.sin)
        out[p + "q_rope"], out[p + "k_rope"] = q_rope, k_rope
    if have(p + "q_rope", p + "k_rope", p + "v"):
        _, probs = modeling.eager_attention_forward(
            attn, x(p + "q_rope"), x(p + "k_rope"), x(p + "v"), pos.mask(i),
            scaling=attn.scaling, dropout=0.0)
        out[p + "attn_probs"] = probs
    if have(p + "attn_probs", p + "v"):
        v = modeling.repeat_kv(x(p + "v"), attn.num_key_value_groups)
        o = torch.matmul(x(p + "attn_probs"), v).transpose(1, 2).contiguous()
        out[p + "attn_out"] = o.reshape(pos.b, pos.t, -1)
    if have(p + "attn_out"):
        out[p + "o_proj"] = attn.o_proj(x(p + "attn_out"))
    if have(prev, p + "o_proj"):
        out[p + "resid_attn"] = x(prev) + x(p + "o_proj")
    if have(p + "resid_attn"):
        out[p + "post_norm"] = layer.post_attention_layernorm(x(p + "resid_attn"))
    if hasattr(mlp, "experts"):  # Qwen3-MoE sparse layer
        _moe_ops(mlp, p, test, out, pure)
    elif have(p + "post_norm"):
        h = x(p + "post_norm")
        out[p + "mlp_act"] = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    if have(p + "mlp_act"):
        out[p + "mlp_out"] = mlp.down_proj(x(p + "mlp_act"))
    if have(p + "resid_attn", p + "mlp_out"):
        out[p + "out"] = x(p + "resid_attn") + x(p + "mlp_out")


def _moe_ops(mlp, p: str, test: _Test, out: dict, pure: bool) -> None:
    """The sparse block's ops: router_logits <- post_norm; router_topk_weights <- router_logits
    (softmax in float32, float64 when `pure`, top-k, norm_topk_prob, cast to the model dtype);
    mlp_out <- post_norm, router_topk_ids, router_topk_weights (the experts on the test's routing).
    The ids are integers, not judged as an op (the end-to-end comparison checks them)."""
    gate = mlp.gate
    have, x = test.have, test.x
    if have(p + "post_norm"):
        out[p + "router_logits"] = nn.functional.linear(x(p + "post_norm"), gate.weight)
    if have(p + "router_logits"):
        logits = x(p + "router_logits")
        probs = nn.functional.softmax(logits, dim=-1, dtype=logits.dtype if pure else torch.float)
        top, _ = torch.topk(probs, gate.top_k, dim=-1)
        if gate.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        out[p + "router_topk_weights"] = top.to(logits.dtype)
    if have(p + "post_norm", p + "router_topk_ids", p + "router_topk_weights"):
        h = x(p + "post_norm")
        b, t, hid = h.shape
        ids = test.ids(p + "router_topk_ids").reshape(b * t, -1)
        weights = x(p + "router_topk_weights").reshape(b * t, -1)
        out[p + "mlp_out"] = mlp.experts(h.reshape(b * t, hid), ids, weights).reshape(b, t, hid)


def _ordered(config, tensors: dict[str, torch.Tensor], store: torch.dtype, tokens) -> dict[str, torch.Tensor]:
    """`tokens` (unless None: a later part of a trace folder), then the computed ops in trace order, each
    in the `store` dtype."""
    res = {} if tokens is None else {"tokens": tokens}
    for name in trace_names_for(config):
        if name in tensors:
            res[name] = tensors[name].detach().to(store).contiguous()
    return res


def _metadata(job: OpsJob, tokens: torch.Tensor) -> dict[str, str]:
    """What both outputs of `job` record (each adds its dtype and whether it is pure float64: `_output_metadata`)."""
    return {"producer": "transformers (op-level, on the test trace's inputs)",
            "test_trace": job.test, "token_ids": json.dumps(tokens.flatten().tolist())}


def _output_metadata(meta: dict[str, str], dtype: str) -> dict[str, str]:
    """`meta` of the output in `dtype` ("f64" is the pure-f64 one)."""
    return {**meta, "dtype": dtype, "pure_f64": "true" if dtype == "f64" else "false"}


def _write(path: str, config, ops: dict[str, torch.Tensor], dtype: str, tokens: torch.Tensor,
           meta: dict[str, str]) -> None:
    """The ops of one output (`dtype`'s: "f64" is the pure-f64 one), stored as a trace of `dtype` is: a
    trace file, or a trace folder when `path` is one (`tracer.write_trace`)."""
    write_trace(path, _ordered(config, ops, STORE_DTYPES[dtype], tokens), _output_metadata(meta, dtype))


def run_jobs(jobs: list[OpsJob], row_chunk: int | None = None) -> None:
    """Run op-level jobs: each `{"model", "test", "dtype", "out_exact", "out_reference", "streamed"}`
    writes the pure-f64 local ops (`out_exact`) and, unless dtype is f64, transformers' own local ops in
    `dtype` (`out_reference`) for the test trace `test`. Models are loaded once per (model, dtype); the jobs
    with `"streamed": true` run layer by layer (`_run_streamed_group`, lm_head in row chunks of
    `row_chunk`, default `streamed.ROW_CHUNK`), after the others."""
    models: dict[tuple[str, str], object] = {}

    def get(model_dir: str, dtype: str):
        key = (model_dir, dtype)
        if key not in models:
            # Keep at most the f64 model and one other: the jobs of models whose f64 copy does not fit
            # in memory are streamed.
            for k in [k for k in models if k[1] != "f64" and k != key]:
                del models[k]
            models[key] = load_model(model_dir, dtype)
        return models[key]

    for job in jobs:
        if job.streamed:
            continue
        test = _load_test(job.test)
        tokens = test["tokens"].to(torch.int64)
        meta = _metadata(job, tokens)
        exact_model = get(job.model, "f64")
        _write(job.out_exact, exact_model.config, local_ops(exact_model, test, pure=True), "f64", tokens, meta)
        if job.dtype != "f64":
            m = get(job.model, job.dtype)
            _write(job.out_reference, m.config, local_ops(m, test, pure=False), job.dtype, tokens, meta)
    models.clear()
    for group in _streamed_groups([j for j in jobs if j.streamed]):
        _run_streamed_group(group, row_chunk)


def ops_batch(jobs_file: str) -> None:
    """`python -m lockstep_reference ops-batch JOBS.json` (see `run_jobs`)."""
    run_jobs(parse_list(OpsJob, jobs_file))


# ---------------------------------------------------------------------------------------------------
# Streamed: one decoder layer in memory at a time


def _test_reader(path: str) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The tensor names of the test trace `path` (a file, or a trace folder of part files) and a function
    reading one of them (its file opened for each read, so nothing of it stays mapped)."""
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
             if os.path.isdir(path) else [path])
    where: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    if "tokens" not in where:
        raise ValueError(f"{path}: no tokens tensor")

    def get(name: str) -> torch.Tensor:
        with safe_open(where[name], framework="pt") as f:
            return f.get_tensor(name)

    return list(where), get


def _load_test(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the test trace `path` (a file, or a trace folder)."""
    if not os.path.isdir(path):
        test = load_file(path)
        if "tokens" not in test:
            raise ValueError(f"{path}: no tokens tensor")
        return test
    names, get = _test_reader(path)
    return {name: get(name) for name in names}


class _LayerCache:
    """A test trace reader (`_test_reader`'s `get`) that keeps what it read until `clear`: the
    streamed passes clear it at each layer, so at most one layer's inputs are held."""

    def __init__(self, read: Callable[[str], torch.Tensor]):
        self.read = read
        self.held: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.held:
            self.held[name] = self.read(name)
        return self.held[name]

    def clear(self) -> None:
        self.held.clear()


def _streamed_groups(jobs: list[OpsJob]) -> list[list[OpsJob]]:
    """The streamed jobs grouped as trace-batch groups streamed traces (`batch.streamed_groups`: by
    model and dtype, in order, as many tokens as the memory available holds or one longer job), the
    number of tokens read from each test trace."""
    sized = []
    for job in jobs:
        ids = _test_reader(job.test)[1]("tokens").flatten().tolist()
        sized.append(types.SimpleNamespace(model=job.model, dtype=job.dtype, tokens=ids, job=job))
    # Each group holds its exact ops in float64 and the reference's in the tier's stored dtype.
    exact_and_reference = {"f64": 8, "f32": 8 + 4, "bf16": 8 + 2}
    groups = streamed_groups(sized, value_bytes=lambda dt: exact_and_reference[dt])
    return [[s.job for s in group] for group in groups]


class _Pass:
    """One dtype's computation over a group of jobs: "f64" (pure float64, the exact ops) or the tier's
    (transformers' own ops). Holds the checkpoint reader in that dtype (`streamed._Weights`), each
    job's test inputs, positions (rotary tables, masks) and ops computed so far."""

    def __init__(self, model_dir: str, config, dtype: str, tests: list[tuple[list[str], Callable]]):
        self.dtype = dtype
        self.pure = dtype == "f64"
        self.weights = _Weights(model_dir, TORCH_DTYPES[dtype])
        self.tests = [_Test(names, get, self.weights.dtype) for names, get in tests]
        self.outs: list[dict[str, torch.Tensor]] = [{} for _ in tests]
        rope_cls = _ARCHS[config.model_type][2]
        with torch.no_grad(), _numerics(self.pure):
            self.positions = [_Positions(rope_cls(config=config), config, *t.ids("tokens").shape,
                                         self.weights.dtype) for t in self.tests]

    def embed(self) -> None:
        """Each job's embed op: its tokens' rows of the stored embedding, in this pass's dtype."""
        for test, pos, out in zip(self.tests, self.positions, self.outs, strict=True):
            ids = test.ids("tokens").flatten().tolist()
            out["embed"] = self.weights.rows("model.embed_tokens.weight", ids).view(pos.b, pos.t, -1)

    def layer(self, config, i: int) -> None:
        """Each job's ops of decoder layer `i`, the layer loaded alone from the checkpoint, then freed."""
        layer = _load_layer(config, i, self.weights)
        modeling = _ARCHS[config.model_type][0]
        with torch.no_grad(), _numerics(self.pure):
            for test, pos, out in zip(self.tests, self.positions, self.outs, strict=True):
                _layer_ops(layer, i, modeling, pos, test, out, self.pure)
        self.weights.recycle(layer)

    def head(self, config, row_chunk: int) -> None:
        """Each job's final_norm (the RMSNorm module with the stored weight) and logits (lm_head, or the
        embedding when tied: read once for all jobs, in row chunks of `row_chunk` in float64, in one
        matmul otherwise)."""
        norm_cls = _ARCHS[config.model_type][1]
        last = f"layers.{config.num_hidden_layers - 1}.out"
        with torch.no_grad(), _numerics(self.pure):
            norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps).to(self.weights.dtype)
            norm.weight.copy_(self.weights.get("model.norm.weight"))
            for test, out in zip(self.tests, self.outs, strict=True):
                if test.have(last):
                    out["final_norm"] = norm(test.x(last))
            todo = [(test.x("final_norm"), out) for test, out in zip(self.tests, self.outs, strict=True)
                    if test.have("final_norm")]
            if todo:
                self._logits(config, todo, row_chunk)

    def _logits(self, config, todo: list[tuple[torch.Tensor, dict]], row_chunk: int) -> None:
        """`out["logits"]` of each (hidden, out) in `todo`, the head read once (in row chunks for the
        pure pass)."""
        logits, _ = lm_head_logits(self.weights, config, [hidden for hidden, _ in todo],
                                   self.weights.dtype, row_chunk if self.pure else None)
        for (_, out), lg in zip(todo, logits, strict=True):
            out["logits"] = lg


class _Outputs:
    """Where the ops of one group's jobs go. A job whose output is a trace folder (`tracer.is_trace_folder`:
    the verifier names one when the model is streamed) gets each part as soon as it is complete (part 0
    the tokens and embed, part i + 1 layer i, then final_norm and logits), so the group holds one
    layer's ops; a file output is written whole at the end."""

    def __init__(self, config, jobs: list[OpsJob], passes: list[_Pass], tokens: list[torch.Tensor]):
        self.config = config
        self.jobs = jobs
        self.passes = passes
        self.tokens = tokens
        self.meta = [{**_metadata(job, t), "streamed": "true"} for job, t in zip(jobs, tokens, strict=True)]
        for job in jobs:
            for p in passes:
                if is_trace_folder(self._path(job, p)):
                    clear_parts(self._path(job, p))

    def _path(self, job: OpsJob, p: _Pass) -> str:
        return job.out_exact if p.pure else job.out_reference

    def part_done(self, index: int) -> None:
        """Writes part `index` (the ops computed since the last part) of every folder output and frees it."""
        for j, job in enumerate(self.jobs):
            for p in self.passes:
                path = self._path(job, p)
                if not is_trace_folder(path):
                    continue
                tokens = self.tokens[j] if index == 0 else None
                part = _ordered(self.config, p.outs[j], STORE_DTYPES[p.dtype], tokens)
                if part:
                    write_part(path, index, part, _output_metadata(self.meta[j], p.dtype))
                p.outs[j] = {}

    def finish(self) -> None:
        """Writes the file outputs (whole)."""
        for j, job in enumerate(self.jobs):
            for p in self.passes:
                path = self._path(job, p)
                if not is_trace_folder(path):
                    _write(path, self.config, p.outs[j], p.dtype, self.tokens[j], self.meta[j])
                p.outs[j] = {}  # written: freed before the next output is


def _run_streamed_group(jobs: list[OpsJob], row_chunk: int | None) -> None:
    """The jobs of one model and dtype, layer by layer: each decoder layer read once in float64 and once
    in the tier's dtype for all of them. Each output is the in-memory path's (`run_jobs`; the float64
    logits up to their last bits when lm_head is cut in chunks), its metadata with "streamed": "true";
    folder outputs are written a part at a time (`_Outputs`). Prints one line to stderr when done."""
    t0 = time.time()
    model_dir, tier = jobs[0].model, jobs[0].dtype
    config = load_config(model_dir)
    if config.model_type not in _STREAMED_TYPES:
        raise ValueError(f"streamed op-level jobs support {sorted(_STREAMED_TYPES)}, not {config.model_type!r}")
    readers = [_test_reader(j.test) for j in jobs]
    # Each test tensor read from its file once per layer for both passes (the float64 one and the
    # tier's), not once per use in each (7B: ~4,800 reads, ~5 s of one core, 2026-12-03).
    caches = [_LayerCache(get) for _, get in readers]
    tests = [(names, cache.get) for (names, _), cache in zip(readers, caches, strict=True)]
    passes = [_Pass(model_dir, config, dtype, tests) for dtype in dict.fromkeys(("f64", tier))]
    outputs = _Outputs(config, jobs, passes, [get("tokens").to(torch.int64) for _, get in readers])
    for p in passes:
        p.embed()
    outputs.part_done(0)
    for i in range(config.num_hidden_layers):
        for cache in caches:
            cache.clear()
        for p in passes:
            p.layer(config, i)
        outputs.part_done(i + 1)
    for cache in caches:
        cache.clear()
    for p in passes:
        p.weights.drop_spares()
        p.head(config, ROW_CHUNK if row_chunk is None else row_chunk)
    outputs.part_done(config.num_hidden_layers + 1)
    outputs.finish()
    print(f"wrote {len(jobs)} streamed op-level job(s) of {model_dir} in dtype {tier} (each layer read once "
          f"per dtype, {time.time() - t0:.0f} s, peak RSS {peak_rss_mib():.0f} MiB)", file=sys.stderr)


def to_bf16(src: str, dst: str) -> None:
    """Write a bf16-stored copy of the checkpoint folder `src` to `dst` (weights rounded to nearest
    even, as `from_pretrained(..., dtype=torch.bfloat16)` rounds them; config `dtype` bfloat16; the
    other files copied). The bf16 tier's oracle must run on the very weights the bf16 run uses, so
    `selftest` judges its bf16 tier on such a copy. Written to `dst + ".partial"`, then renamed."""
    import os
    import shutil

    from safetensors.torch import save_file

    from .st_io import checkpoint_files

    tensors: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(src):
        tensors.update(load_file(f))
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            continue
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
