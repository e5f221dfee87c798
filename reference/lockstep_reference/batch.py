"""Batch entry points used by `lockstep verify`: many traces, many texts, or the weight checksums,
in one Python process (importing torch and transformers takes seconds; a verify run needs dozens
of traces)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time

import torch

from . import q8act, tracer
from .protocol import (
    ChatAnswer,
    Conversation,
    GenerateAnswer,
    GenerateJob,
    TraceJob,
    WeightsAnswer,
    answer_line,
    parse_list,
)
from .rope_scaling import reset_dynamic_rope
from .st_io import checkpoint_files, read_header, stored_tensor_sha256s

_STORED = {"F32": "f32", "BF16": "bf16", "F64": "f64"}

# Tokens of one group of streamed traces run together (`streamed_groups`) at the least: a group may
# hold more while its traces take at most `GROUP_MEMORY_SHARE` of the memory available
# (`group_token_budget`): at a 7B model's size one token's f64 trace is ~16 MB, at 14B ~40 MB.
STREAMED_GROUP_TOKENS = 64
GROUP_MEMORY_SHARE = 1 / 3


def trace_batch(jobs_path: str) -> None:
    """Run every job of a JSON list `[{"model", "tokens", "dtype", "out"}, ...]`, loading each
    (model, dtype) once. Prints one line per trace written. The dtype "q8dot" (GGUF files only) is
    float32 with llama.cpp's 8-bit activations on the quantized matmuls (q8act.py), the reference of
    lockstep's `q8dot` mode.

    A job with `"streamed": true` is the same trace computed layer by layer (streamed.py): for models
    too big for RAM in the job's dtype; nothing stays loaded for it. Streamed jobs of the same model
    and dtype run together, each layer read once for the group (`streamed_groups`). An `out` that is a
    trace folder (`tracer.is_trace_folder`) gets the trace as part files, a streamed one written a part
    at a time as each layer is done."""
    jobs = parse_list(TraceJob, jobs_path)
    loaded: dict[tuple[str, str], object] = {}
    for job in jobs:
        if job.streamed:
            continue
        # "q8dot": float32 with llama.cpp's 8-bit activations on the GGUF's quantized matmuls.
        dtype = "f32" if job.dtype == "q8dot" else job.dtype
        key = (job.model, dtype)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[key] = tracer.load_model(job.model, dtype)
        model = loaded[key]
        if job.dtype == "q8dot":
            gguf = tracer.gguf_file(job.model)
            if gguf is None:
                raise ValueError(f"{job.model}: the q8dot reference needs a GGUF file")
            with q8act.quantized_inputs(model, q8act.activation_plan(gguf, model.config)):
                tensors = tracer.trace_model(model, job.tokens, dtype)
        else:
            tensors = tracer.trace_model(model, job.tokens, dtype)
        meta = tracer.trace_metadata(job.model, model, job.tokens, dtype, None)
        if job.dtype == "q8dot":
            meta["mode"] = "q8dot"
        tracer.write_trace(job.out, tensors, meta)
        print(f"wrote {job.out}: {len(job.tokens)} tokens, dtype {job.dtype}", file=sys.stderr)
    loaded.clear()
    groups = streamed_groups([j for j in jobs if j.streamed])
    if groups:
        from . import streamed

        for group in groups:
            t0 = time.time()
            streamed.trace_streamed_many(group[0].model, [(j.out, j.tokens) for j in group], group[0].dtype)
            print(f"wrote {len(group)} streamed trace(s) of {group[0].model} in dtype {group[0].dtype} "
                  f"({sum(len(j.tokens) for j in group)} tokens, each layer read once, {time.time() - t0:.0f} s, "
                  f"peak RSS {streamed.peak_rss_mib():.0f} MiB)", file=sys.stderr)


def streamed_groups(jobs: list[TraceJob], token_budget: int | None = None,
                    value_bytes=None) -> list[list[TraceJob]]:
    """Streamed jobs grouped by (model, dtype), in order, each group holding at most `token_budget`
    tokens in all or a single longer job: a group holds its traces in memory like one input of its
    total length. Without a `token_budget`, each (model, dtype)'s is `group_token_budget` for its
    jobs, with `value_bytes(dtype)` bytes per traced value (default: the dtype's stored size)."""
    by_key: dict[tuple[str, str], list[TraceJob]] = {}
    for job in jobs:
        by_key.setdefault((job.model, job.dtype), []).append(job)
    out = []
    for (model, dtype), key_jobs in by_key.items():
        budget = token_budget
        if budget is None:
            per_value = value_bytes(dtype) if value_bytes else STORED_BYTES.get(dtype, 4)
            budget = group_token_budget(model, max(len(j.tokens) for j in key_jobs), per_value)
        groups: list[list[TraceJob]] = [[]]
        for job in key_jobs:
            last = groups[-1]
            if last and sum(len(j.tokens) for j in last) + len(job.tokens) > budget:
                groups.append([])
            groups[-1].append(job)
        out.extend(groups)
    return out


# Bytes of one stored value of a trace in each dtype (q8dot traces are float32).
STORED_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "q8dot": 4}


