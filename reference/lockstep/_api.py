"""The API behind ``lockstep.verify_port``: finding the binary, running it, reading its JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LockstepError(RuntimeError):
    """``lockstep`` could not verify (bad input, a missing reference, a crashed reference): the
    exit code and the one-line message it printed."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class LayerRow:
    """One layer of one input's end-to-end comparison (the Markdown report's per-layer table)."""

    tier: str
    input: str
    layer: int
    ours_vs_ref: float | None
    """Largest max |test - reference| over the layer's tensors."""
    worst_tensor: str | None
    ref_vs_oracle: float | None
    """The reference's own noise floor: largest max |reference - pure-f64 oracle|."""
    ours_vs_oracle: float | None
    passed: bool


@dataclass(frozen=True)
class InputResult:
    """One input (one port trace) of a phase."""

    label: str
    passed: bool
    tier: str
    verdict: str
    first_divergence: str | None
    tokens: int | None
    per_layer: list[LayerRow] = field(default_factory=list)


@dataclass(frozen=True)
class Phase:
    """One phase of the verification (tokenization, weights, forward logits, layer-by-layer, ...)."""

    name: str
    status: str
    """``"pass"``, ``"fail"`` or ``"skip"``."""
    summary: str
    details: str | None
    inputs: list[InputResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True)
class OpLevel:
    """The op-level judgement of one input in one tier: each op recomputed on the port's own
    inputs; ``first_divergence`` is where a difference is *made*."""

    tier: str
    input: str
    passed: bool
    first_divergence: str | None
    verdict: str
    ops: list[dict[str, Any]]


@dataclass(frozen=True)
class Divergence:
    """Where the port first diverges: ``tensor`` (a trace name) and ``kind``, ``"made"`` (found by
    the op-level check) or ``"end_to_end"``."""

    tensor: str
    kind: str


@dataclass(frozen=True)
class Report:
    """The outcome of ``lockstep verify --port-trace``."""

    title: str
    model: str
    passed: bool
    status: str
    """The CLI's overall status line: ``PASS``, ``FAIL`` or ``PASS with N phase(s) skipped``."""
    first_divergence: Divergence | None
    phases: list[Phase]
    op_level: list[OpLevel]
    returncode: int
    """The CLI's exit code (0 passed, 1 failed)."""
    json_path: Path | None
    markdown_path: Path | None
    html_path: Path | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    """The whole JSON report."""

    @property
    def verdict(self) -> str:
        """``"PASS"`` or ``"FAIL"``."""
        return "PASS" if self.passed else "FAIL"

    @property
    def per_layer(self) -> list[LayerRow]:
        """The per-layer table of every input and tier (from the layer-by-layer phases)."""
        return [
            row
            for p in self.phases
            if p.name.startswith("layer-by-layer")
            for i in p.inputs
            for row in i.per_layer
        ]

    def phase(self, name: str) -> Phase:
        """The phase whose name is ``name`` or starts with it (``"weights"``, ``"layer-by-layer"``)."""
        for p in self.phases:
            if p.name == name:
                return p
        for p in self.phases:
            if p.name.startswith(name):
                return p
        raise KeyError(name)


def binary() -> Path:
    """The ``lockstep`` executable: ``LOCKSTEP_BIN``, else the one installed with this package
    (the environment's scripts folder), else the first on ``PATH``."""
    env = os.environ.get("LOCKSTEP_BIN")
    if env:
        return Path(env)
    exe = "lockstep.exe" if os.name == "nt" else "lockstep"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    for c in candidates:
        if c.is_file():
            return c
    found = shutil.which("lockstep")
    if found:
        return Path(found)
    raise LockstepError("cannot find the lockstep binary (install the lockstep wheel, or set LOCKSTEP_BIN)")


