"""Helpers of replay_old_report.sh: run the JAX port on the old report's prompts once as written and
once per mistake (`traces`), then tabulate what `lockstep verify --port-trace` said (`summary`).

    python replay.py traces --model DIR --dtype bf16 --out-dir D [--extra-prompt TEXT]   # one process per dtype
    python replay.py summary D/verify-bf16.json D/verify-f32.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PROMPTS = ["Hello", "The", "123"]  # the old report's three inputs
VARIANTS = [None, "default-precision", "default-precision-tpu", "rope-bf16-inv-freq", "softmax-bf16",
            "norm-variance-bf16", "residual-bf16", "no-qkv-bias", "interleaved-rope", "eps-outside-sqrt"]


def traces(model: str, dtype: str, out_dir: str, extra: list[str] | None = None) -> None:
    import port as jp

    jp.setup_jax(dtype)
    import jax
    import jax.numpy as jnp

    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    loaded = jp.Qwen2Port(jax, jnp, model, cfg, dtype)
    os.makedirs(out_dir, exist_ok=True)
    for variant in VARIANTS:
        for i, prompt in enumerate(PROMPTS + (extra or [])):
            out = os.path.join(out_dir, f"{dtype}-{variant or 'as-written'}-{i}.safetensors")
            jp.run(model, jp.tokenize(model, prompt), dtype, out, variant, prompt, port=loaded)
            print(out)


def _cell(inputs: list[dict], ops: dict[str, dict]) -> str:
    """One table cell: pass, or where the difference is *made* (the op-level judgement: each op on the
    port's own inputs) and where the end-to-end comparison first fails, and on which prompts."""
    def op_ok(c):
        return ops.get(c["label"], {}).get("passed", True)
    failed = [c for c in inputs if not c["passed"] or not op_ok(c)]
    if not failed:
        return "pass: " + ", ".join(sorted({c["verdict"] for c in inputs}))
    made = sorted({ops[c["label"]]["first_divergence"] for c in failed
                   if not op_ok(c) and ops[c["label"]]["first_divergence"]})
    e2e = sorted({c["first_divergence"] or "?" for c in failed if not c["passed"]})
    parts = ([f"made at {', '.join(made)}"] if made else []) + ([f"end-to-end at {', '.join(e2e)}"] if e2e else [])
    where = "" if len(failed) == len(inputs) else " (" + ", ".join(c["label"].split(" (")[0] for c in failed) + ")"
    judged = sorted({c["judged_as"] for c in inputs if "judged_as" in c})
    note = f" [data is {', '.join(judged)}: judged as such]" if judged else ""
    return "FAIL " + "; ".join(parts) + where + note


def summary(paths: list[str]) -> None:
    cols = []
    for p in paths:
        with open(p) as f:
            js = json.load(f)
        # The run's dtype; a trace whose data is finer than its claim is judged in its data's tier
        # (a separate phase), and its cell says so.
        tier = os.path.basename(p).removeprefix("verify-").removesuffix(".json")
        by_variant: dict[str, list[dict]] = {}
        for phase in (ph for ph in js["phases"] if ph["name"].startswith("layer-by-layer")):
            judged = phase["name"].split("[")[1].rstrip("]")
            for c in phase["comparisons"]["inputs"]:
                producer = c.get("test_producer") or "?"
                variant = producer[len("jax_qwen2["):-1] if "[" in producer else "as written"
                if judged != tier:
                    c = {**c, "judged_as": judged}
                by_variant.setdefault(variant, []).append(c)
        tok = next((ph for ph in js["phases"] if ph["name"] == "tokenization"), None)
        ops = {o["input"]: o for o in js.get("op_level", [])}
        cols.append((tier, by_variant, tok, ops))
    header = ["port"] + [f"{t} tier" + (" (the old report's setup)" if t == "bf16" else "") for t, _, _, _ in cols]
    rows = []
    for v in ["as written"] + [v for v in VARIANTS if v]:
        rows.append([v if v == "as written" else f"--mistake {v}"]
                    + [_cell(bv[v], ops) if v in bv else "-" for _, bv, _, ops in cols])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths, strict=False)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    for tier, _, tok, _ in cols:
        if tok:
            print(f"tokenization ({tier} run): {tok['status'].upper()} - {tok['summary']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("traces")
    t.add_argument("--model", required=True)
    t.add_argument("--dtype", required=True, choices=["f64", "f32", "bf16"])
    t.add_argument("--out-dir", required=True)
    t.add_argument("--extra-prompt", action="append", default=[],
                   help="a prompt run besides the old report's three (repeatable)")
    s = sub.add_parser("summary")
    s.add_argument("json", nargs="+")
    a = ap.parse_args()
    if a.cmd == "traces":
        traces(a.model, a.dtype, a.out_dir, a.extra_prompt)
    else:
        summary(a.json)
