"""Aggregate decode throughput of N concurrent clients of `lockstep serve` against one client alone.

    python scripts/bench_serve.py --model fixtures/models/smollm2-135m-instruct [--clients 8]
        [--max-tokens 64] [--rounds 3] [--dtype f32] [--lockstep target/release/lockstep]
    python scripts/bench_serve.py --base-url http://127.0.0.1:8080/v1 ...   (a running server)

Every request streams a greedy completion of exactly --max-tokens tokens (EOS ignored) from a
short prompt of its own. A request's decode rate is (tokens - 1) / (time of its last token - time
of its first), so the prompt's prefill is left out; "alone" is the median over --rounds single
requests, "together" the median over --rounds rounds of --clients requests started at once of
(every client's tokens - 1, summed) / (last token of the round - first first token), which includes the stalls while the
round's prompts are prefilled; "steady state" counts the text chunks (about one per token) while
all clients are decoding. Prints one
table and a last JSON line. A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "The three primary colors are",
    "Water boils at",
    "My favourite programming language is",
    "In 1969, the first humans",
    "A haiku about autumn:",
]


def one(c: openai.OpenAI, model: str, prompt: str, n: int) -> tuple[float, float, int, list[float]]:
    """(time of the first token, time of the last, tokens, every text chunk's time) of one
    streaming request."""
    first = last = None
    tokens = 0
    times = []
    s = c.completions.create(
        model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    for ch in s:
        now = time.perf_counter()
        if ch.choices and ch.choices[0].text:
            first = first or now
            last = now
            times.append(now)
        if ch.usage:
            tokens = ch.usage.completion_tokens
    return first, last, tokens, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="start `lockstep serve` on this model")
    ap.add_argument("--base-url", help="use a running server instead")
    ap.add_argument("--lockstep", default="target/release/lockstep")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    server = None
    if a.base_url is None:
        if a.model is None:
            sys.exit("error: give --model or --base-url")
        server = subprocess.Popen(
            [a.lockstep, "serve", "--model", str(a.model), "--port", "0", "--dtype", a.dtype,
             "--max-batch", str(max(a.clients, 1))],
            stderr=subprocess.PIPE, text=True,
        )
        for line in server.stderr:
            if line.startswith("listening on http://"):
                a.base_url = line.split()[-1].strip() + "/v1"
                break
        else:
            sys.exit("error: lockstep serve did not start")
    try:
        c = openai.OpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=600)
        model = c.models.list().data[0].id
        one(c, model, PROMPTS[0], 4)  # warm-up
        alone = []
        for r in range(a.rounds):
            f, last, n, _ = one(c, model, PROMPTS[r % len(PROMPTS)], a.max_tokens)
            alone.append((n - 1) / (last - f))
        together, steady = [], []
        for _ in range(a.rounds):
            res = [None] * a.clients
            barrier = threading.Barrier(a.clients)

            def run(i, barrier=barrier, res=res):
                barrier.wait()
                res[i] = one(c, model, PROMPTS[i % len(PROMPTS)], a.max_tokens)

            ts = [threading.Thread(target=run, args=(i,)) for i in range(a.clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            start = min(r[0] for r in res)
            end = max(r[1] for r in res)
            together.append(sum(r[2] - 1 for r in res) / (end - start))
            # While every client is decoding: from the last first token to the first last one.
            lo, hi = max(r[0] for r in res), min(r[1] for r in res)
            if hi > lo:
                chunks = sum(sum(1 for t in r[3] if lo < t <= hi) for r in res)
                steady.append(chunks / (hi - lo))
        a1, an = statistics.median(alone), statistics.median(together)
        print(f"one client alone:      {a1:8.1f} tok/s decode (median of {a.rounds})")
        print(f"{a.clients} clients together: {an:8.1f} tok/s aggregate decode (median of {a.rounds})")
        print(f"ratio:                 {an / a1:8.2f}x (ideal {a.clients}x)")
        st = statistics.median(steady) if steady else float("nan")
        print(f"steady state (all {a.clients} decoding): {st:8.1f} text chunks/s, {st / a1:.2f}x one client")
        print(json.dumps({
            "clients": a.clients, "max_tokens": a.max_tokens, "rounds": a.rounds, "dtype": a.dtype,
            "alone_tok_s": alone, "together_tok_s": together,
            "alone_median": a1, "together_median": an, "ratio": an / a1,
            "steady_chunks_s": steady, "steady_ratio": st / a1,
        }))
    finally:
        if server is not None:
            server.send_signal(2)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