def _has_reference() -> bool:
    """True when this interpreter can import torch and transformers (nothing is imported)."""
    return all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def _trace_dtype(path: Path) -> str | None:
    """The ``dtype`` metadata of a safetensors trace (its header only; no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise LockstepError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise LockstepError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LockstepError(f"{path}: not a safetensors file ({e})") from None
    return (header.get("__metadata__") or {}).get("dtype")


def verify_port(
    model: str | os.PathLike[str],
    traces: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    dtype: str | None = None,
    *,
    json_path: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    html: str | os.PathLike[str] | None = None,
    python: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    quiet: bool = True,
) -> Report:
    """Verifies a port's traces against transformers and returns the :class:`Report`.

    ``model``: the checkpoint folder (config.json + safetensors) the port ran. ``traces``: one
    trace file or several, each written with ``lockstep_reference.writer.TraceWriter`` (its
    ``token_ids`` and ``dtype`` metadata say what the reference runs). ``dtype``: when given,
    every trace must have been written in that dtype (``f64``, ``f32`` or ``bf16``); the trace's
    own metadata picks the tier either way. ``json_path``/``report``/``html``: keep the JSON,
    Markdown and HTML reports there (by default they go to a temporary folder and only the data
    is kept). ``python``: the reference environment's python. ``cache``: lockstep's cache folder
    (``LOCKSTEP_CACHE``). ``quiet``: hide the CLI's progress on stderr.

    A port that fails verification is a :class:`Report` with ``passed`` False; a run that could
    not verify (bad input, no reference) raises :class:`LockstepError`.
    """
    if isinstance(traces, (str, os.PathLike)):
        traces = [traces]
    trace_paths: Sequence[Path] = [Path(t) for t in traces]
    if not trace_paths:
        raise LockstepError("no trace given")
    for t in trace_paths:
        if not t.is_file():
            raise LockstepError(f"{t}: no such trace file")
        if dtype is not None:
            got = _trace_dtype(t)
            if got != dtype:
                raise LockstepError(f"{t}: written in {got or 'an unknown dtype'}, not {dtype}")

    env = dict(os.environ)
    if python is not None:
        env["LOCKSTEP_PYTHON"] = str(python)
    elif "LOCKSTEP_PYTHON" not in env and _has_reference():
        env["LOCKSTEP_PYTHON"] = sys.executable
    if cache is not None:
        env["LOCKSTEP_CACHE"] = str(cache)

    with tempfile.TemporaryDirectory(prefix="lockstep-") as tmp:
        tmpd = Path(tmp)
        js = Path(json_path) if json_path is not None else tmpd / "verify.json"
        md = Path(report) if report is not None else tmpd / "verify.md"
        ht = Path(html) if html is not None else tmpd / "verify.html"
        cmd = [
            str(binary()),
            "verify",
            "--model",
            str(model),
            "--port-trace",
            *[str(t) for t in trace_paths],
            "--json",
            str(js),
            "--report",
            str(md),
            "--plot",
            str(tmpd / "verify.svg"),
            "--html",
            str(ht),
        ]
        proc = subprocess.run(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if quiet else None,
            text=True,
        )
        if proc.returncode not in (0, 1) or not js.is_file():
            lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
            msg = lines[-1] if lines else f"lockstep exited with {proc.returncode}"
            raise LockstepError(msg, proc.returncode)
        raw = json.loads(js.read_text())
    return _report(
        raw,
        proc.returncode,
        js if json_path is not None else None,
        md if report is not None else None,
        ht if html is not None else None,
    )


def _layer(tier: str, label: str, r: dict[str, Any]) -> LayerRow:
    return LayerRow(
        tier=tier,
        input=label,
        layer=int(r["layer"]),
        ours_vs_ref=r.get("ours_vs_ref"),
        worst_tensor=r.get("worst_tensor"),
        ref_vs_oracle=r.get("ref_vs_oracle"),
        ours_vs_oracle=r.get("ours_vs_oracle"),
        passed=bool(r.get("passed")),
    )


def _report(
    raw: dict[str, Any],
    returncode: int,
    json_path: Path | None,
    markdown_path: Path | None,
    html_path: Path | None,
) -> Report:
    phases = []
    for p in raw.get("phases", []):
        comps = p.get("comparisons") or {}
        inputs = [
            InputResult(
                label=i["label"],
                passed=bool(i["passed"]),
                tier=i["tier"],
                verdict=i["verdict"],
                first_divergence=i.get("first_divergence"),
                tokens=i.get("tokens"),
                per_layer=[_layer(i["tier"], i["label"], r) for r in i.get("per_layer") or []],
            )
            for i in comps.get("inputs", [])
        ]
        phases.append(Phase(p["name"], p["status"], p["summary"], p.get("details"), inputs))
    op_level = [
        OpLevel(o["tier"], o["input"], bool(o["passed"]), o.get("first_divergence"), o["verdict"], o["ops"])
        for o in raw.get("op_level") or []
    ]
    first = raw.get("first_divergence")
    made = any(o.first_divergence == first for o in op_level) if first else False
    passed = bool(raw.get("passed"))
    return Report(
        title=raw.get("title", ""),
        model=raw.get("model", ""),
        passed=passed,
        status=raw.get("status") or ("PASS" if passed else "FAIL"),
        first_divergence=Divergence(first, "made" if made else "end_to_end") if first else None,
        phases=phases,
        op_level=op_level,
        returncode=returncode,
        json_path=json_path,
        markdown_path=markdown_path,
        html_path=html_path,
        raw=raw,
    )
