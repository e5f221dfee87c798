"""Command line: python -m lockstep_reference <subcommand> ...  (see --help)."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Local folders only: never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parse_tokens(text: str) -> list[int]:
    text = text.strip()
    if text.startswith("["):
        return [int(t) for t in json.loads(text)]
    return [int(t) for t in text.split(",") if t.strip()]


def _add_input(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", type=_parse_tokens, help="token ids, e.g. 1,2,3 (or a JSON array)")
    g.add_argument("--prompt", help="text, tokenized with the model folder's tokenizer (no special tokens)")


def cmd_trace(args) -> None:
    if args.streamed and (args.device or args.device_map):
        raise SystemExit("--streamed runs on this CPU: it takes no --device or --device-map")
    if args.streamed:
        cmd_trace_streamed(args)
        return
    from .tracer import trace

    device_map = args.device_map
    if device_map is not None and device_map.startswith("{"):
        device_map = json.loads(device_map)
    tensors = trace(args.model, args.out, args.dtype, token_ids=args.tokens, prompt=args.prompt,
                    device=args.device, device_map=device_map)
    print(f"wrote {args.out}: {len(tensors)} tensors, {tensors['tokens'].shape[1]} tokens, dtype {args.dtype}")


def cmd_trace_streamed(args) -> None:
    import time

    from .streamed import peak_rss_mib, trace_streamed

    t0 = time.time()
    tensors = trace_streamed(args.model, args.out, token_ids=args.tokens, prompt=args.prompt, dtype=args.dtype,
                             log=lambda m: print(f"[streamed] {m}", file=sys.stderr, flush=True))
    print(f"wrote {args.out}: {len(tensors)} tensors, {tensors['tokens'].shape[1]} tokens, dtype {args.dtype} "
          f"(streamed), {time.time() - t0:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")


def cmd_make_7b(args) -> None:
    from .make_7b import SHAPES, make_7b

    seed = SHAPES[args.shape].seed if args.seed is None else args.seed
    print(json.dumps(make_7b(args.out, seed, args.tokenizer, args.shape)))


def cmd_tokenize(args) -> None:
    from .tracer import tokenize

    print(json.dumps(tokenize(args.model, args.text)))


def cmd_fingerprint(args) -> None:
    from .st_io import model_fingerprint

    print(model_fingerprint(args.model))


def cmd_oracle(args) -> None:
    import numpy as np
    import torch

    from .numpy_oracle import oracle_trace
    from .st_io import model_fingerprint
    from .tracer import tokenize, write_safetensors

    ids = args.tokens if args.tokens is not None else tokenize(args.model, args.prompt)
    arrays = oracle_trace(args.model, ids)
    with open(f"{args.model}/config.json") as f:
        config = json.load(f)
    meta = {
        "producer": "lockstep_reference.numpy_oracle",
        "numpy_version": np.__version__,
        "dtype": "f64",
        "attn_implementation": "eager",
        "pure_f64": "true",
        "model_type": config["model_type"],
        "num_layers": str(config["num_hidden_layers"]),
        "token_ids": json.dumps(ids),
        "model_fingerprint": model_fingerprint(args.model),
        "config": json.dumps(config, separators=(",", ":")),
    }
    if args.prompt is not None:
        meta["prompt"] = args.prompt
    write_safetensors(args.out, {k: torch.from_numpy(v) for k, v in arrays.items()}, meta)
    print(f"wrote {args.out}: {len(arrays)} tensors, {len(ids)} tokens")


def cmd_diff(args) -> None:
    from safetensors.numpy import load_file

    a, b = load_file(args.a), load_file(args.b)
    worst = 0.0
    for name in a:
        if name not in b:
            print(f"{name:28s} only in {args.a}")
            continue
        x, y = a[name].astype("float64"), b[name].astype("float64")
        if x.shape != y.shape:
            print(f"{name:28s} shape {x.shape} vs {y.shape}")
            continue
        d = float(abs(x - y).max()) if x.size else 0.0
        worst = max(worst, d) if name != "tokens" else worst
        print(f"{name:28s} max|a-b| {d:.3e}   max|a| {float(abs(x).max()) if x.size else 0.0:.3e}")
    for name in b:
        if name not in a:
            print(f"{name:28s} only in {args.b}")
    print(f"max over tensors: {worst:.3e}")


def cmd_make_default(args) -> None:
    from .fixtures import build_default_model

    print(build_default_model(args.out, args.tokenizer))


def cmd_fixtures(args) -> None:
    from . import fixtures as fx

    root = args.root
    if args.only:
        tok = fx.qwen_tokenizer(root)
        for name in args.only:
            if name == fx.SMOLLM2_MODEL:
                fx.ensure_smollm2(root)
            else:
                fx.ensure_model(root, name, tok)
    else:
        fx.build_all(root, big=not args.no_big)


def cmd_vocab_cases(args) -> None:
    from .vocab_cases import check_tokenizer

    n, bad = check_tokenizer(args.tokenizer, args.inp)
    for text, expected, got in bad:
        print(f"MISMATCH {text!r}: expected {expected}, got {got}")
    print(f"{n - len(bad)}/{n} cases match")
    sys.exit(1 if bad else 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m lockstep_reference`."""
    ap = argparse.ArgumentParser(prog="python -m lockstep_reference",
                                 description="lockstep's PyTorch/transformers reference side")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("trace", help="trace one forward pass of a checkpoint (docs/trace-format.md)")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    _add_input(p)
    p.add_argument("--dtype", required=True, choices=["f64", "f32", "bf16"],
                   help="compute dtype; f64 is pure float64 (RMSNorm, RoPE, softmax lifted)")
    p.add_argument("--out", required=True,
                   help="trace file to write (.safetensors), or a folder (an existing one, or a path ending in /): "
                        "one part file per layer (docs/trace-format.md)")
    p.add_argument("--device", help="torch device to run on (cuda:0, ...; default: this CPU)")
    p.add_argument("--device-map",
                   help="accelerate's device_map: auto, balanced, sequential, or a JSON {module: device} map")
    p.add_argument("--streamed", action="store_true",
                   help="the same trace computed layer by layer (one layer's weights in memory; for models "
                        "too big for RAM in --dtype)")
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("tokenize", help="print the transformers tokenizer's ids as a JSON array")
    p.add_argument("--model", required=True, help="folder with tokenizer.json (+ tokenizer_config.json)")
    p.add_argument("--text", required=True)
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("fingerprint", help="print the model fingerprint of a checkpoint folder")
    p.add_argument("--model", required=True)
    p.set_defaults(fn=cmd_fingerprint)

    p = sub.add_parser("oracle", help="trace with the independent numpy float64 implementation")
    p.add_argument("--model", required=True)
    _add_input(p)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_oracle)

    p = sub.add_parser("diff", help="max abs difference per tensor between two traces")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(fn=cmd_diff)

    p = sub.add_parser("make-default", help="build the default random Qwen2 model (qwen2-default)")
    p.add_argument("--out", required=True, help="model folder to create (skipped if complete)")
    p.add_argument("--tokenizer", help="folder with the Qwen tokenizer.json (default: fetch and cache)")
    p.set_defaults(fn=cmd_make_default)

    p = sub.add_parser("make-7b", help="random-weight model with the exact Qwen2.5-7B config, bf16 shards (~15.2 GB); "
                                       "--shape 14b: Qwen2.5-14B's (~29.5 GB)")
    p.add_argument("--out", required=True, help="model folder to create (skipped if complete)")
    p.add_argument("--shape", choices=["7b", "14b"], default="7b", help="which Qwen2.5 config (default 7b)")
    p.add_argument("--seed", type=int, help="generator seed (default 7007 for 7b, 14014 for 14b)")
    p.add_argument("--tokenizer", help="folder with the Qwen tokenizer.json (default: fixtures/tokenizer/qwen)")
    p.set_defaults(fn=cmd_make_7b)

    p = sub.add_parser("fixtures", help="create the test fixtures (skips what is complete)")
    p.add_argument("--root", default="fixtures")
    p.add_argument("--only", nargs="+", metavar="MODEL", help="build only these models")
    p.add_argument("--no-big", action="store_true", help="skip qwen2.5-0.5b-random")
    p.set_defaults(fn=cmd_fixtures)

    p = sub.add_parser("vocab-cases", help="check llama.cpp tokenizer test cases against transformers")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--inp", required=True, help="ggml-vocab-*.gguf.inp (the .out beside it)")
    p.set_defaults(fn=cmd_vocab_cases)

    from . import batch, ops

    p = sub.add_parser("trace-batch", help="run a JSON list of trace jobs in one process")
    p.add_argument("jobs", help='JSON file: [{"model", "tokens", "dtype", "out", "streamed"?}, ...]')
    p.set_defaults(fn=lambda a: batch.trace_batch(a.jobs))

    p = sub.add_parser("ops-batch", help="op-level reference: each op recomputed on a test trace's own inputs")
    p.add_argument("jobs", help='JSON file: [{"model", "test", "dtype", "out_exact", "out_reference"}, ...]')
    p.set_defaults(fn=lambda a: ops.ops_batch(a.jobs))

    p = sub.add_parser("to-bf16", help="write a bf16-stored copy of a checkpoint folder (SRC DST, repeatable)")
    p.add_argument("pairs", nargs="+", metavar="SRC DST")

    def _to_bf16(a) -> None:
        if len(a.pairs) % 2:
            raise SystemExit("to-bf16 takes SRC DST pairs")
        for src, dst in zip(a.pairs[::2], a.pairs[1::2], strict=True):
            ops.to_bf16(src, dst)

    p.set_defaults(fn=_to_bf16)

    p = sub.add_parser("tokenize-batch", help="ids of each text of a JSON list, as one JSON line")
    p.add_argument("--model", required=True)
    p.add_argument("--texts", required=True, help="JSON file with a list of strings")
    p.set_defaults(fn=lambda a: batch.tokenize_batch(a.model, a.texts))

    p = sub.add_parser("chat-batch", help="apply_chat_template to a JSON list of conversations (JSON line)")
    p.add_argument("--model", required=True)
    p.add_argument("--conversations", required=True, help='JSON file: [{"messages": [...], "tools": ...}]')
    p.set_defaults(fn=lambda a: batch.chat_batch(a.model, a.conversations))

    p = sub.add_parser("generate-batch", help="greedy transformers generate (f32, eager) for a JSON list of jobs")
    p.add_argument(
        "jobs", help='JSON file: [{"model", "tokens"|"prompt"|"messages", "max_new_tokens", "ignore_eos"}, ...]'
    )
    p.set_defaults(fn=lambda a: batch.generate_batch(a.jobs))

    p = sub.add_parser("padded-logits", help="logits of a left-padded batch with its attention mask (safetensors)")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", required=True, help="JSON file: a list of token id lists")
    p.add_argument("--dtype", choices=["f32", "f64"], default="f32")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=lambda a: batch.padded_logits(a.model, a.rows, a.dtype, a.out))

    p = sub.add_parser("weights", help="checksums and facts of the weights transformers loaded (JSON line)")
    p.add_argument("--model", required=True)
    p.add_argument("--streamed", action="store_true",
                   help="never load the model: each tensor read and hashed alone (models bigger than RAM)")
    p.set_defaults(fn=lambda a: batch.weights(a.model, a.streamed))

    p = sub.add_parser("gguf-weights",
                       help="per GGUF file, one JSON line: sha256 of the float32 weights transformers loads from it")
    p.add_argument("--gguf", required=True, nargs="+", help="GGUF file(s); each loaded with gguf_file=")
    p.add_argument("--save", help="also save the (one) loaded model as float32 safetensors in this folder")
    p.set_defaults(fn=lambda a: batch.gguf_weights(a.gguf, a.save))

    p = sub.add_parser(
        "gguf-tokenize", help="ids of each text of a JSON list through a GGUF's own tokenizer (JSON line)"
    )
    p.add_argument("--gguf", required=True)
    p.add_argument("--texts", required=True, help="JSON file with a list of strings")
    p.set_defaults(fn=lambda a: batch.gguf_tokenize(a.gguf, a.texts))

    p = sub.add_parser("gguf-make", help="write a checkpoint folder as a llama.cpp-style GGUF (test input)")
    p.add_argument("--model", required=True, help="folder with config.json + model.safetensors")
    p.add_argument("--out", required=True, help="GGUF file to write")
    p.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0,q4_1,q5_0,q5_1",
                   help="ggml types the 2-D weights cycle through (1-D tensors stay F32)")

    def _gguf_make(a) -> None:
        from .gguf_make import make_gguf

        print(json.dumps(make_gguf(a.model, a.out, a.types.split(","))))

    p.set_defaults(fn=_gguf_make)

    p = sub.add_parser("serve", help="run commands read from stdin (a JSON list of arguments a line) in this one "
                       "process, answering one JSON line each (serve.py): torch and transformers imported once")
    p.set_defaults(fn=lambda a: _serve())

    args = ap.parse_args(argv)
    args.fn(args)


def _serve() -> None:
    from .serve import serve

    serve(main)


if __name__ == "__main__":
    main()
