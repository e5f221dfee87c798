"""The official `openai` client against a running `lockstep serve` (driven by crates/lockstep-cli/tests/serve.rs).

    python scripts/serve_client.py --base-url http://127.0.0.1:PORT/v1 MODE [options]

Each mode prints one JSON object on its last stdout line; the Rust test compares it with
`lockstep generate` and asserts on it. Modes:
  basic       models list, a completion, a chat completion, a streaming chat, a sampled completion,
              completion logprobs; texts returned for comparison
  errors      bad JSON and bad or unsupported parameters get OpenAI-style 400s (and 404s)
  concurrent  N streaming clients at once (greedy and seeded sampling), each against the same
              request sent alone
  load        a bounded load run (REQUESTS streaming requests, CONCURRENCY at a time) whose every
              stream must equal its request's text alone; the server's RSS before and after
  disconnect  a streaming client that leaves early frees its slot
  drain       SIGINT while a stream runs: the stream still completes, then the server exits
  thinking    a chat with and without `chat_template_kwargs: {"enable_thinking": false}`: the
              prompt token counts the server reports, and those of transformers'
              `apply_chat_template` on the model folder (--model-dir) with the same kwargs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "My favourite programming language is",
    "In 1969, the first humans",
    "A haiku about autumn:",
]


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def model_id(c: openai.OpenAI) -> str:
    models = c.models.list().data
    assert len(models) == 1, models
    return models[0].id


def stream_text(c: openai.OpenAI, model: str, req: dict) -> dict:
    """One streaming request; the text, the finish reason, and whether every chunk was ours."""
    kind = req["kind"]
    args = {k: v for k, v in req.items() if k != "kind"}
    if kind == "chat":
        s = c.chat.completions.create(model=model, stream=True, **args)
    else:
        s = c.completions.create(model=model, stream=True, **args)
    ids, text, finish, chunks = set(), "", None, 0
    for ch in s:
        chunks += 1
        ids.add(ch.id)
        if not ch.choices:
            continue
        choice = ch.choices[0]
        piece = choice.delta.content if kind == "chat" else choice.text
        text += piece or ""
        finish = choice.finish_reason or finish
    return {"text": text, "finish": finish, "ids": len(ids), "chunks": chunks}


def alone_text(c: openai.OpenAI, model: str, req: dict) -> str:
    kind = req["kind"]
    args = {k: v for k, v in req.items() if k != "kind"}
    if kind == "chat":
        return c.chat.completions.create(model=model, **args).choices[0].message.content
    return c.completions.create(model=model, **args).choices[0].text


def token_prompt(i: int, vocab: int) -> list[int]:
    """A deterministic prompt of 3 to 17 token ids below `vocab` (for random-weight fixtures)."""
    x = 2654435761 * (i + 1) % 2**32
    out = []
    for _ in range(3 + (i * 5) % 15):
        x = (1103515245 * x + 12345) % 2**31
        out.append(x % vocab)
    return out


def requests_mix(n: int, max_tokens: int, vocab: int | None = None) -> list[dict]:
    """`n` requests: prompts and lengths differ; every other one samples with its own seed.
    With `vocab`, prompts are token ids below it and every request is a completion."""
    out = []
    for i in range(n):
        p = PROMPTS[i % len(PROMPTS)] if vocab is None else token_prompt(i, vocab)
        req = {"max_tokens": max_tokens - 3 * (i % 4)}
        if i % 2:
            req.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        else:
            req.update(temperature=0)
        if i % 3 == 2 and vocab is None:
            req.update(kind="chat", messages=[{"role": "user", "content": p}])
        else:
            req.update(kind="completion", prompt=p)
        out.append(req)
    return out


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def health(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.load(r)


def basic(a) -> dict:
    c = client(a.base_url)
    model = model_id(c)
    n = a.max_tokens
    comp = c.completions.create(model=model, prompt=a.prompt, max_tokens=n, temperature=0)
    msgs = [{"role": "user", "content": a.prompt}]
    chat = c.chat.completions.create(model=model, messages=msgs, max_tokens=n, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    streamed = "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1, finishes
    assert chunks[-1].usage is not None and not chunks[-1].choices, chunks[-1]
    assert len({ch.id for ch in chunks}) == 1
    sampled = c.completions.create(
        model=model, prompt=a.prompt, max_tokens=n, temperature=0.8, top_p=0.9, seed=7,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    lp = c.completions.create(model=model, prompt=a.prompt, max_tokens=8, temperature=0, logprobs=3)
    lps = lp.choices[0].logprobs
    # Greedy: each chosen token is the most likely one, and its logprob is the top one's.
    for tok_lp, top in zip(lps.token_logprobs, lps.top_logprobs, strict=False):
        assert tok_lp <= 0 and len(top) == 3, (tok_lp, top)
        assert abs(max(top.values()) - tok_lp) < 1e-9, (tok_lp, top)
    assert len(lps.tokens) == lp.usage.completion_tokens
    stop = c.completions.create(
        model=model, prompt=a.prompt, max_tokens=n, temperature=0, stop=[comp.choices[0].text[5:9]]
    )
    return {
        "model": model,
        "completion": comp.choices[0].text,
        "completion_finish": comp.choices[0].finish_reason,
        "completion_usage": [comp.usage.prompt_tokens, comp.usage.completion_tokens, comp.usage.total_tokens],
        "chat": chat.choices[0].message.content,
        "chat_finish": chat.choices[0].finish_reason,
        "chat_stream": streamed,
        "chat_stream_finish": finishes[0],
        "chat_stream_usage": [chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens],
        "sampled": sampled.choices[0].text,
        "stop_text": stop.choices[0].text,
        "stop_finish": stop.choices[0].finish_reason,
        "stop_string": comp.choices[0].text[5:9],
    }


def errors(a) -> dict:
    c = client(a.base_url)
    model = model_id(c)
    out = {}
    cases = {
        "frequency_penalty": dict(frequency_penalty=0.5),
        "presence_penalty": dict(presence_penalty=0.5),
        "n": dict(n=2),
        "temperature": dict(temperature=-1),
        "top_p": dict(top_p=1.5),
        "max_tokens": dict(max_tokens=-3),
        "unknown": dict(extra_body={"frobnicate": 1}),
        "model": dict(model="no-such-model"),
    }
    for name, kw in cases.items():
        kw = {"model": model, "prompt": [1, 2, 3], "max_tokens": 4, **kw}
        try:
            c.completions.create(**kw)
            out[name] = None
        except openai.APIStatusError as e:
            body = e.response.json()
            out[name] = {"status": e.status_code, **body["error"]}
    try:
        c.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
        out["role"] = None
    except openai.APIStatusError as e:
        out["role"] = {"status": e.status_code, **e.response.json()["error"]}
    req = urllib.request.Request(
        a.base_url + "/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(req, timeout=30)
        out["bad_json"] = None
    except urllib.error.HTTPError as e:
        out["bad_json"] = {"status": e.code, **json.load(e)["error"]}
    return out


def concurrent(a) -> dict:
    c = client(a.base_url)
    model = model_id(c)
    reqs = requests_mix(a.clients, a.max_tokens)
    alone = [alone_text(c, model, r) for r in reqs]
    barrier = threading.Barrier(len(reqs))

    def go(r):
        barrier.wait()
        return stream_text(c, model, r)

    t0 = time.time()
    with ThreadPoolExecutor(len(reqs)) as ex:
        got = list(ex.map(go, reqs))
    wall = time.time() - t0
    return {
        "alone": alone,
        "together": [g["text"] for g in got],
        "ids_per_stream": [g["ids"] for g in got],
        "finishes": [g["finish"] for g in got],
        "wall_s": wall,
    }


def load(a) -> dict:
    c = client(a.base_url)
    model = model_id(c)
    kinds = requests_mix(len(PROMPTS) * 2, a.max_tokens, a.token_vocab)
    expected = [alone_text(c, model, r) for r in kinds]
    # One round at full concurrency first, so the idle level below has seen a full batch.
    with ThreadPoolExecutor(a.concurrency) as ex:
        list(ex.map(lambda i: stream_text(c, model, kinds[i % len(kinds)]), range(a.concurrency)))
    time.sleep(0.5)
    idle = rss_kb(a.pid)
    errors, mixed, peak = [], [], idle
    stop = threading.Event()

    def watch():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kb(a.pid))
            time.sleep(0.05)

    def one(i):
        r = kinds[i % len(kinds)]
        try:
            g = stream_text(c, model, r)
        except Exception as e:  # noqa: BLE001 -- every failure is counted and reported
            errors.append(f"{i}: {e!r}")
            return
        if g["text"] != expected[i % len(kinds)] or g["ids"] != 1 or g["finish"] is None:
            mixed.append(i)

    w = threading.Thread(target=watch)
    w.start()
    t0 = time.time()
    with ThreadPoolExecutor(a.concurrency) as ex:
        list(ex.map(one, range(a.requests)))
    wall = time.time() - t0
    stop.set()
    w.join()
    h = health(a.base_url)
    time.sleep(0.5)
    return {
        "requests": a.requests,
        "errors": errors[:5],
        "n_errors": len(errors),
        "mixed": mixed[:20],
        "rss_idle_kb": idle,
        "rss_peak_kb": peak,
        "rss_after_kb": rss_kb(a.pid),
        "health_after": h,
        "wall_s": wall,
    }


def disconnect(a) -> dict:
    c = client(a.base_url)
    model = model_id(c)
    before = health(a.base_url)
    s = c.completions.create(
        model=model, prompt=[1, 2, 3], max_tokens=100000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    for _ in s:
        got += 1
        if got == 3:
            break
    running_during = health(a.base_url)["running"]
    s.close()
    t0 = time.time()
    while health(a.base_url)["running"] != 0 and time.time() - t0 < 30:
        time.sleep(0.05)
    after = health(a.base_url)
    return {
        "running_during": running_during,
        "running_after": after["running"],
        "freed_in_s": time.time() - t0,
        "finished_delta": after["finished"] - before["finished"],
    }


def drain(a) -> dict:
    c = client(a.base_url)
    model = model_id(c)
    s = c.completions.create(
        model=model, prompt=[1, 2, 3], max_tokens=a.max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    text, finish, n = "", None, 0
    for ch in s:
        n += 1
        if n == 2:
            os.kill(a.pid, signal.SIGINT)
        text += ch.choices[0].text if ch.choices else ""
        finish = (ch.choices[0].finish_reason if ch.choices else None) or finish
    time.sleep(0.5)
    try:
        health(a.base_url)
        refused = False
    except (urllib.error.URLError, ConnectionError, OSError):
        refused = True
    return {"text": text, "finish": finish, "refused_after": refused}


def thinking(a) -> dict:
    from transformers import AutoTokenizer

    c = client(a.base_url)
    model = model_id(c)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    messages = [{"role": "user", "content": a.prompt}]
    out = {}
    for name, kwargs in [("default", {}), ("no_thinking", {"enable_thinking": False})]:
        extra = {"chat_template_kwargs": kwargs} if kwargs else {}
        r = c.chat.completions.create(
            model=model, messages=messages, max_tokens=1, temperature=0, extra_body=extra
        )
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        out[name] = {"served_prompt_tokens": r.usage.prompt_tokens, "transformers_prompt_tokens": len(ids)}
    try:
        c.chat.completions.create(
            model=model, messages=messages, max_tokens=1, extra_body={"chat_template_kwargs": [1]}
        )
        out["bad_kwargs"] = {"status": 200}
    except openai.BadRequestError as e:
        out["bad_kwargs"] = {"status": e.status_code, "param": e.body.get("param") if e.body else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--pid", type=int, help="the server's process id (load, drain)")
    ap.add_argument("--prompt", default=PROMPTS[0])
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--token-vocab", type=int, help="load: prompts as token ids below this (random-weight fixtures)")
    ap.add_argument("--model-dir", help="thinking: the served model's folder, for transformers' tokenizer")
    ap.add_argument("mode", choices=["basic", "errors", "concurrent", "load", "disconnect", "drain", "thinking"])
    a = ap.parse_args()
    out = globals()[a.mode](a)
    print(json.dumps({"openai": openai.__version__, **out}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