def group_token_budget(model_dir: str, longest: int, value_bytes: int) -> int:
    """Tokens one group of streamed jobs on `model_dir` may hold: as many as keep every tap of every
    position (hidden states, q/k/v with their norms and rotations, the MLP activation, the attention
    probabilities of a `longest`-token input, the logits) at `value_bytes` per value within
    `GROUP_MEMORY_SHARE` of the memory available now (MemAvailable), and at least
    `STREAMED_GROUP_TOKENS`. At 7B, 2 cores and ~21 GB available, every default input of `verify`
    (286 tokens) is one group, so each layer is read once per dtype instead of once per group."""
    from . import streamed

    c = streamed.load_config(model_dir)
    h, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    qd, kvd = heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = 6 * h + 4 * qd + 4 * kvd + c.intermediate_size + heads * longest
    per_token = value_bytes * (c.num_hidden_layers * per_layer + 2 * h + c.vocab_size)
    return max(STREAMED_GROUP_TOKENS, int(_available_bytes() * GROUP_MEMORY_SHARE) // per_token)


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where it cannot be read: the minimum budget)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tokenize_batch(model_dir: str, texts_path: str) -> None:
    """Print, as one JSON line, the transformers tokenizer's ids of each text of a JSON list."""
    with open(texts_path) as f:
        texts = json.load(f)
    tok = tracer.load_tokenizer(model_dir)
    print(json.dumps([list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]))


def stored_dtype(model_dir: str) -> str:
    """The dtype the checkpoint's floating tensors are stored in ("f32", "bf16" or "f64"); "f32" for a
    GGUF file, whose tensors transformers dequantizes to float32."""
    if tracer.gguf_file(model_dir) is not None:
        return "f32"
    dtypes = set()
    for path in checkpoint_files(model_dir):
        header, _ = read_header(path)
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _STORED:
        raise ValueError(f"checkpoint mixes or uses unsupported dtypes {sorted(dtypes)}")
    return _STORED[dtypes.pop()]


