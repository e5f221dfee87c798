"""Write a bf16-stored copy of a checkpoint folder (weights rounded to nearest even, as
`from_pretrained(..., dtype=torch.bfloat16)` rounds them).

The bf16 tier judges a bf16 run against the pure-f64 oracle, which must run on the very weights the
bf16 run uses: so verify bf16 ports against a bf16-stored checkpoint. Real checkpoints usually are;
the f32 test fixtures are not, hence this script.

    python examples/jax_qwen2/to_bf16.py SRC_DIR DST_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def to_bf16(src: str, dst: str) -> str:
    import jax.numpy as jnp
    from safetensors.flax import load_file, save_file

    from lockstep_reference.st_io import checkpoint_files

    tensors = {}
    for f in checkpoint_files(src):
        tensors.update(load_file(f))
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.astype(jnp.bfloat16) for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            continue
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    print(to_bf16(sys.argv[1], sys.argv[2]))
