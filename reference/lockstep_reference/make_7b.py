"""A random-weight model with the exact Qwen2.5-7B configuration, written tensor by tensor in bfloat16.

    python -m lockstep_reference make-7b --out fixtures/big/qwen2.5-7b-random [--seed 7007]
    python -m lockstep_reference make-7b --shape 14b --out fixtures/big/qwen2.5-14b-random [--seed 14014]

(`--shape 14b`: Qwen2.5-14B's config, 14,770,033,664 parameters in 8 shards, 29.5 GB: more than this
machine's memory; built here in 228 s, peak RSS 6.7 GB.)

makes (about 15.2 GB, skipped when the folder already holds a complete build of the same spec and seed):

    DIR/config.json                          Qwen2Config(...).save_pretrained (transformers 5 layout)
    DIR/generation_config.json               bos/eos 151643
    DIR/model-0000k-of-0000n.safetensors     bfloat16 shards of at most 4e9 bytes ("4GB", as HF counts)
    DIR/model.safetensors.index.json         {"metadata": {"total_size", "total_parameters"}, "weight_map"}
    DIR/tokenizer.json, tokenizer_config.json  the real Qwen tokenizer (fixtures/tokenizer/qwen)
    DIR/lockstep-fixture.json                spec, seed, files, build time and peak RSS

The configuration is Qwen2.5-7B's (Qwen2ForCausalLM; vocab 152064, hidden 3584, intermediate 18944, 28
layers, 28 heads, 4 KV heads, untied, rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 32768,
no sliding window, bos = eos = 151643): 7,615,616,512 parameters. Note that transformers 5's Qwen2Config
stores `sliding_window: null` when `use_sliding_window` is false, so that is what config.json says.

Every parameter is random with the rules of fixtures.py (`random_values`: norms U(0.5, 1.5), q/k/v
biases N(0, 0.3), embeddings/lm_head N(0, 2/sqrt(hidden)), other Linear N(0, 1/sqrt(fan_in))), drawn in
float32 from one torch.Generator(seed) in sorted-name order and rounded to bfloat16: exactly what
fixtures.py's `_randomize` gives for the same model materialized in bfloat16 (checked on small configs in
reference/tests/check_reference.py). The model never exists in memory: its names and shapes come from a
meta-device model, the shard headers are written first, and each parameter is generated, rounded and
written (pwrite at its offset) alone, so peak RSS is about one embedding matrix in float32 plus bf16
(~3.3 GB), not the 15 GB model. Tensors are assigned to shards in state_dict order (as save_pretrained
does) and sorted by name inside a shard (as the safetensors library writes them).

Measured here (2 shared cores): 196 s, peak RSS 4.9 GB; 4 shards of 3.95, 3.86, 3.86 and 3.56 GB
(15,231,233,024 bytes), the same split as the published Qwen2.5-7B checkpoint.

The build happens in DIR.partial, renamed to DIR when complete. Afterwards the folder is checked:
AutoConfig loads it, a meta-device model built from that config has exactly the stored names and shapes
(all BF16), the parameter count is 7,615,616,512, and the index is consistent with the shard headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time

from . import fixtures as fx

QWEN25_7B_CONFIG = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1000000.0,
    rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False, sliding_window=131072,
    max_window_layers=28, bos_token_id=151643, eos_token_id=151643, hidden_act="silu",
    attention_dropout=0.0, initializer_range=0.02, use_cache=True,
)
QWEN25_7B_PARAMETERS = 7_615_616_512
DEFAULT_SEED = 7007
SHARD_BYTES = 4_000_000_000
NAME = "qwen2.5-7b-random"

# Qwen2.5-14B's published config.json (Qwen2ForCausalLM; 48 layers, 40 heads, 8 KV heads, rms_norm_eps 1e-5).
QWEN25_14B_CONFIG = dict(
    vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=1000000.0,
    rms_norm_eps=1e-5, max_position_embeddings=131072, use_sliding_window=False, sliding_window=131072,
    max_window_layers=48, bos_token_id=151643, eos_token_id=151643, hidden_act="silu",
    attention_dropout=0.0, initializer_range=0.02, use_cache=True,
)
QWEN25_14B_PARAMETERS = 14_770_033_664


class Shape:
    """One published Qwen2.5 size: its config, parameter count, default seed and folder name."""

    def __init__(self, name: str, config: dict, parameters: int, seed: int):
        self.name, self.config, self.parameters, self.seed = name, config, parameters, seed


SHAPES = {
    "7b": Shape(NAME, QWEN25_7B_CONFIG, QWEN25_7B_PARAMETERS, DEFAULT_SEED),
    "14b": Shape("qwen2.5-14b-random", QWEN25_14B_CONFIG, QWEN25_14B_PARAMETERS, 14014),
}

_ST_NAMES = {"bfloat16": "BF16", "float32": "F32", "float64": "F64"}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_classes(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]


def parameter_plan(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored parameter of the model `config` describes, in state_dict order
    (a tied lm_head appears once, as model.embed_tokens.weight). Built on the meta device: no memory."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    plan = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied parameters appear once
    persistent = [n for n, _ in model.named_buffers() if n in model.state_dict()]
    if persistent:
        raise ValueError(f"unexpected persistent buffers {persistent}")
    return plan


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def write_random_checkpoint(config, out_dir: str, seed: int, shard_bytes: int = SHARD_BYTES,
                            dtype: str = "bfloat16") -> dict:
    """Write random weights for `config` into the existing folder `out_dir` (shards, index if sharded).

    Values: fixtures.random_values per parameter, in sorted-name order from torch.Generator(seed),
    rounded to `dtype`. Returns {"files", "total_size", "total_parameters"}."""
    import torch

    tdtype = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdtype).element_size()
    plan = parameter_plan(config)

    # Shards: greedy in state_dict order, a new shard when the next tensor would overflow this one.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = esize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    files = _shard_names(len(shards))

    # Headers first (names sorted inside a shard), files sized to their final length.
    where: dict[str, tuple[int, int, int]] = {}  # name -> (file index, absolute offset, nbytes)
    fds = []
    try:
        for k, shard in enumerate(shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape in sorted(shard):
                nbytes = esize * _numel(shape)
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            head = json.dumps(header, separators=(",", ":")).encode("utf-8")
            head += b" " * (-len(head) % 8)
            base = 8 + len(head)
            for name, _shape in shard:
                begin, end = header[name]["data_offsets"]
                where[name] = (k, base + begin, end - begin)
            fd = os.open(os.path.join(out_dir, files[k]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            _pwrite_all(fd, struct.pack("<Q", len(head)) + head, 0)
            os.ftruncate(fd, base + offset)

        gen = torch.Generator().manual_seed(seed)
        hidden = config.hidden_size
        shapes = dict(plan)
        for name in sorted(shapes):
            values = fx.random_values(name, shapes[name], gen, hidden).to(tdtype)
            k, offset, nbytes = where[name]
            raw = values.contiguous().view(torch.uint8).numpy()
            assert raw.nbytes == nbytes, (name, raw.nbytes, nbytes)
            _pwrite_all(fd=fds[k], data=raw, offset=offset)
            del values, raw
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)

    total_size = esize * sum(_numel(s) for _, s in plan)
    total_parameters = sum(_numel(s) for _, s in plan)
    if len(files) > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                 "weight_map": {name: files[where[name][0]] for name, _ in plan}}
        fx._write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    return {"files": files, "total_size": total_size, "total_parameters": total_parameters}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)


def check_checkpoint(model_dir: str, expected_parameters: int | None = None, dtype: str = "BF16") -> dict:
    """Check that transformers would load `model_dir`: AutoConfig loads it, and a meta-device model from
    that config has exactly the stored tensor names and shapes (all `dtype`); the index (if any) matches
    the shard headers. Returns {"parameters", "tensors", "files"}; raises on any mismatch."""
    import safetensors
    import transformers

    from .st_io import checkpoint_files, read_header

    config = transformers.AutoConfig.from_pretrained(model_dir)
    expected = dict(parameter_plan(config))
    stored: dict[str, tuple[int, ...]] = {}
    file_of: dict[str, str] = {}
    sizes = 0
    for path in checkpoint_files(model_dir):
        header, base = read_header(path)
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if name in stored:
                raise ValueError(f"{name} stored twice")
            if entry["dtype"] != dtype:
                raise ValueError(f"{name} is {entry['dtype']}, expected {dtype}")
            stored[name] = tuple(entry["shape"])
            file_of[name] = os.path.basename(path)
            sizes += entry["data_offsets"][1] - entry["data_offsets"][0]
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if os.path.getsize(path) != base + end:
            raise ValueError(f"{path} is {os.path.getsize(path)} bytes, expected {base + end}")
        with safetensors.safe_open(path, framework="pt") as f:  # the library's own header validation
            assert set(f.keys()) == set(header)
    if stored != expected:
        missing = sorted(set(expected) - set(stored))[:5]
        extra = sorted(set(stored) - set(expected))[:5]
        wrong = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])[:5]
        raise ValueError(f"stored tensors differ from the model: missing {missing}, extra {extra}, shapes {wrong}")
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if index["weight_map"] != file_of:
            raise ValueError("index weight_map does not match the shard headers")
        if index["metadata"]["total_size"] != sizes:
            raise ValueError(f"index total_size {index['metadata']['total_size']} != {sizes}")
    count = sum(_numel(s) for s in stored.values())
    if expected_parameters is not None and count != expected_parameters:
        raise ValueError(f"{count} parameters, expected {expected_parameters}")
    return {"parameters": count, "tensors": len(stored), "files": len(set(file_of.values()))}


def _spec(seed: int, shape: Shape = SHAPES["7b"]) -> dict:
    return {"arch": "qwen2", "seed": seed, "dtype": "bfloat16", "config": shape.config,
            "shard_bytes": SHARD_BYTES}


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def is_complete(out_dir: str, seed: int, shape: Shape = SHAPES["7b"]) -> bool:
    """Whether `out_dir` holds a finished build of this shape and seed."""
    try:
        with open(os.path.join(out_dir, fx.MARKER)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return record.get("spec_sha256") == _spec_hash(_spec(seed, shape)) and all(
        os.path.exists(os.path.join(out_dir, f)) for f in record.get("files", []))


def make_7b(out_dir: str, seed: int = DEFAULT_SEED, tokenizer_dir: str | None = None,
            shape: str = "7b") -> dict:
    """Build the random model of the Qwen2.5 `shape` ("7b" or "14b") into `out_dir` (atomically, via
    `out_dir`.partial); return its record (also written to lockstep-fixture.json). Skips a complete
    build."""
    import torch
    import transformers
    from transformers import GenerationConfig, Qwen2Config

    size = SHAPES[shape]
    out_dir = os.path.abspath(out_dir)
    if is_complete(out_dir, seed, size):
        with open(os.path.join(out_dir, fx.MARKER)) as f:
            record = json.load(f)
        fx.log(f"{out_dir}: up to date")
        return record
    if tokenizer_dir is None:
        tokenizer_dir = fx.qwen_tokenizer(os.path.join(_REPO_ROOT, "fixtures"))
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    spec = _spec(seed, size)
    config = Qwen2Config(**size.config)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = torch.bfloat16

    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    fx.log(f"writing random weights (seed {seed}) into {tmp}")
    written = write_random_checkpoint(config, tmp, seed, SHARD_BYTES, "bfloat16")
    write_seconds = time.time() - t0
    fx._check_same_config(config, transformers.AutoConfig.from_pretrained(tmp))
    checked = check_checkpoint(tmp, size.parameters)
    files = sorted(os.listdir(tmp))
    record = {
        "name": size.name,
        "spec": spec,
        "spec_sha256": _spec_hash(spec),
        "randomization": "every parameter, sorted-name order, one torch.Generator(seed), float32 rounded to "
                         "bfloat16: norms U(0.5,1.5); biases N(0,0.3); embed/lm_head N(0,2/sqrt(hidden)); "
                         "other Linear N(0,1/sqrt(fan_in))",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "files": files,
        "parameters": checked["parameters"],
        "total_size": written["total_size"],
        "write_seconds": round(write_seconds, 2),
        "build_seconds": round(time.time() - t0, 2),
        "peak_rss_mib": round(fx.peak_rss_mib(), 1),
    }
    fx._write_json(os.path.join(tmp, fx.MARKER), record)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    fx.log(f"{out_dir}: {checked['parameters']:,} parameters in {checked['files']} shards, "
           f"{record['build_seconds']} s, peak RSS {record['peak_rss_mib']} MiB")
    return record
