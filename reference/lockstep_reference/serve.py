"""`python -m lockstep_reference serve`: many commands in one process.

A `lockstep verify` run asks the reference for six things (tokens, chat renderings, weight
checksums, traces, op-level results, generations); started once each, the process imported torch
and transformers six times, ~7 s of one core each on a 2-core machine (the 7B plan, 2026-12-03),
with the other core idle meanwhile. Here they are imported once.

Protocol (one line each way, UTF-8 JSON):
- request: the command's arguments as on the command line, e.g. `["tokenize-batch", "--model",
  "m", "--texts", "t.json"]`;
- answer: `{"ok": true, "stdout": "<what the command printed on stdout>"}` or `{"ok": false,
  "error": "<one line: what a one-shot run's traceback ends with>"}`.
The command's progress goes to stderr as in a one-shot run. Anything written straight to file
descriptor 1 by native code goes to stderr too: the protocol has its own copy of stdout.
Between commands the memory a command freed goes back to the system (`gc.collect`, then glibc's
`malloc_trim`) and torch's thread count is put back (`generate-batch` sets its own). The loop ends
at the end of stdin (the verifier closed it or died).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import os
import sys


class _LastLine(io.TextIOBase):
    """A text stream that writes through to `out` and remembers the last non-empty line written,
    so an error printed on stderr (argparse's usage error) can also be the answer's message."""

    def __init__(self, out):
        self.out = out
        self.last = ""

    def write(self, s: str) -> int:
        self.out.write(s)
        lines = [line for line in s.splitlines() if line.strip()]
        if lines:
            self.last = lines[-1].strip()
        return len(s)

    def flush(self) -> None:
        self.out.flush()


def _release_memory() -> None:
    """Freed Python objects collected and glibc's free heap handed back to the system (no-op where
    libc has no `malloc_trim`)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_one(main, argv: list[str]) -> dict:
    """Runs `main(argv)` with its stdout captured; the answer object of the protocol."""
    import torch

    threads = torch.get_num_threads()
    captured = io.StringIO()
    err = _LastLine(sys.stderr)
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(err):
            main(argv)
        return {"ok": True, "stdout": captured.getvalue()}
    except SystemExit as e:
        if e.code in (None, 0):
            return {"ok": True, "stdout": captured.getvalue()}
        message = e.code if isinstance(e.code, str) else (err.last or f"exit status {e.code}")
        return {"ok": False, "error": message}
    except Exception as e:  # noqa: BLE001 - every failure becomes the answer's one line
        import traceback

        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        torch.set_num_threads(threads)
        _release_memory()


def serve(main) -> None:
    """The loop: one request line in, one answer line out, until stdin ends."""
    # The protocol's own stdout; file descriptor 1 now points at stderr, so native code printing
    # there cannot break an answer line.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), encoding="utf-8", line_buffering=True)
    # Imported now, once: what every command needs (torch, transformers through the tracer).
    from . import batch, streamed, tracer  # noqa: F401

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            argv = json.loads(line)
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("a request is a JSON list of strings")
            if argv[:1] == ["serve"]:
                raise ValueError("serve cannot be nested")
        except ValueError as e:
            answer = {"ok": False, "error": f"bad request: {e}"}
        else:
            answer = run_one(main, argv)
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()
