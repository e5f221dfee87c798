#!/usr/bin/env python3
"""Side-by-side speed of lockstep and PyTorch + transformers on this machine (a benchmark, not a test).

For each model: lockstep in each dtype (`lockstep bench --json`, one greedy run per measurement),
PyTorch (transformers, bf16 with sdpa attention and f32) and, with `--llama-cpp`, llama.cpp
(`llama-bench`, on bf16 and f16 GGUF files its own `convert_hf_to_gguf.py` makes from the folder)
measured in turns, round after round, so a load elsewhere on the machine hits them alike; each
number is the median over the rounds. Prefill: one forward pass over P random token ids (P = 128
and 512 by default). Decode: greedy steps with the KV cache after a short prompt, and with
`--depth D` also after D tokens of context. Prints a Markdown table with each row's ratio to
PyTorch bf16, then each lockstep row's ratios round by round (to its baseline, to llama.cpp bf16
when measured, and its decode after D tokens over its own short decode).

Every decode is set beside lockstep's read-bandwidth test, run just before and just after it
(lockstep's inside `lockstep bench`, llama.cpp's bf16 and f16 ones through `lockstep bench
--bandwidth-only`): each round's line gives the bandwidth and the fraction of it the decode read
(llama.cpp's weights as its GGUF stores them, 2 bytes a value), and the round-by-round section also
gives lockstep's decode against llama.cpp bf16's per GB/s of the bandwidth measured beside each, so a
round whose memory was busier for one engine than the other can be told from a slower engine.

`--quantized Q8_0 Q4_K_M` (needs `--llama-cpp`) adds quantized GGUF files that llama.cpp's own
`llama-quantize` makes from the bf16 conversion: lockstep in the exact mode (`--dtype f32`: the
stored blocks decoded to exactly transformers' dequantized values) and in the fast mode
(`--dtype q8dot`: llama.cpp's 8-bit activations and integer dot products) against llama.cpp on the
same file; those rows give the ratio to llama.cpp on that file.

Run with the reference environment's python from the repository root, after a release build:

    cargo build --release -p lockstep-cli
    .venv/bin/python scripts/bench_compare.py [--models DIR ...] [--rounds 3] [--prefill 128 512] [--decode 32]
        [--depth 2048] [--llama-cpp] [--quantized Q8_0 Q4_K_M] [--coded-bf16] [--engines REGEX]

`--llama-cpp` builds llama.cpp first when needed (`bash scripts/llama_cpp.sh`, ~10 min once).
(`LOCKSTEP_BIN` overrides the lockstep binary.)
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKSTEP = Path(os.environ.get("LOCKSTEP_BIN", ROOT / "target" / "release" / "lockstep"))
DEFAULT_MODELS = [
    ROOT / "fixtures" / "models" / "qwen2.5-0.5b-random",
    ROOT / "fixtures" / "models" / "smollm2-135m-instruct",
]
DECODE_PROMPT = 16


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def stored_dtype(model):
    cfg = json.loads((model / "config.json").read_text())
    return cfg.get("torch_dtype") or cfg.get("dtype") or "float32"


def lockstep_run(model, dtype, prompt_tokens, new_tokens, env=None):
    """The JSON report of one `lockstep bench` run (`env`: variables set for it alone)."""
    out = subprocess.run(
        [
            str(LOCKSTEP),
            "bench",
            "--model",
            str(model),
            "--dtype",
            dtype,
            "--prompt-tokens",
            str(prompt_tokens),
            "--new-tokens",
            str(new_tokens),
            "--repeat",
            "1",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_bandwidth():
    """The machine's read bandwidth now, in bytes/s: lockstep's own test (`lockstep bench
    --bandwidth-only`, the one each lockstep decode is judged against)."""
    out = subprocess.run([str(LOCKSTEP), "bench", "--bandwidth-only", "--json"], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["read_bandwidth_bytes_per_s"]


def matrix_values(model: Path):
    """Values in the linear layers and the LM head of a dense Qwen2/Llama folder, the weights one decode
    step reads (None for a mixture of experts, whose steps read only some)."""
    c = json.loads((model / "config.json").read_text())
    if c.get("num_experts") or c.get("num_local_experts"):
        return None
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c.get("num_key_value_heads", c["num_attention_heads"]) * d
    return layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + vocab * h


def llama_cpp_bin() -> Path:
    """The folder of llama.cpp's programs (built by scripts/llama_cpp.sh when missing)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "llama_cpp.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def llama_cpp_gguf(model: Path, outtype: str) -> Path:
    """`model` converted to a GGUF file of `outtype` by llama.cpp's own convert_hf_to_gguf.py (cached
    beside the other caches; remade when the folder's config or weights are newer)."""
    src = Path(subprocess.run(["bash", str(ROOT / "scripts" / "llama_cpp.sh"), "--src"], check=True,
                              capture_output=True, text=True).stdout.strip())
    cache = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep")) / "gguf"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{model.resolve().name}-{outtype}.gguf"
    newest = max(f.stat().st_mtime for f in model.iterdir())
    if not out.exists() or out.stat().st_mtime < newest:
        pythonpath = subprocess.run(["bash", str(ROOT / "scripts" / "llama_cpp.sh"), "--pythonpath"], check=True,
                                    capture_output=True, text=True).stdout.strip()
        env = dict(os.environ, PYTHONPATH=pythonpath)
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def llama_cpp_quantized(binary: Path, model: Path, qtype: str) -> Path:
    """The bf16 conversion of `model` quantized to `qtype` by llama.cpp's own llama-quantize (cached;
    remade when the bf16 file is newer)."""
    src = llama_cpp_gguf(model, "bf16")
    out = src.with_name(f"{model.resolve().name}-{qtype}.gguf")
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        partial = out.with_suffix(".partial")
        env = dict(os.environ, LD_LIBRARY_PATH=str(binary))
        subprocess.run([str(binary / "llama-quantize"), str(src), str(partial), qtype, str(os.cpu_count() or 1)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial.rename(out)
    return out


class LlamaCpp:
    """llama.cpp's `llama-bench` on one GGUF file (its defaults: flash attention auto, f16 KV cache).
    `read_bytes`: the bytes of weights one decode step reads (bf16 and f16 files), when known: then
    each decode is set beside lockstep's read-bandwidth test, run just before and just after it, as
    lockstep's own decodes are (`notes`, `last_bandwidth`)."""

    def __init__(self, binary: Path, gguf: Path, threads: int, read_bytes=None):
        self.bench, self.gguf, self.threads, self.read_bytes = binary / "llama-bench", gguf, threads, read_bytes
        self.notes, self.last_bandwidth = [], None

    def _run(self, *args) -> float:
        out = subprocess.run([str(self.bench), "-m", str(self.gguf), "-t", str(self.threads), "-r", "1",
                              "-o", "json", *map(str, args)], check=True, capture_output=True, text=True)
        return float(json.loads(out.stdout)[0]["avg_ts"])

    def prefill(self, n):
        return self._run("-p", n, "-n", 0)

    def decode(self, steps, depth=0):
        def run():
            return self._run("-p", 0, "-n", steps, "-d", max(depth, DECODE_PROMPT))
        if self.read_bytes is None:
            return run()
        before = read_bandwidth()
        tok_s = run()
        self.last_bandwidth = max(before, read_bandwidth())
        self.notes.append(f"decode @{max(depth, DECODE_PROMPT)}: bandwidth {self.last_bandwidth / 1e9:.1f} GB/s, "
                          f"{100 * tok_s * self.read_bytes / self.last_bandwidth:.1f}% read")
        return tok_s


class Lockstep:
    """`lockstep bench` in one dtype. `notes`: what its decode runs of the round report beside the
    speed (the process's memory in 2 MiB pages, the measured read bandwidth and the fraction of it the
    decode read), to tell a slow machine from a slow run."""

    def __init__(self, model: Path, dtype: str, env=None):
        self.model, self.dtype, self.env, self.notes, self.last_bandwidth = model, dtype, env, [], None

    def prefill(self, n):
        return lockstep_run(self.model, self.dtype, n, 2, self.env)["prefill_tok_s"]

    def decode(self, steps, depth=0):
        v = lockstep_run(self.model, self.dtype, max(depth, DECODE_PROMPT), steps + 1, self.env)
        self.notes.append(f"decode @{max(depth, DECODE_PROMPT)}: {v['anon_huge_page_bytes'] / 1e9:.2f} GB in 2 MiB "
                          f"pages, bandwidth {v['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
                          f"{100 * v['bandwidth_fraction']:.1f}% read")
        self.last_bandwidth = v["read_bandwidth_bytes_per_s"]
        return v["decode_tok_s"]


class Torch:
    """A transformers model held in memory, timed in-process."""

    def __init__(self, model, dtype, attn):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype), attn_implementation=attn
        ).eval()
        self.vocab = self.m.config.vocab_size

    def ids(self, n, seed):
        g = self.torch.Generator().manual_seed(seed)
        return self.torch.randint(0, min(self.vocab, 1000), (1, n), generator=g)

    def prefill(self, n):
        x = self.ids(n, 1)
        with self.torch.inference_mode():
            t = time.perf_counter()
            self.m(input_ids=x, use_cache=False, logits_to_keep=1)
            return n / (time.perf_counter() - t)

    def decode(self, steps, depth=0):
        from transformers import DynamicCache

        x = self.ids(max(depth, DECODE_PROMPT), 2)
        with self.torch.inference_mode():
            cache = DynamicCache(config=self.m.config)
            out = self.m(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(steps):
                out = self.m(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            return steps / (time.perf_counter() - t)


def round_ratios(model, res, baseline, cols, depth, bandwidth):
    """Lines giving, for each lockstep row, its ratio in each round to its baseline and to llama.cpp
    bf16 (when measured) per column, and its decode after `depth` tokens over its short decode. Where
    both decodes were set beside the read-bandwidth test (`bandwidth`), also the ratio of their speeds
    per unit of the bandwidth measured beside each: what is left of the ratio once a round's luck with
    a memory other machines share is taken out (a decode that cannot follow a memory at its fastest is
    marked down by it, so read it beside the plain ratio)."""
    lines = []
    for e, cs in res.items():
        if not e.startswith("lockstep"):
            continue
        against = [baseline[e]] + ["llama.cpp bf16"] * ("llama.cpp bf16" in res and baseline[e] == "PyTorch bf16 sdpa")
        for b in against:
            parts = [f"{c} " + ", ".join(f"{x / y:.2f}×" for x, y in zip(cs[c], res[b][c], strict=True)) for c in cols]
            lines.append(f"- {model}, {e} against {b}: " + "; ".join(parts))
            per_bandwidth = [
                f"{c} " + ", ".join(f"{(x / bx) / (y / by):.2f}×" for x, bx, y, by in
                                    zip(cs[c], bandwidth[e][c], res[b][c], bandwidth[b][c], strict=True))
                for c in bandwidth.get(b, {})
                if all(bandwidth[e][c]) and all(bandwidth[b][c])]
            if per_bandwidth:
                lines.append(f"- {model}, {e} against {b}, each decode per GB/s of the read bandwidth measured "
                             f"beside it: " + "; ".join(per_bandwidth))
        if depth:
            own = ", ".join(f"{x / y:.2f}×" for x, y in zip(cs[f"decode @{depth}"], cs["decode"], strict=True))
            lines.append(f"- {model}, {e}: decode @{depth} over its own short decode: {own}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", type=Path, default=DEFAULT_MODELS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--decode", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--depth", type=int, default=0, help="also decode after this many tokens of context")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp on bf16 and f16 GGUF conversions")
    ap.add_argument("--quantized", nargs="+", default=[], metavar="TYPE",
                    help="with --llama-cpp: also these llama-quantize types (Q8_0, Q4_K_M, ...): lockstep exact "
                         "and q8dot against llama.cpp on the same file")
    ap.add_argument("--coded-bf16", action="store_true",
                    help="also a 'lockstep bf16 coded' row: the bf16 tier with LOCKSTEP_CODED_BF16=on (its "
                         "decode reads the 12-bit coding on any AVX-512 CPU; the plain row keeps the default, which "
                         "codes on AMD Zen 4/5 only), so the trade is measured in the same run")
    ap.add_argument("--engines", metavar="REGEX",
                    help="measure only the engines whose row name matches (re.search), e.g. 'bf16'; the ratio "
                         "column's baseline is always measured")
    args = ap.parse_args()
    if args.quantized and not args.llama_cpp:
        sys.exit("error: --quantized needs --llama-cpp (the files are made and compared with llama.cpp)")
    if not LOCKSTEP.exists():
        sys.exit(f"error: {LOCKSTEP} missing; run cargo build --release -p lockstep-cli")
    import torch

    threads = int(os.environ.get("RAYON_NUM_THREADS", len(os.sched_getaffinity(0))))
    torch.set_num_threads(threads)
    llama_bin = llama_cpp_bin() if args.llama_cpp else None
    rows, by_round = [], []
    for model in args.models:
        lock_dtypes = ["f32", "bf16"] + (["bf16w"] if stored_dtype(model) == "bfloat16" else [])
        # Each engine as a maker, so that those --engines leaves out are never loaded or converted.
        makers = {f"lockstep {d}": (lambda d=d, m=model: Lockstep(m, d)) for d in lock_dtypes}
        if args.coded_bf16:
            makers["lockstep bf16 coded"] = lambda m=model: Lockstep(m, "bf16", {"LOCKSTEP_CODED_BF16": "on"})
        makers["PyTorch bf16 sdpa"] = lambda m=model: Torch(m, "bfloat16", "sdpa")
        makers["PyTorch f32 sdpa"] = lambda m=model: Torch(m, "float32", "sdpa")
        if llama_bin is not None:
            for outtype in ("bf16", "f16"):
                values = matrix_values(model)
                makers[f"llama.cpp {outtype}"] = (
                    lambda o=outtype, m=model, v=values: LlamaCpp(llama_bin, llama_cpp_gguf(m, o), threads,
                                                                  v and 2 * v))
        # Quantized files: each row's ratio is to llama.cpp on the same file.
        baseline = {e: "PyTorch bf16 sdpa" for e in makers}
        for qtype in args.quantized:
            llama = f"llama.cpp {qtype}"
            makers[llama] = lambda q=qtype, m=model: LlamaCpp(llama_bin, llama_cpp_quantized(llama_bin, m, q), threads)
            for d, mode in (("f32", "exact"), ("q8dot", "fast")):
                makers[f"lockstep {qtype} {mode} ({d})"] = (
                    lambda q=qtype, d=d, m=model: Lockstep(llama_cpp_quantized(llama_bin, m, q), d))
                baseline[f"lockstep {qtype} {mode} ({d})"] = llama
            baseline[llama] = llama
        if args.engines:
            keep = re.compile(args.engines)
            wanted = [e for e in makers if keep.search(e)]
            makers = {e: m for e, m in makers.items() if e in wanted or e in {baseline[w] for w in wanted}}
        engines = {e: m() for e, m in makers.items()}
        cols = [f"prefill {p}" for p in args.prefill] + ["decode"] + ([f"decode @{args.depth}"] if args.depth else [])
        res = {e: {c: [] for c in cols} for e in engines}
        # The read bandwidth measured beside each decode (None where it was not), by engine and column.
        bandwidth = {e: {c: [] for c in cols if c.startswith("decode")} for e in engines}
        for r in range(args.rounds):
            for name, h in engines.items():
                for p in args.prefill:
                    if isinstance(h, Torch):
                        h.prefill(p)  # warm-up at this length
                    res[name][f"prefill {p}"].append(h.prefill(p))
                for c, depth in [("decode", 0)] + [(f"decode @{args.depth}", args.depth)] * bool(args.depth):
                    res[name][c].append(h.decode(args.decode, depth))
                    bandwidth[name][c].append(getattr(h, "last_bandwidth", None))
                notes = getattr(h, "notes", [])
                print(f"round {r + 1} {model.name} {name}: "
                      + ", ".join(f"{c} {res[name][c][-1]:.1f}" for c in cols)
                      + (f" ({'; '.join(notes)})" if notes else ""),
                      file=sys.stderr, flush=True)
                notes.clear()
        med = {e: {c: statistics.median(v) for c, v in cs.items()} for e, cs in res.items()}
        for e in engines:
            base = med[baseline[e]]
            rows.append((model.name, e, [(med[e][c], med[e][c] / base[c]) for c in cols]))
        by_round.extend(round_ratios(model.name, res, baseline, cols, args.depth, bandwidth))
        del engines
    print(f"\n{datetime.date.today()}, {cpu_name()}, {threads} threads, medians of {args.rounds} "
          f"alternating rounds; prefill: one forward pass over P random token ids; decode: "
          f"{args.decode} greedy steps after a {DECODE_PROMPT}-token prompt (decode @D: after D tokens); "
          f"llama.cpp: llama-bench, its defaults; (×) = ratio to "
          f"PyTorch bf16 sdpa in the same run (quantized rows: to llama.cpp on the same file)\n")
    print("| model | engine | " + " | ".join(f"{c} tok/s" for c in cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for model, e, vals in rows:
        print(f"| {model} | {e} | " + " | ".join(f"{v:.1f} ({r:.2f}×)" for v, r in vals) + " |")
    if by_round:
        print("\nRound by round (each round's own ratio; the table's ratios are of the medians):\n")
        print("\n".join(by_round))


if __name__ == "__main__":
    main()
