"""A compact Qwen2 / Llama forward pass in JAX (CPU) that emits a lockstep trace.

A template for real ports: it loads the checkpoint's safetensors, computes one forward pass the way
Hugging Face transformers does, taps every intermediate tensor through lockstep's trace writer, and
saves a trace that `lockstep verify --model DIR --port-trace FILE` checks against the reference.

    python examples/jax_qwen2/port.py --model DIR (--tokens 1,2,3 | --prompt TEXT) \
        --dtype f32|bf16|f64 [--mistake M] --out FILE

Precision (what a careful port does, and what the reference does):
- f64: everything float64 (`jax_enable_x64`), including RMSNorm, RoPE tables and softmax: the pure
  float64 computation lockstep's f64 tier compares against at 1e-9.
- f32: float32 throughout, every matmul at `Precision.HIGHEST` (on TPU the default precision is a
  single bf16 pass, on recent GPUs TF32).
- bf16: bf16 weights and activations, rounded where transformers rounds: matmuls accumulate in
  float32 and round once (bias added before rounding); RMSNorm statistics in float32, normalized
  value rounded to bf16, then times the bf16 weight; RoPE tables (inv_freq, cos, sin) in float32,
  cast to bf16; scores = q·kᵀ rounded, then × head_dim^-0.5 in float32 (the scalar is *not*
  rounded to bf16), rounded; softmax in float32, rounded; silu in float32, rounded; every
  elementwise product and residual add rounded to bf16.

`--mistake` switches on one classic porting mistake (to see lockstep catch it and name where it
enters); see MISTAKES below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MISTAKES = {
    "default-precision":
        "matmuls at JAX's default precision (the `precision=` argument dropped). XLA:CPU computes f32 "
        "dots in full f32 at any precision, so on CPU this is a no-op; on TPU it is one bf16 pass, on "
        "GPU TF32",
    "default-precision-tpu":
        "what default precision does on a TPU, emulated on CPU: every f32 matmul's operands rounded "
        "to bf16 (one pass, f32 accumulation)",
    "rope-bf16-inv-freq":
        "RoPE inv_freq computed in bf16 (1 / theta ** (arange(0, D, 2, dtype=bf16) / D): theta, the "
        "power and the quotient rounded to bf16) and the angles arange(T) * inv_freq left in bf16 "
        "(an integer array times a bf16 array is bf16 in JAX); cos and sin as careful",
    "no-qkv-bias": "the q/k/v projection biases dropped",
    "interleaved-rope":
        "RoPE rotating interleaved pairs (2i, 2i+1), as Meta's original code does, instead of HF's "
        "rotate_half pairs (i, i + D/2)",
    "eps-outside-sqrt": "RMSNorm as x / (sqrt(mean(x²)) + eps) instead of x · rsqrt(mean(x²) + eps)",
    "softmax-bf16":
        "attention softmax in bf16 instead of float32 (jax.nn.softmax on bf16 scores): s - max, each "
        "exp, the sum (accumulated in float32) and each quotient rounded to bf16",
    "norm-variance-bf16":
        "RMSNorm variance in bf16, as a port that forgets to upcast: x² rounded to bf16 and mean(x²) "
        "(accumulated in float32, as jnp.mean of a bf16 array) rounded to bf16; rsqrt and the rest as "
        "careful",
    "residual-bf16":
        "residual adds in the wrong dtype: rounded to bf16 in the f32 and f64 tiers (a residual stream "
        "kept in bf16), left in float32 in the bf16 tier (a residual stream upcast and never cast back)",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", help="token ids, e.g. 1,2,3")
    g.add_argument("--prompt", help="text, tokenized with the folder's tokenizer.json (no special tokens)")
    ap.add_argument("--dtype", required=True, choices=["f64", "f32", "bf16"])
    ap.add_argument("--mistake", choices=sorted(MISTAKES), help="switch on one classic porting mistake")
    ap.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    return ap.parse_args(argv)


def setup_jax(dtype: str):
    """Import JAX for CPU; f64 needs `jax_enable_x64` before any array is created."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    if dtype == "f64":
        jax.config.update("jax_enable_x64", True)
    return jax


