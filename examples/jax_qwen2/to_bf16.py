"""Write a bf16-stored copy of a checkpoint folder (weights rounded to nearest even, as
`from_pretrained(..., dtype=torch.bfloat16)` rounds them).

The bf16 tier judges a bf16 run against the pure-f64 oracle, which must run on the very weights the
bf16 run uses: so verify bf16 ports against a bf16-stored checkpoint. Real checkpoints usually are;
the f32 test fixtures are not, hence this script.

    python examples/jax_qwen2/to_bf16.py SRC_DIR DST_DIR
"""

from __future__ import annotations

import sys


def to_bf16(src: str, dst: str) -> str:
    """The reference's own bf16 copy (`python -m lockstep_reference to-bf16`); returns `dst`."""
    from lockstep_reference.ops import to_bf16 as reference_to_bf16

    reference_to_bf16(src, dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    print(to_bf16(sys.argv[1], sys.argv[2]))