def _as_stored(name: str, t, stored: set[str]):
    """`(checkpoint name, tensor)` pairs of a state_dict entry: itself, or for Qwen3-MoE's fused
    experts (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) in a checkpoint that
    stores them per expert (as save_pretrained writes them), each expert's gate/up/down matrix
    under its checkpoint name (transformers fused them at load: gate rows first)."""
    prefix, _, proj = name.rpartition("experts.")
    if proj not in ("gate_up_proj", "down_proj") or f"{prefix}experts.0.{proj.split('_')[0]}_proj.weight" not in stored:
        return [(name, t)]
    if proj == "down_proj":
        return [(f"{prefix}experts.{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
    half = t.shape[1] // 2
    return [pair for e in range(t.shape[0]) for pair in (
        (f"{prefix}experts.{e}.gate_proj.weight", t[e, :half]),
        (f"{prefix}experts.{e}.up_proj.weight", t[e, half:]))]


def weights(model_dir: str, streamed: bool = False) -> None:
    """Print, as one JSON line, what transformers loaded: sha256 of every state_dict tensor's bytes
    (loaded in the stored dtype, so bytes are comparable), parameter count, tied head, q/k/v bias.

    `streamed`: for a model bigger than RAM, the answer of the streamed reference (streamed.py), which
    never loads the model: the names and facts from a meta-device model, each tensor read from the
    checkpoint alone (as the streamed trace reads it) and hashed (`streamed_weights`)."""
    if streamed:
        print(answer_line(streamed_weights(model_dir)))
        return
    dtype = stored_dtype(model_dir)
    model = tracer.load_model(model_dir, dtype)
    sums = {}
    # The checkpoint's tensor names (a GGUF's are llama.cpp's: nothing to map fused experts to).
    stored = set()
    if tracer.gguf_file(model_dir) is None:
        for path in checkpoint_files(model_dir):
            stored |= set(read_header(path)[0])
    for name, t in model.state_dict().items():
        for part, x in _as_stored(name, t, stored):
            raw = x.detach().contiguous().view(torch.uint8).numpy().tobytes()
            sums[part] = hashlib.sha256(raw).hexdigest()
    attn = model.model.layers[0].self_attn
    print(answer_line(WeightsAnswer(
        checksums=sums,
        parameter_count=sum(p.numel() for p in model.parameters()),
        tied=model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        qkv_bias=attn.q_proj.bias is not None,
        dtype=dtype,
    )))


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 hex of a tensor's bytes in its dtype (hashed in place, not copied)."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def streamed_weights(model_dir: str) -> WeightsAnswer:
    """`weights` without loading the model: the state_dict names, parameter count, tied head and q/k/v
    bias of a meta-device model built from the config, and the sha256 of each tensor read alone in the
    stored dtype (a tied lm_head is the stored embedding). The same answer as `weights` gives on every
    model it streams (checked in reference/tests/check_reference.py)."""
    import transformers

    from . import streamed

    dtype = stored_dtype(model_dir)
    config = streamed.load_config(model_dir)
    if config.model_type not in streamed._STREAMED_TYPES:
        raise ValueError(f"streamed weights support {sorted(streamed._STREAMED_TYPES)}, not {config.model_type!r}")
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    tensors = streamed._Weights(model_dir, tracer.TORCH_DTYPES[dtype])
    tied = meta.lm_head.weight is meta.model.embed_tokens.weight
    sources = {}
    for name in meta.state_dict():
        source = name
        if name not in tensors.path and name == "lm_head.weight" and tied:
            source = "model.embed_tokens.weight"
        if source not in tensors.path:
            raise ValueError(f"{name} is not stored in {model_dir}")
        sources[name] = source

    # A tensor loaded in its stored dtype holds the stored bytes: their sums, hashed from the files'
    # maps on every core and kept for the traces' model fingerprint (st_io), read once for both.
    stored = stored_tensor_sha256s(model_dir)
    loaded_as = {v: k for k, v in _STORED.items()}[dtype]

    def checksum(name: str) -> str:
        source = sources[name]
        st, digest = stored[source]
        return digest if st == loaded_as else tensor_sha256(tensors.get(source))

    sums = {name: checksum(name) for name in sources}
    attn = meta.model.layers[0].self_attn
    return WeightsAnswer(
        checksums=sums,
        parameter_count=sum(p.numel() for p in meta.parameters()),
        tied=tied,
        qkv_bias=attn.q_proj.bias is not None,
        dtype=dtype,
    )


def chat_batch(model_dir: str, conversations_path: str) -> None:
    """Print, as one JSON line, `[{"text", "ids"}, ...]`: each conversation of a JSON list
    `[{"messages": [...], "tools": [...] | null, "template_kwargs": {...}}, ...]` rendered by
    `apply_chat_template` with `add_generation_prompt=True` (and the optional template kwargs, e.g.
    Qwen3's `enable_thinking`), and its ids."""
    tok = tracer.load_tokenizer(model_dir)
    out = []
    for conv in parse_list(Conversation, conversations_path):
        text = tok.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False,
                                       add_generation_prompt=True, **(conv.template_kwargs or {}))
        out.append(ChatAnswer(text=text, ids=list(tok(text, add_special_tokens=False)["input_ids"])))
    print(answer_line(out))


# Parameters from which a generation uses every core: below, one thread (see `generate_threads`).
MANY_THREADS_PARAMS = 1_000_000_000


def generate_threads(model, cores: int) -> int:
    """Threads for generating with `model`: LOCKSTEP_REFERENCE_THREADS when set; else one thread for a
    model under `MANY_THREADS_PARAMS` parameters (on a busy machine PyTorch's OpenMP threads spin
    against other processes and run a small model's decode ~10x slower than one thread, measured
    here on SmolLM2-135M), and every core (`cores`, torch's default) for a larger one, whose every
    step is seconds of work per thread (a 7B model's 260-token prefill is ~4 TFLOP)."""
    import os

    if "LOCKSTEP_REFERENCE_THREADS" in os.environ:
        return int(os.environ["LOCKSTEP_REFERENCE_THREADS"])
    params = sum(p.numel() for p in model.parameters())
    return cores if params >= MANY_THREADS_PARAMS else 1


def generate_batch(jobs_path: str) -> None:
    """Greedy `model.generate(do_sample=False, max_new_tokens=N)` with eager attention for each job of
    a JSON list, loading each model once per dtype. A job is `{"model", "max_new_tokens",
    "ignore_eos"}` (optionally `"repetition_penalty"`, which greedy decoding applies, and `"dtype"`:
    "f32", the default, or "bf16", the model loaded in that dtype as the tracer loads it) plus its prompt:
    `"tokens"` (ids), `"prompt"` (text, tokenized without special tokens), or `"messages"` (a
    conversation, rendered by `apply_chat_template` with the generation prompt and tokenized the
    same way), or `"token_batch"` (a list of id lists, generated as one
    batch: left-padded with the pad id and an attention mask, as transformers batches). Prints one
    JSON line: `[{"prompt_ids", "generated", "eos_token_ids", "pad_token_id"}, ...]` (new tokens
    only; an EOS that ended a generation is included, as transformers returns it); a batch job gives
    lists of lists in both, and a batch row that ended before the others is padded after its EOS
    with `pad_token_id`, as transformers returns it. `eos_token_ids` (empty with `ignore_eos`) and
    `pad_token_id` are the ones this generation used, so a reader can cut each row at its own EOS.
    `top_ids` / `top_logits`: per generated step (per row for a batch), the reference's own best
    tokens and their scores: its best `TOP_K` and every token within the job's `tie_within` of
    its best (`top_of_scores`), so a parting of two implementations can be
    judged a near-tie from the reference's logits, not only from the other side's.

    With `ignore_eos` the generation config carries no EOS id, so exactly `max_new_tokens` tokens come
    back and the logits are untouched (no EOS suppression)."""
    import copy

    cores = torch.get_num_threads()
    loaded: dict[tuple[str, str], tuple] = {}
    out = []
    for job in parse_list(GenerateJob, jobs_path):
        key = (job.model, job.dtype)
        if key not in loaded:
            loaded.clear()
            m = tracer.load_model(job.model, job.dtype)
            torch.set_num_threads(generate_threads(m, cores))
            loaded[key] = (m, copy.deepcopy(m.generation_config), None)
        model, original, tok = loaded[key]
        if tok is None and (job.prompt is not None or job.messages is not None):
            tok = tracer.load_tokenizer(job.model)
            loaded[key] = (model, original, tok)
        if job.token_batch is not None:
            prompt_ids = [[int(t) for t in row] for row in job.token_batch]
        elif job.tokens is not None:
            prompt_ids = [int(t) for t in job.tokens]
        elif job.prompt is not None:
            prompt_ids = list(tok(job.prompt, add_special_tokens=False)["input_ids"])
        else:
            text = tok.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        gc = copy.deepcopy(original)
        gc.do_sample = False
        gc.num_beams = 1
        gc.max_new_tokens = job.max_new_tokens
        gc.max_length = None
        gc.min_length = 0
        gc.min_new_tokens = None
        gc.repetition_penalty = float(job.repetition_penalty)
        gc.temperature = gc.top_k = gc.top_p = gc.min_p = None
        if job.ignore_eos:
            gc.eos_token_id = None
        if gc.pad_token_id is None:
            eos = gc.eos_token_id
            gc.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        # generate() fills every unset (None) field from model.generation_config: install ours there
        # too, or a cleared eos_token_id would come back from it.
        model.generation_config = gc
        if job.token_batch is not None:
            ids, mask, _ = left_padded(prompt_ids, gc.pad_token_id)
        else:
            ids = torch.tensor([prompt_ids], dtype=torch.long)
            mask = torch.ones_like(ids)
        reset_dynamic_rope(model)
        with torch.no_grad():
            res = model.generate(ids, attention_mask=mask, generation_config=copy.deepcopy(gc),
                                 output_scores=True, return_dict_in_generate=True)
        seq = res.sequences
        new = seq[:, ids.shape[1]:].tolist()
        top_ids, top_logits = top_of_scores(res.scores, job.tie_within)
        eos = gc.eos_token_id
        eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        one = job.token_batch is None
        out.append(GenerateAnswer(prompt_ids=prompt_ids, generated=new[0] if one else new,
                                  eos_token_ids=eos, pad_token_id=int(gc.pad_token_id),
                                  top_ids=top_ids[0] if one else top_ids,
                                  top_logits=top_logits[0] if one else top_logits))
        print(f"generated {len(new[0])} tokens x {len(new)} rows ({job.model})", file=sys.stderr)
    print(answer_line(out))


TOP_K = 2
#: Most tokens listed per step (the Rust side's `reference::TOP_MAX`).
TOP_MAX = 256


def top_of_scores(scores, within: float = 0.0) -> tuple[list, list]:
    """Per row, per generated step: the ids and the scores of the reference's own best tokens at
    that step (what greedy decoding took its argmax of: the logits after the generation config's
    processors, e.g. a repetition penalty), best first: the `TOP_K` best and every other token
    whose score is within `within` of the best, at most `TOP_MAX`. So a token another
    implementation picked on a near-tie is listed with its exact score, and one not listed is
    further than `within` from the best (unless `TOP_MAX` were listed). A non-finite score is
    written as null (JSON has no NaN or infinity)."""
    ids: list[list[list[int]]] = []
    vals: list[list[list[float | None]]] = []
    for step in scores:
        v, i = torch.topk(step.float(), min(TOP_MAX, step.shape[-1]), dim=-1)
        for r in range(step.shape[0]):
            if len(ids) <= r:
                ids.append([])
                vals.append([])
            row = v[r].tolist()
            # NaN compares false: a NaN best lists only TOP_K.
            n = max(TOP_K, sum(1 for x in row if x >= row[0] - within))
            ids[r].append([int(t) for t in i[r].tolist()[:n]])
            vals[r].append([float(x) if math.isfinite(x) else None for x in row[:n]])
    return ids, vals


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` and `position_ids` of prompts left-padded to one length, the
    positions derived from the mask as `transformers.generate` derives them
    (`cumsum(mask) - 1`, padding set to 1)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def padded_logits(model_dir: str, rows_path: str, dtype: str, out_path: str) -> None:
    """One forward pass of a left-padded batch (`rows_path`: JSON list of id lists) with its
    attention mask and mask-derived position ids, in `dtype` (f32 or f64, eager attention).
    Writes a safetensors file with `row{i}`: the logits of row i's real positions, [len_i, vocab]
    (f64 for the f64 tier, f32 otherwise)."""
    from safetensors.numpy import save_file

    with open(rows_path) as f:
        rows = [[int(t) for t in r] for r in json.load(f)]
    model = tracer.load_model(model_dir, dtype)
    ids, mask, positions = left_padded(rows, 0)
    pure = tracer.pure_f64_patches() if dtype == "f64" else contextlib.nullcontext()
    reset_dynamic_rope(model)
    with pure, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    width = ids.shape[1]
    out = {f"row{i}": logits[i, width - len(r):].contiguous().numpy() for i, r in enumerate(rows)}
    save_file(out, out_path)
    print(f"padded logits of {len(rows)} rows (width {width}) -> {out_path}", file=sys.stderr)


def gguf_weights(gguf_paths: list[str], save: str | None = None) -> None:
    """For each GGUF file, print one JSON line of what transformers loads from it with
    `from_pretrained(folder, gguf_file=name, dtype=torch.float32)`: sha256 of every state_dict
    tensor's float32 bytes, parameter count, tied head, q/k/v bias, and its config. With `save` (one
    file only), also write that model as float32 safetensors there (`save_pretrained`, after clearing
    the GGUF quantizer that otherwise refuses it; the weights are already dequantized tensors)."""
    import os
    import time

    import transformers

    transformers.utils.logging.disable_progress_bar()
    if save is not None and len(gguf_paths) != 1:
        raise SystemExit("--save takes exactly one GGUF file")
    for path in gguf_paths:
        t0 = time.time()
        folder, name = os.path.split(os.path.abspath(path))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        sums = {}
        for key, t in model.state_dict().items():
            assert t.dtype == torch.float32, f"{key} is {t.dtype}"
            sums[key] = tensor_sha256(t.detach())
        attn = model.model.layers[0].self_attn
        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        record = {
            "gguf": path,
            "checksums": sums,
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            "qkv_bias": attn.q_proj.bias is not None,
            "config": config,
            "load_seconds": round(time.time() - t0, 2),
        }
        if save is not None:
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(save)
        print(json.dumps(record, default=str))
        sys.stdout.flush()


def gguf_tokenize(gguf_path: str, texts_path: str) -> None:
    """Print, as one JSON line, the ids of each text of a JSON list through the tokenizer transformers
    builds from a GGUF file's metadata (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`)."""
    with open(texts_path) as f:
        texts = json.load(f)
    tok = tracer.load_tokenizer(gguf_path)
    print(json.dumps([list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]))