def tokenize(model_dir: str, text: str) -> list[int]:
    """The ids of `text` from the folder's tokenizer.json (no special tokens added)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(
        text, add_special_tokens=False).ids


def run(model_dir: str, ids: list[int], dtype: str, out: str, mistake: str | None = None,
        prompt: str | None = None, port: Qwen2Port | None = None) -> str:
    """One forward pass of the port on `ids`, every tensor tapped, saved as a trace at `out`.
    Returns the producer name. (`setup_jax(dtype)` first; pass `port` to reuse loaded weights.)"""
    import jax
    import jax.numpy as jnp

    try:
        from lockstep_reference.writer import TraceWriter
    except ImportError:  # not pip-installed: use the repository's copy
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../reference"))
        from lockstep_reference.writer import TraceWriter

    if port is None:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        port = Qwen2Port(jax, jnp, model_dir, cfg, dtype)
    port.set_mistake(mistake)
    writer = TraceWriter(model_dir)
    port.forward(ids, writer.tap)
    producer = "jax_qwen2" + (f"[{mistake}]" if mistake else "")
    meta = {
        "producer": producer,
        "dtype": dtype,
        "token_ids": ids,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "matmul_precision": "DEFAULT" if mistake == "default-precision" else "HIGHEST",
        "attn_implementation": "eager",
    }
    if dtype == "f64":
        meta["pure_f64"] = "true"
    if mistake:
        meta["mistake"] = mistake
    if prompt is not None:
        meta["prompt"] = prompt
    # The parameters the port computes with: the verifier checks them against the checkpoint.
    writer.save(out, meta, weights=port.w)
    return producer


def main(argv=None):
    args = parse_args(argv)
    setup_jax(args.dtype)
    if args.tokens is not None:
        ids = [int(t) for t in args.tokens.split(",") if t.strip()]
    else:
        ids = tokenize(args.model, args.prompt)
    if not ids:
        sys.exit("error: no tokens")
    producer = run(args.model, ids, args.dtype, args.out, args.mistake, args.prompt)
    print(f"wrote {args.out}: {producer}, {len(ids)} tokens, dtype {args.dtype}")


class Qwen2Port:
    """One Qwen2 (or Llama) forward pass, batch 1, no KV cache, eager attention."""

    def __init__(self, jax, jnp, model_dir: str, cfg: dict, dtype: str, mistake: str | None = None):
        self.jax, self.jnp = jax, jnp
        self.set_mistake(mistake)
        # cdt: storage/compute dtype of activations; odt: "opmath", where transformers computes
        # norms, softmax and activations and where matmuls accumulate.
        self.cdt = {"f64": jnp.float64, "f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
        self.odt = jnp.float64 if dtype == "f64" else jnp.float32

        self.model_type = cfg["model_type"]
        if self.model_type not in ("qwen2", "llama"):
            raise SystemExit(f"error: model_type {self.model_type!r} is not qwen2 or llama")
        if cfg.get("use_sliding_window"):
            raise SystemExit("error: sliding-window attention is not implemented")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise SystemExit(f"error: RoPE type {rope.get('rope_type')!r} is not implemented")
        self.theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.heads
        self.layers = cfg["num_hidden_layers"]
        self.eps = float(cfg["rms_norm_eps"])
        # Qwen2 always has q/k/v biases; Llama has them when attention_bias is set.
        self.qkv_bias = self.model_type == "qwen2" or bool(cfg.get("attention_bias"))
        if self.model_type == "llama" and cfg.get("mlp_bias"):
            raise SystemExit("error: mlp_bias is not implemented")

        w = load_safetensors(model_dir)
        if self.qkv_bias and "model.layers.0.self_attn.q_proj.bias" not in w:
            raise SystemExit(f"error: {model_dir} has no q/k/v biases, but {self.model_type} needs them")
        if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in w:
            raise SystemExit("error: untied model without lm_head.weight")
        # The weights in the compute dtype (f32 -> bf16 rounds to nearest even, as torch does).
        self.w = {k: v.astype(self.cdt) for k, v in w.items()}
        self.lm_head = self.w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) \
            else self.w["lm_head.weight"]

    def set_mistake(self, mistake: str | None):
        """Switch one of MISTAKES on (None: the careful port)."""
        if mistake is not None and mistake not in MISTAKES:
            raise ValueError(f"unknown mistake {mistake!r} (known: {', '.join(MISTAKES)})")
        self.mistake = mistake
        self.precision = None if mistake == "default-precision" else self.jax.lax.Precision.HIGHEST

    # -- building blocks, each rounding where transformers rounds --------------------------------

    def matmul(self, a, b):
        """a @ b accumulated in opmath, not yet rounded."""
        jnp = self.jnp
        if self.mistake == "default-precision-tpu" and a.dtype != jnp.bfloat16:
            # A TPU at default precision: operands rounded to bf16, products accumulated in f32.
            a = a.astype(jnp.bfloat16).astype(a.dtype)
            b = b.astype(jnp.bfloat16).astype(b.dtype)
        return jnp.matmul(a, b, precision=self.precision, preferred_element_type=self.odt)

    def linear(self, x, name, bias=False):
        y = self.matmul(x, self.w[name + ".weight"].T)
        if bias:
            y = y + self.w[name + ".bias"].astype(self.odt)
        return y.astype(self.cdt)

    def rmsnorm(self, x, weight):
        jnp = self.jnp
        h = x.astype(self.odt)
        if self.mistake == "norm-variance-bf16":
            bf = jnp.bfloat16
            sq = (h * h).astype(bf).astype(self.odt)
            var = jnp.mean(sq, axis=-1, keepdims=True).astype(bf).astype(self.odt)
        else:
            var = jnp.mean(h * h, axis=-1, keepdims=True)
        if self.mistake == "eps-outside-sqrt":
            h = h / (jnp.sqrt(var) + self.eps)
        else:
            h = h * self.jax.lax.rsqrt(var + self.eps)
        return weight * h.astype(self.cdt)

    def rope_tables(self, n: int):
        """cos, sin of shape [n, D] (rotate_half layout; interleaved for that mistake), model dtype."""
        jnp, d = self.jnp, self.head_dim
        if self.mistake == "rope-bf16-inv-freq":
            inv_freq = 1.0 / (self.theta ** (jnp.arange(0, d, 2, dtype=jnp.bfloat16) / d))
            freqs = (jnp.arange(n)[:, None] * inv_freq[None, :]).astype(self.odt)  # bf16 angles
        else:
            inv_freq = 1.0 / (self.theta ** (jnp.arange(0, d, 2).astype(self.odt) / d))
            freqs = jnp.arange(n).astype(self.odt)[:, None] * inv_freq[None, :]
        if self.mistake == "interleaved-rope":
            emb = jnp.repeat(freqs, 2, axis=-1)  # f0 f0 f1 f1 ...
        else:
            emb = jnp.concatenate([freqs, freqs], axis=-1)  # f0 f1 ... f0 f1 ...
        return jnp.cos(emb).astype(self.cdt), jnp.sin(emb).astype(self.cdt)

    def apply_rope(self, x, cos, sin):
        """x [1, heads, T, D]: x·cos + rotate(x)·sin, each op rounded in the model dtype."""
        jnp = self.jnp
        if self.mistake == "interleaved-rope":
            x1, x2 = x[..., 0::2], x[..., 1::2]
            rot = jnp.stack([-x2, x1], axis=-1).reshape(x.shape)
        else:
            half = x.shape[-1] // 2
            rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def softmax(self, scores):
        """Softmax over the last axis in opmath, rounded once (transformers' eager attention)."""
        if self.mistake != "softmax-bf16":
            return self.jax.nn.softmax(scores.astype(self.odt), axis=-1).astype(self.cdt)
        # jax.nn.softmax on a bf16 array, step by step (each op computed in opmath and rounded).
        jnp, bf, o = self.jnp, self.jnp.bfloat16, self.odt
        s = scores.astype(o)
        e = jnp.exp((s - jnp.max(s, axis=-1, keepdims=True)).astype(bf).astype(o)).astype(bf)
        total = jnp.sum(e.astype(o), axis=-1, keepdims=True).astype(bf)
        return (e.astype(o) / total.astype(o)).astype(bf).astype(self.cdt)

    def residual(self, x, y):
        """x + y in the model dtype (for the residual-bf16 mistake, in the wrong one)."""
        jnp = self.jnp
        if self.mistake != "residual-bf16":
            return x + y
        if self.cdt == jnp.bfloat16:
            return x.astype(self.odt) + y.astype(self.odt)  # float32 stream, never cast back
        return (x + y).astype(jnp.bfloat16).astype(self.cdt)  # bf16 stream in an f32/f64 port

    def scale(self, x, s: float):
        """x × a Python scalar in opmath (torch keeps the scalar in float32 for bf16 tensors)."""
        return (x.astype(self.odt) * s).astype(self.cdt)

    # -- the forward pass ------------------------------------------------------------------------

    def forward(self, ids, tap):
        jax, jnp, w = self.jax, self.jnp, self.w
        n, hd, groups = len(ids), self.head_dim, self.heads // self.kv_heads
        tap("tokens", jnp.asarray([ids], dtype=jnp.int32))
        x = w["model.embed_tokens.weight"][jnp.asarray(ids)][None]  # [1, T, H]
        tap("embed", x)
        cos, sin = self.rope_tables(n)
        causal = jnp.tril(jnp.ones((n, n), dtype=bool))
        for i in range(self.layers):
            p, t = f"model.layers.{i}.", f"layers.{i}."
            h = self.rmsnorm(x, w[p + "input_layernorm.weight"])
            tap(t + "input_norm", h)
            bias = self.qkv_bias and self.mistake != "no-qkv-bias"

            def heads(y, nh):  # [1, T, nh*D] -> [1, nh, T, D]
                return y.reshape(1, n, nh, hd).transpose(0, 2, 1, 3)

            q = heads(self.linear(h, p + "self_attn.q_proj", bias), self.heads)
            k = heads(self.linear(h, p + "self_attn.k_proj", bias), self.kv_heads)
            v = heads(self.linear(h, p + "self_attn.v_proj", bias), self.kv_heads)
            tap(t + "q", q)
            tap(t + "k", k)
            tap(t + "v", v)
            q, k = self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin)
            tap(t + "q_rope", q)
            tap(t + "k_rope", k)
            # GQA: query head j reads kv head j // groups.
            k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
            scores = self.scale(self.matmul(q, k.transpose(0, 1, 3, 2)).astype(self.cdt), hd ** -0.5)
            scores = jnp.where(causal, scores, jnp.finfo(self.cdt).min)
            probs = self.softmax(scores)
            tap(t + "attn_probs", probs)
            a = self.matmul(probs, v).astype(self.cdt).transpose(0, 2, 1, 3).reshape(1, n, self.heads * hd)
            tap(t + "attn_out", a)
            o = self.linear(a, p + "self_attn.o_proj")
            tap(t + "o_proj", o)
            x = self.residual(x, o)
            tap(t + "resid_attn", x)
            h = self.rmsnorm(x, w[p + "post_attention_layernorm.weight"])
            tap(t + "post_norm", h)
            gate = self.linear(h, p + "mlp.gate_proj")
            up = self.linear(h, p + "mlp.up_proj")
            act = jax.nn.silu(gate.astype(self.odt)).astype(self.cdt) * up
            tap(t + "mlp_act", act)
            m = self.linear(act, p + "mlp.down_proj")
            tap(t + "mlp_out", m)
            x = self.residual(x, m)
            tap(t + "out", x)
        x = self.rmsnorm(x, w["model.norm.weight"])
        tap("final_norm", x)
        tap("logits", self.matmul(x, self.lm_head.T).astype(self.cdt))


def load_safetensors(model_dir: str) -> dict:
    """Every tensor of a checkpoint folder (model.safetensors or shards) as JAX arrays, stored dtype."""
    from lockstep_reference.st_io import checkpoint_files  # model.safetensors, else the index's shards
    from safetensors.flax import load_file

    out = {}
    for f in checkpoint_files(model_dir):
        out.update(load_file(f))
    return out


if __name__ == "__main__":
    main()
