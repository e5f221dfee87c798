"""The reference of lockstep's `q8dot` mode: PyTorch float32 with the input of every matmul whose GGUF
weight is block-quantized rounded to 8 bits first, exactly as llama.cpp's CPU backend quantizes it
(ggml-quants.c: `quantize_row_q8_0_ref`, `quantize_row_q8_1_ref`, `quantize_row_q8_K_ref`).

llama.cpp sums a quantized weight block against the quantized activations with integer dot products;
that equals the float32 matmul of the dequantized weight with the *dequantized* 8-bit activations up
to float32 summation order, which is what this module computes (`x -> q · d`, then transformers'
own `nn.Linear`). One approximation: for Q4_1/Q5_1 weights llama.cpp stores the activation block's
`d · Σq` rounded to f16 for the weights' min term, where this uses `f16(d) · Σq`.

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


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 (also Q8_1's quants): per 32 values d = amax/127 (stored as f16), q = roundf(x/d);
    returns q · f16(d) in float32."""
    b = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = _round_half_away(b * inv)
    out = q * d.to(torch.float16).float()
    return _nonfinite_blocks(b, out).reshape(x.shape)


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


def activation_formats(gguf_path: str) -> dict[str, str]:
    """transformers module name -> activation format, for every matmul whose weight the GGUF stores
    in a block type (the LM head takes the token embedding's type when the file has no `output`)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if any("_exps" in n for n in types):
        raise ValueError(f"{gguf_path}: q8dot reference: mixture-of-experts GGUF files are not supported")
    formats = {}
    for name, ty in types.items():
        fmt = VEC_DOT_TYPE.get(ty)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if fmt is not None and m and m.group(2) in _LAYER_TENSORS:
            formats[f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"] = fmt
    head = types.get("output.weight", types.get("token_embd.weight"))
    if head in VEC_DOT_TYPE:
        formats["lm_head"] = VEC_DOT_TYPE[head]
    return formats


@contextlib.contextmanager
def quantized_inputs(model, formats: dict[str, str]):
    """Within the block, every module named in `formats` sees its input rounded to that 8-bit
    activation format (a forward pre-hook, removed on exit)."""
    modules = dict(model.named_modules())
    missing = sorted(set(formats) - set(modules))
    if missing:
        raise ValueError(f"q8dot reference: the model has no module(s) {missing[:3]}")
    handles = []
    try:
        for name, fmt in formats.items():
            quantize = QUANTIZERS[fmt]
            handles.append(modules[name].register_forward_pre_hook(
                lambda _m, args, q=quantize: (q(args[0]).to(args[0].dtype),) + tuple(args[1:])))
        yield
    finally:
        for h in handles:
            h.remove()
