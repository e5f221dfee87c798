"""Writes the seed corpus of the fuzz targets (small files only) from the fixtures and from tiny
hand-made files: `python3 fuzz/make_corpus.py` from the repository root."""
import json
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(ROOT, "..", "fixtures")


def put(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, payload):
    return gstr(key) + struct.pack("<I", ty) + payload


def gguf(kvs, tensors, align=32):
    """tensors: (name, dims fastest-first, ggml type, data bytes)."""
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    off, offs = 0, []
    for name, dims, ty, data in tensors:
        b += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", ty, off)
        offs.append(off)
        off += -(-len(data) // align) * align
    b += b"\0" * (-len(b) % align)
    base = len(b)
    for (_, _, _, data), o in zip(tensors, offs, strict=False):
        b += b"\0" * (base + o - len(b)) + data
    return b


def u32(key, x):
    return kv(key, 4, struct.pack("<I", x))


def f32(key, x):
    return kv(key, 6, struct.pack("<f", x))


def strs(key, items):
    return kv(key, 9, struct.pack("<IQ", 8, len(items)) + b"".join(gstr(s) for s in items))


def tiny_gguf(arch, quant):
    h, f, v = 32, 16, 8
    kvs = [kv("general.architecture", 8, gstr(arch)), u32(f"{arch}.block_count", 1),
           u32(f"{arch}.embedding_length", h), u32(f"{arch}.feed_forward_length", f),
           u32(f"{arch}.attention.head_count", 2), u32(f"{arch}.attention.head_count_kv", 1),
           u32(f"{arch}.context_length", 64), f32(f"{arch}.rope.freq_base", 10000.0),
           f32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
           kv("tokenizer.ggml.model", 8, gstr("gpt2")), kv("tokenizer.ggml.pre", 8, gstr("qwen2")),
           strs("tokenizer.ggml.tokens", ["a", "b", "c", "ab", "bc", "abc", "<s>", "</s>"]),
           strs("tokenizer.ggml.merges", ["a b", "b c", "ab c"]),
           kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 8) + struct.pack("<8i", 1, 1, 1, 1, 1, 1, 3, 3)),
           u32("tokenizer.ggml.bos_token_id", 6), u32("tokenizer.ggml.eos_token_id", 7),
           kv("tokenizer.chat_template", 8, gstr("{% for m in messages %}{{ m.content }}{% endfor %}"))]
    def q8(rows, cols):
        return (struct.pack("<e", 0.01) + bytes(range(32))) * (rows * cols // 32)
    def t(n, dims):
        count = dims[0] * (dims[1] if len(dims) > 1 else 1)
        return (n, dims, 0, struct.pack(f"<{count}f", *([0.5] * count)))
    tensors = [t("token_embd.weight", [h, v]), t("blk.0.attn_norm.weight", [h]),
               ("blk.0.attn_q.weight", [h, h], 8, q8(h, h)) if quant else t("blk.0.attn_q.weight", [h, h]),
               t("blk.0.attn_k.weight", [h, 16]), t("blk.0.attn_v.weight", [h, 16]),
               t("blk.0.attn_output.weight", [h, h]), t("blk.0.ffn_norm.weight", [h]),
               t("blk.0.ffn_gate.weight", [h, f]), t("blk.0.ffn_up.weight", [h, f]),
               t("blk.0.ffn_down.weight", [f, h]), t("output_norm.weight", [h])]
    return gguf(kvs, tensors)


def safetensors(tensors, meta=None):
    """tensors: (name, dtype, shape, raw bytes)."""
    header, off, data = {}, 0, b""
    if meta:
        header["__metadata__"] = meta
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


put("gguf_header", "llama-f32", tiny_gguf("llama", False))
put("gguf_header", "qwen2-q8_0", tiny_gguf("qwen2", True))

for m in ("qwen2-gqa", "llama-gqa", "smollm2-135m-instruct"):
    for f in ("config.json", "generation_config.json"):
        p = os.path.join(FIX, "models", m, f)
        if os.path.exists(p):
            put("config_json", f"{m}-{f}", open(p, "rb").read())

put("chat_template", "smollm2.jinja",
    open(os.path.join(FIX, "models/smollm2-135m-instruct/chat_template.jinja"), "rb").read())
put("chat_template", "qwen2.5.jinja", open(os.path.join(FIX, "llama-cpp/Qwen-Qwen2.5-7B-Instruct.jinja"), "rb").read())

bpe = {"version": "1.0", "truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
       "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                   "pad_type_id": 0, "pad_token": "a"},
       "added_tokens": [{"id": 6, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True}],
       "normalizer": None,
       "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
       "post_processor": None,
       "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                 "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5, "<s>": 6},
                 "merges": ["a b", "b c", "ab c"]}}
put("tokenizer_json", "bpe-with-truncation-padding.json", json.dumps(bpe))
wl = dict(bpe, truncation=None, padding=None, pre_tokenizer={"type": "Whitespace"}, decoder=None,
          model={"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"})
put("tokenizer_json", "wordlevel.json", json.dumps(wl))

def f32s(xs):
    return struct.pack(f"<{len(xs)}f", *xs)
trace = safetensors([("tokens", "I64", [1, 3], struct.pack("<3q", 1, 2, 3)),
                     ("embed", "F32", [1, 3, 2], f32s([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])),
                     ("layers.0.attn_out", "F64", [1, 3, 2], struct.pack("<6d", *[0.25] * 6)),
                     ("logits", "BF16", [1, 3, 2], b"\x80\x3f" * 6)],
                    {"producer": "fuzz-seed", "dtype": "f32"})
put("trace_read", "small-trace.safetensors", trace)
put("trace_read", "f16-only.safetensors", safetensors([("logits", "F16", [2, 2], b"\x00\x3c" * 4)]))

norm = safetensors([("model.norm.weight", "F32", [2], f32s([1.0, 2.0]))])
put("safetensors_checkpoint", "single", b"\0" + norm)
put("safetensors_checkpoint", "single-bf16",
    b"\0" + safetensors([("model.norm.weight", "BF16", [2], b"\x80\x3f\x80\x7f")]))
idx = {"metadata": {"total_size": 8}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
put("safetensors_checkpoint", "index", b"\1" + json.dumps(idx).encode())
