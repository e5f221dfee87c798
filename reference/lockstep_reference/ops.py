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
"""

from __future__ import annotations

import contextlib
import json

import torch
from safetensors.torch import load_file
from torch import nn

from .protocol import OpsJob, parse_list
from .rope_scaling import reset_dynamic_rope
from .tracer import _ARCHS, STORE_DTYPES, load_model, pure_f64_patches, trace_names_for, write_safetensors
from .windows import hf_layer_windows


def _causal_mask(t: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """The additive eager mask transformers builds for a causal batch without padding: 0 where a
    query may attend, the dtype's most negative value where it may not. Shape [1, 1, t, t]. With a
    sliding `window`, query i also may not see keys j <= i - window (`sliding_window_overlay`)."""
    blocked = torch.ones(t, t, dtype=torch.bool).triu(1)
    if window is not None:
        blocked |= torch.ones(t, t, dtype=torch.bool).tril(-window)
    return torch.zeros(t, t, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]

def local_ops(model, test: dict[str, torch.Tensor], pure: bool) -> dict[str, torch.Tensor]:
    """Each traced op of `model` applied to the test trace's own inputs of that op.

    `test` maps trace names to tensors (any float dtype; cast to the model's dtype, exactly for values
    the dtype holds). An op whose input is absent from the test trace is left out. With `pure` the
    computation runs under `pure_f64_patches` (only for float64 models).
    """
    dt = model.dtype
    inner = model.model
    modeling = _ARCHS[model.config.model_type][0]
    out: dict[str, torch.Tensor] = {}

    def have(*names: str) -> bool:
        return all(n in test for n in names)

    def x(name: str) -> torch.Tensor:
        return test[name].to(dt)

    tokens = test["tokens"].to(torch.int64)
    b, t = tokens.shape
    ctx = pure_f64_patches() if pure else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out["embed"] = inner.embed_tokens(tokens)
        positions = torch.arange(t, dtype=torch.int64).unsqueeze(0).expand(b, t)
        reset_dynamic_rope(inner)
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dt), positions)
        windows = hf_layer_windows(model.config)
        masks = {w: _causal_mask(t, dt, w) for w in set(windows)}
        prev = "embed"
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            hd = attn.head_dim

            def heads(y: torch.Tensor, hd: int = hd) -> torch.Tensor:
                return y.view(b, t, -1, hd).transpose(1, 2)

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
                q_rope, k_rope = modeling.apply_rotary_pos_emb(x(qk[0]), x(qk[1]), cos, sin)
                out[p + "q_rope"], out[p + "k_rope"] = q_rope, k_rope
            if have(p + "q_rope", p + "k_rope", p + "v"):
                _, probs = modeling.eager_attention_forward(
                    attn, x(p + "q_rope"), x(p + "k_rope"), x(p + "v"), masks[windows[i]],
                    scaling=attn.scaling, dropout=0.0)
                out[p + "attn_probs"] = probs
            if have(p + "attn_probs", p + "v"):
                v = modeling.repeat_kv(x(p + "v"), attn.num_key_value_groups)
                o = torch.matmul(x(p + "attn_probs"), v).transpose(1, 2).contiguous()
                out[p + "attn_out"] = o.reshape(b, t, -1)
            if have(p + "attn_out"):
                out[p + "o_proj"] = attn.o_proj(x(p + "attn_out"))
            if have(prev, p + "o_proj"):
                out[p + "resid_attn"] = x(prev) + x(p + "o_proj")
            if have(p + "resid_attn"):
                out[p + "post_norm"] = layer.post_attention_layernorm(x(p + "resid_attn"))
            if hasattr(mlp, "experts"):  # Qwen3-MoE sparse layer
                _moe_ops(mlp, p, x, lambda n: test[n].to(torch.int64), have, out, pure)
            elif have(p + "post_norm"):
                h = x(p + "post_norm")
                out[p + "mlp_act"] = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
            if have(p + "mlp_act"):
                out[p + "mlp_out"] = mlp.down_proj(x(p + "mlp_act"))
            if have(p + "resid_attn", p + "mlp_out"):
                out[p + "out"] = x(p + "resid_attn") + x(p + "mlp_out")
            prev = p + "out"
        if have(prev):
            out["final_norm"] = inner.norm(x(prev))
        if have("final_norm"):
            out["logits"] = model.lm_head(x("final_norm"))
    return out

def _moe_ops(mlp, p: str, x, ids_of, have, out: dict, pure: bool) -> None:
    """The sparse block's ops: router_logits <- post_norm; router_topk_weights <- router_logits
    (softmax in float32, float64 when `pure`, top-k, norm_topk_prob, cast to the model dtype);
    mlp_out <- post_norm, router_topk_ids, router_topk_weights (the experts on the test's routing).
    The ids are integers, not judged as an op (the end-to-end comparison checks them)."""
    gate = mlp.gate
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
        ids = ids_of(p + "router_topk_ids").reshape(b * t, -1)
        weights = x(p + "router_topk_weights").reshape(b * t, -1)
        out[p + "mlp_out"] = mlp.experts(h.reshape(b * t, hid), ids, weights).reshape(b, t, hid)


def _ordered(model, tensors: dict[str, torch.Tensor], store: torch.dtype, tokens) -> dict[str, torch.Tensor]:
    res = {"tokens": tokens}
    for name in trace_names_for(model.config):
        if name in tensors:
            res[name] = tensors[name].detach().to(store).contiguous()
    return res

def run_jobs(jobs: list[OpsJob]) -> None:
    """Run op-level jobs: each `{"model", "test", "dtype", "out_exact", "out_reference"}` writes the
    pure-f64 local ops (`out_exact`) and, unless dtype is f64, transformers' own local ops in `dtype`
    (`out_reference`) for the test trace `test`. Models are loaded once per (model, dtype)."""
    models: dict[tuple[str, str], object] = {}

    def get(model_dir: str, dtype: str):
        key = (model_dir, dtype)
        if key not in models:
            # Keep at most the f64 model and one other: fixtures are small, 7B models are refused
            # by the caller (their f64 copy does not fit in memory).
            for k in [k for k in models if k[1] != "f64" and k != key]:
                del models[k]
            models[key] = load_model(model_dir, dtype)
        return models[key]

    for job in jobs:
        test = load_file(job.test)
        if "tokens" not in test:
            raise ValueError(f"{job.test}: no tokens tensor")
        tokens = test["tokens"].to(torch.int64)
        meta = {"producer": "transformers (op-level, on the test trace's inputs)",
                "test_trace": job.test, "token_ids": json.dumps(tokens.flatten().tolist())}
        exact_model = get(job.model, "f64")
        exact = local_ops(exact_model, test, pure=True)
        write_safetensors(job.out_exact, _ordered(exact_model, exact, torch.float64, tokens),
                          {**meta, "dtype": "f64", "pure_f64": "true"})
        if job.dtype != "f64":
            m = get(job.model, job.dtype)
            ref = local_ops(m, test, pure=False)
            write_safetensors(job.out_reference, _ordered(m, ref, STORE_DTYPES[job.dtype], tokens),
                              {**meta, "dtype": job.dtype, "pure_f64": "false"})


def ops_batch(jobs_file: str) -> None:
    """`python -m lockstep_reference ops-batch JOBS.json` (see `run_jobs`)."""
    run_jobs(parse_list(OpsJob, jobs_file))


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
