"""Byte-exact safetensors reading (header parsing by hand) and the model fingerprint.

The safetensors format: an 8-byte little-endian u64 N, then N bytes of JSON header mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte after the header)
plus an optional "__metadata__" entry of string -> string, then the data.  Parsing it ourselves gives the
raw stored bytes of every tensor (bf16 included), which is what the fingerprint hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(path: str) -> tuple[dict, int]:
    """Return (header dict, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def tensor_entries(path: str) -> dict[str, dict]:
    """Return {name: {"dtype", "shape", "data_offsets"}} of a safetensors file (without __metadata__)."""
    header, _ = read_header(path)
    header.pop("__metadata__", None)
    return header


def checkpoint_files(model_dir: str) -> list[str]:
    """The weight files of a checkpoint folder, the way transformers finds them.

    `model.safetensors` if it exists, else the distinct files named in the `weight_map` of
    `model.safetensors.index.json` (sorted).
    """
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, name) for name in files]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _iter_raw(model_dir: str):
    """Yield (name, file path, entry, absolute data begin, absolute data end) for every stored tensor."""
    seen = set()
    for path in checkpoint_files(model_dir):
        header, base = read_header(path)
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if name in seen:
                raise ValueError(f"tensor {name} stored twice in {model_dir}")
            seen.add(name)
            begin, end = entry["data_offsets"]
            yield name, path, entry, base + begin, base + end


_FINGERPRINTS: dict[tuple, str] = {}


def _stat_key(model_dir: str) -> tuple:
    """(path, size, mtime_ns) of every checkpoint file and config.json: what a fingerprint depends on."""
    paths = list(checkpoint_files(model_dir)) + [os.path.join(model_dir, "config.json")]
    return tuple((os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)


def model_fingerprint(model_dir: str) -> str:
    """Fingerprint of a checkpoint folder: weights as stored, plus config.json.

    Computed once per process for the same files (same paths, sizes and modification times): a
    trace-batch of several streamed traces of a 14B model would otherwise hash its 29.5 GB each time.

    Definition (the Rust engine implements the same):

        per tensor:  line(name) = name + ":" + sha256hex(raw bytes of the tensor as stored in the file,
                                                          i.e. its data_offsets byte range, little-endian)
        payload     = "\\n".join(line(name) for name in sorted(all tensor names))
                      + "\\n" + sha256hex(bytes of config.json)
        fingerprint = sha256hex(payload encoded as UTF-8)

    Tensor names are taken from every checkpoint file (see `checkpoint_files`), the header's
    `__metadata__` entry excluded; names sort by Unicode code point (= UTF-8 byte order). sha256hex is
    lowercase hex. Nothing is converted: a bf16 checkpoint and its f32 copy have different fingerprints.
    """
    key = _stat_key(model_dir)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _fingerprint_uncached(model_dir)
    return _FINGERPRINTS[key]


def _fingerprint_uncached(model_dir: str) -> str:
    """`model_fingerprint` computed from `stored_tensor_sha256s`."""
    sums = stored_tensor_sha256s(model_dir)
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        config_hash = hashlib.sha256(f.read()).hexdigest()
    payload = "\n".join(f"{name}:{sums[name][1]}" for name in sorted(sums)) + "\n" + config_hash
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_TENSOR_SUMS: dict[tuple, dict[str, tuple[str, str]]] = {}


def stored_tensor_sha256s(model_dir: str) -> dict[str, tuple[str, str]]:
    """Every stored tensor's safetensors dtype and the sha256 hex of its bytes as stored (its
    data_offsets range): what the fingerprint is made of and, for a tensor loaded in its stored
    dtype, what the weights check compares. Computed once per process for the same files (as
    `model_fingerprint`): `verify`'s weights check and its traces' fingerprint share one read.

    The tensors are hashed on every core (hashlib releases the GIL), each read from a read-only map
    of its file. A 7B bf16 checkpoint (15.2 GB, 2 cores, in the page cache): 6.1 s, against 14-24 s
    read and hashed one tensor at a time (2026-12-03). A truncated file is refused."""
    key = _stat_key(model_dir)
    if key in _TENSOR_SUMS:
        return _TENSOR_SUMS[key]
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    items = list(_iter_raw(model_dir))
    maps: dict[str, mmap.mmap] = {}

    def one(item) -> tuple[str, tuple[str, str]]:
        name, path, entry, begin, end = item
        view = memoryview(maps[path])
        try:
            if end > len(view):
                raise ValueError(f"{path} is truncated")
            h = hashlib.sha256()
            for at in range(begin, end, 1 << 24):
                h.update(view[at:min(end, at + (1 << 24))])
        finally:
            view.release()
        return name, (entry["dtype"], h.hexdigest())

    try:
        for _name, path, _entry, _begin, _end in items:
            if path not in maps:
                with open(path, "rb") as f:
                    maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            sums = dict(pool.map(one, items))
    finally:
        for m in maps.values():
            m.close()
    _TENSOR_SUMS.clear()  # one checkpoint's sums held at a time
    _TENSOR_SUMS[key] = sums
    return sums


def load_f64(model_dir: str) -> dict[str, np.ndarray]:
    """Load every tensor of a checkpoint as float64 numpy arrays (bf16/f16/f32/f64 exactly widened)."""
    out = {}
    for name, path, entry, begin, end in _iter_raw(model_dir):
        with open(path, "rb") as f:
            f.seek(begin)
            raw = f.read(end - begin)
        dtype, shape = entry["dtype"], entry["shape"]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32).astype(np.float64)
        elif dtype in ("F64", "F32", "F16"):
            arr = np.frombuffer(raw, dtype=np.dtype(_NP_DTYPES[dtype]).newbyteorder("<")).astype(np.float64)
        else:
            raise ValueError(f"{name}: unsupported weight dtype {dtype}")
        out[name] = arr.reshape(shape)
    return out
