"""lockstep from Python: verify another port's traces against Hugging Face transformers.

The wheel installs the ``lockstep`` command (the Rust binary) and this thin API over it, plus the
trace writer ports use (``lockstep_reference.writer``). Typical notebook use::

    import lockstep
    report = lockstep.verify_port("path/to/model", ["port.safetensors"])
    print(report.status, report.first_divergence)
    for row in report.per_layer:
        print(row.tier, row.input, row.layer, row.ours_vs_ref, row.ref_vs_oracle)

``verify_port`` runs ``lockstep verify --port-trace ... --json FILE`` and reads the JSON into the
dataclasses below: nothing is parsed out of Markdown. The reference (torch + transformers) is the
python given by ``python=``, else ``LOCKSTEP_PYTHON``, else this interpreter when it has torch and
transformers, else whatever the CLI finds on its own.
"""

from __future__ import annotations

from ._api import (
    Divergence,
    InputResult,
    LayerRow,
    LockstepError,
    OpLevel,
    Phase,
    Report,
    binary,
    verify_port,
)

__all__ = [
    "Divergence",
    "InputResult",
    "LayerRow",
    "LockstepError",
    "OpLevel",
    "Phase",
    "Report",
    "binary",
    "verify_port",
]
