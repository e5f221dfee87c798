#!/usr/bin/env python3
"""Decode speed at the 7B shape: lockstep bf16 against PyTorch bf16 in one run (a benchmark, not a test).

A 7B model in bf16 is 15 GB, so the two engines cannot both hold it on a machine like this one
(23 GB): each measurement is its own process, run in turns, round after round, and the page cache
is shared between them. lockstep's number is `lockstep bench --dtype bf16 --json` (its decode
tok/s, and its achieved weight bandwidth as a fraction of the read bandwidth it measures itself);
PyTorch's is transformers' bf16 model with sdpa attention, timed in-process over the same number
of greedy KV-cache steps after a 16-token prompt. Prints each round, the medians and the ratio.

Two bandwidth figures for lockstep: the fraction of the read bandwidth its decode reads (the bytes
it reads: on a CPU where the matrices are coded in 12 bits per value, 0.75 of the stored ones),
and its speed against the stored-bf16 ceiling (the read bandwidth over the stored weights' bytes:
the most a decode reading every stored byte once could do). Where the codings replace the
matrices (a 7B on a 23 GB machine), the first lockstep run codes them and writes the cache file
(`LOCKSTEP_CODED_CACHE`, README), and a lockstep run after PyTorch's finds part of that file
pushed out of the page cache by PyTorch's 15 GB: its load reads it back from disk (the "load"
column); a run after another lockstep run finds it whole.

PyTorch's decode is set beside the same read-bandwidth test as lockstep's (`lockstep bench
--bandwidth-only`, run from PyTorch's process just before and just after its timed steps, the
better of the two taken, as `lockstep bench` takes for its own): each round gives the fraction of
that bandwidth PyTorch's decode read (the stored bf16 weights, every one once a step) and the two
engines' speeds per GB/s of the bandwidth measured beside each. This machine's memory runs at one
of two levels that change from minute to minute (~50 and ~85 GB/s here), so a round whose two
decodes met different levels shows as a ratio of speeds far from the ratio per GB/s.

Run with the reference environment's python from the repository root, after a release build and
the fixture (`python -m lockstep_reference make-7b`, see the README):

    cargo build --release -p lockstep-cli
    .venv/bin/python scripts/bench_7b.py [--model fixtures/big/qwen2.5-7b-random] [--rounds 3] [--decode 16]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKSTEP = Path(os.environ.get("LOCKSTEP_BIN", ROOT / "target" / "release" / "lockstep"))
PROMPT = 16

# PyTorch's side, run in a child process so that its 15 GB are gone before lockstep runs.
TORCH = r"""
import json, subprocess, sys, time, torch
from transformers import AutoModelForCausalLM, DynamicCache
model, steps, threads, prompt, lockstep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
def bandwidth():
    out = subprocess.run([lockstep, "bench", "--bandwidth-only", "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["read_bandwidth_bytes_per_s"]
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
load = time.perf_counter() - t
x = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(2))
with torch.inference_mode():
    cache = DynamicCache(config=m.config)
    out = m(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    before = bandwidth()
    t = time.perf_counter()
    for _ in range(steps):
        out = m(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    tok_s = steps / (time.perf_counter() - t)
    print(tok_s, load, max(before, bandwidth()))
"""


def lockstep(model: Path, steps: int) -> dict:
    out = subprocess.run(
        [str(LOCKSTEP), "bench", "--model", str(model), "--dtype", "bf16", "--prompt-tokens",
         str(PROMPT), "--new-tokens", str(steps + 1), "--repeat", "1", "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_decode(model: Path, steps: int, threads: int) -> tuple[float, float, float]:
    """PyTorch's decode tok/s, its load time in seconds, and the read bandwidth (bytes/s) measured
    beside its decode."""
    out = subprocess.run(
        [sys.executable, "-c", TORCH, str(model), str(steps), str(threads), str(PROMPT), str(LOCKSTEP)],
        check=True, capture_output=True, text=True,
    )
    tok_s, load, bandwidth = out.stdout.split()
    return float(tok_s), float(load), float(bandwidth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures" / "big" / "qwen2.5-7b-random")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=16, help="decode steps per measurement")
    args = ap.parse_args()
    if not LOCKSTEP.exists():
        sys.exit(f"error: {LOCKSTEP} missing; run cargo build --release -p lockstep-cli")
    if not (args.model / "config.json").exists():
        sys.exit(f"error: {args.model} is not a model folder (make it with make-7b, see the README)")
    threads = int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count() or 1))
    rows = []
    for r in range(args.rounds):
        v = lockstep(args.model, args.decode)
        t, t_load, t_bw = torch_decode(args.model, args.decode, threads)
        l_bw, stored = v["read_bandwidth_bytes_per_s"], v["decode_weight_bytes"]
        ceiling = l_bw / stored
        # Speeds per GB/s of the bandwidth measured beside each decode.
        per_bw = (v["decode_tok_s"] / l_bw) / (t / t_bw)
        rows.append((v["decode_tok_s"], v["bandwidth_fraction"], v["load_s"], t, t_load,
                     v["decode_tok_s"] / ceiling, t * stored / t_bw, v["decode_tok_s"] / t, per_bw))
        print(f"round {r + 1}: lockstep bf16 {v['decode_tok_s']:.3f} tok/s "
              f"({100 * v['bandwidth_fraction']:.0f}% of {l_bw / 1e9:.1f} GB/s read, "
              f"{100 * v['decode_tok_s'] / ceiling:.0f}% of the stored-bf16 ceiling {ceiling:.2f} tok/s; "
              f"load {v['load_s']:.2f} s, codings {v.get('coded_cache', 'none')}, "
              f"peak RSS {v['peak_rss_bytes'] / 1e9:.2f} GB); "
              f"PyTorch bf16 {t:.3f} tok/s ({100 * t * stored / t_bw:.0f}% of {t_bw / 1e9:.1f} GB/s read, "
              f"load {t_load:.1f} s); ratio {v['decode_tok_s'] / t:.2f}, per GB/s {per_bw:.2f}",
              flush=True)
    med = [statistics.median(c) for c in zip(*rows, strict=True)]
    print(f"\n{args.model.name}, {threads} threads, {args.decode} greedy steps after a {PROMPT}-token prompt, "
          f"medians of {args.rounds} alternating rounds:")
    print(f"lockstep bf16 {med[0]:.3f} tok/s ({100 * med[1]:.0f}% of the measured read bandwidth, "
          f"{100 * med[5]:.0f}% of the stored-bf16 ceiling, load {med[2]:.2f} s); "
          f"PyTorch bf16 sdpa {med[3]:.3f} tok/s ({100 * med[6]:.0f}% of the read bandwidth measured beside it)")
    print(f"ratio by round {', '.join(f'{row[7]:.2f}' for row in rows)} (median {med[7]:.2f}); "
          f"per GB/s of the bandwidth beside each {', '.join(f'{row[8]:.2f}' for row in rows)} "
          f"(median {med[8]:.2f})")

if __name__ == "__main__":
    main()
