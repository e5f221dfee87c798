"""The reference of lockstep's `q8dot` mode: PyTorch float32 with the input of every matmul whose GGUF
weight is block-quantized rounded to 8 bits first, exactly as llama.cpp's CPU backend quantizes it
(ggml-quants.c: `quantize_row_q8_0_ref`, `quantize_row_q8_1_ref`, `quantize_row_q8_K_ref`).

llama.cpp sums a quantized weight block against the quantized activations with integer dot products;
that equals the float32 matmul of the dequantized weight with the *dequantized* 8-bit activations up
to float32 summation order, which is what this module computes (`x -> q · d`, then transformers'
own `nn.Linear`). For Q4_1/Q5_1 weights llama.cpp adds the weights' per-block min times the
activation block's `s = f16(d · Σq)`, not `f16(d) · Σq`: a forward hook adds that difference times
the stored mins (read from the file, rows un-permuted as transformers un-permutes Llama's q/k).

Which activation format a matmul gets is read from the GGUF file itself (its tensor types), never
from lockstep: Q8_0/Q4_0/Q5_0 weights take Q8_0 activations, Q4_1/Q5_1 take Q8_1, the K-quants take
Q8_K (ggml-cpu's `vec_dot_type`). A block holding a NaN or an infinity gives NaN for the whole
block, so a non-finite activation never turns into a finite output.
"""

from __future__ import annotations

import contextlib
import re

import torch

# ggml weight type -> the activation format llama.cpp's CPU backend quantizes the input to.
VEC_DOT_TYPE = {
    "Q8_0": "q8_0", "Q4_0": "q8_0", "Q5_0": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q4_K": "q8_K", "Q5_K": "q8_K", "Q6_K": "q8_K",
}

# GGUF tensor name -> transformers module (Llama/Qwen2/Qwen3 dense decoders).
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's `roundf`: halves away from zero."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _nonfinite_blocks(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` with every block (last dim) of `b` that holds a NaN or an infinity set to NaN."""
    bad = ~torch.isfinite(b).all(-1, keepdim=True)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def quantize_q8_0(x: torch.Tensor, with_s: bool = False):
    """Q8_0 (also Q8_1's quants): per 32 values d = amax/127 (stored as f16), q = roundf(x/d);
    returns q · f16(d) in float32. `with_s`: also Q8_1's per-block `f16(d · Σq) − f16(d) · Σq`,
    the difference between the sum llama.cpp pairs with a weight's min and the one x' gives."""
    b = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = _round_half_away(b * inv)
    d16 = d.to(torch.float16).float()
    out = _nonfinite_blocks(b, q * d16).reshape(x.shape)
    if not with_s:
        return out
    qsum = q.sum(-1)
    s = (qsum * d[..., 0]).to(torch.float16).float()
    return out, s - d16[..., 0] * qsum


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    """Q8_K: per 256 values, `max` the value of largest magnitude, iscale = -127/max,
    q = min(127, nearest_int(iscale · x)) (ties to even), d = 1/iscale (float32); returns q · d."""
    b = x.float().reshape(*x.shape[:-1], -1, 256)
    idx = b.abs().argmax(-1, keepdim=True)  # first of the largest, as the C loop's strict `>`
    mx = torch.gather(b, -1, idx)
    zero = mx == 0
    iscale = torch.where(zero, torch.zeros_like(mx), -127.0 / torch.where(zero, torch.ones_like(mx), mx))
    q = torch.clamp(torch.round(iscale * b), max=127)
    d = torch.where(zero, torch.zeros_like(mx), 1.0 / torch.where(zero, torch.ones_like(iscale), iscale))
    out = q * d
    return _nonfinite_blocks(b, out).reshape(x.shape)


QUANTIZERS = {"q8_0": quantize_q8_0, "q8_1": quantize_q8_0, "q8_K": quantize_q8_k}


def _block_mins(tensor, block_bytes: int) -> torch.Tensor:
    """The f16 min `m` of every block of a Q4_1/Q5_1 tensor (bytes 2-3 of each block), [rows, blocks]."""
    import numpy as np

    raw = np.ascontiguousarray(tensor.data).reshape(-1)
    k = int(tensor.shape[0])  # ggml order: the row length first
    rows = int(tensor.n_elements) // k
    blocks = raw.reshape(rows, k // 32, block_bytes)
    return torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))


def _unpermute_rows(m: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Llama q/k tensor back in transformers' order (its GGUF loader's
    `_reverse_permute_weights`)."""
    dim = m.shape[0] // n_head // 2
    return m.reshape(n_head, dim, 2, *m.shape[1:]).swapaxes(2, 1).reshape(m.shape)


def activation_plan(gguf_path: str, config) -> dict[str, tuple[str, torch.Tensor | None]]:
    """transformers module name -> (activation format, the weight's per-block mins for Q8_1
    activations, else None), for every matmul whose weight the GGUF stores in a block type (the LM
    head takes the token embedding's type when the file has no `output`)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    if any("_exps" in n for n in tensors):
        raise ValueError(f"{gguf_path}: q8dot reference: mixture-of-experts GGUF files are not supported")

    def entry(name: str, t):
        fmt = VEC_DOT_TYPE[t.tensor_type.name]
        if fmt != "q8_1":
            return fmt, None
        mins = _block_mins(t, {"Q4_1": 20, "Q5_1": 24}[t.tensor_type.name])
        if config.model_type == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            mins = _unpermute_rows(mins, heads)
        return fmt, mins

    plan = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if t.tensor_type.name in VEC_DOT_TYPE and m and m.group(2) in _LAYER_TENSORS:
            plan[f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"] = entry(name, t)
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if head is not None and head.tensor_type.name in VEC_DOT_TYPE:
        plan["lm_head"] = entry(head.name, head)
    return plan


@contextlib.contextmanager
def quantized_inputs(model, plan: dict[str, tuple[str, torch.Tensor | None]]):
    """Within the block, every module named in `plan` sees its input rounded to its 8-bit activation
    format (a forward pre-hook), and for Q8_1 activations gets llama.cpp's min term (a forward
    hook); the hooks are removed on exit."""
    modules = dict(model.named_modules())
    missing = sorted(set(plan) - set(modules))
    if missing:
        raise ValueError(f"q8dot reference: the model has no module(s) {missing[:3]}")
    handles = []

    def hooks(fmt: str, mins: torch.Tensor | None):
        state = {}

        def pre(_m, args):
            x = args[0]
            if mins is None:
                return (QUANTIZERS[fmt](x).to(x.dtype),) + tuple(args[1:])
            xq, state["ds"] = quantize_q8_0(x, with_s=True)
            return (xq.to(x.dtype),) + tuple(args[1:])

        def post(_m, _args, out):
            return out + (state.pop("ds") @ mins.T).to(out.dtype)

        return pre, post

    try:
        for name, (fmt, mins) in plan.items():
            pre, post = hooks(fmt, mins)
            handles.append(modules[name].register_forward_pre_hook(pre))
            if mins is not None:
                handles.append(modules[name].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
