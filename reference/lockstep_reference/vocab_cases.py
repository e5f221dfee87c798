"""Reader for llama.cpp's tokenizer test cases (`models/ggml-vocab-<name>.gguf.inp` / `.out`).

Format (as written by llama.cpp's convert_hf_to_gguf_update.py and read by its test-tokenizer-0):

* Both files are UTF-8 and must be read as raw bytes (no newline translation: cases contain "\\n", "\\t").
* `.inp`: for each case, its text followed by the separator "\\n__ggml_vocab_test__\\n". Splitting the
  whole file on that separator gives the cases plus one trailing empty string (after the last separator),
  which is dropped. A case may itself be empty or consist only of whitespace/newlines.
* `.out`: one line per case, in the same order, each line terminated by "\\n"; the line holds the
  expected ids, each written as " " + decimal id (so a line starts with a space, and an empty line means
  no tokens). Ids are what the Hugging Face tokenizer gives with add_special_tokens=False.

For ggml-vocab-qwen2 (llama-cpp-python 0.3.36) this gives 46 cases.
"""

from __future__ import annotations

SEPARATOR = "\n__ggml_vocab_test__\n"


def parse(inp: bytes, out: bytes) -> list[tuple[str, list[int]]]:
    """Parse the contents of an .inp/.out pair into [(text, expected ids)]."""
    texts = inp.decode("utf-8").split(SEPARATOR)
    if texts[-1] != "":
        raise ValueError(".inp does not end with the separator")
    texts = texts[:-1]
    lines = out.decode("utf-8").split("\n")
    if lines[-1] != "":
        raise ValueError(".out does not end with a newline")
    lines = lines[:-1]
    if len(lines) != len(texts):
        raise ValueError(f"{len(texts)} inputs but {len(lines)} output lines")
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(texts, lines, strict=False)]


def read_cases(inp_path: str, out_path: str | None = None) -> list[tuple[str, list[int]]]:
    """Read the (text, ids) cases from an .inp file and its .out file (default: same stem + .out)."""
    if out_path is None:
        out_path = inp_path[: -len(".inp")] + ".out"
    with open(inp_path, "rb") as f:
        inp = f.read()
    with open(out_path, "rb") as f:
        out = f.read()
    return parse(inp, out)


def check_tokenizer(tokenizer_dir: str, inp_path: str) -> tuple[int, list[tuple[str, list[int], list[int]]]]:
    """Tokenize every case with the transformers tokenizer of `tokenizer_dir` (no special tokens).

    Returns (number of cases, [(text, expected, got)] for the mismatches).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cases = read_cases(inp_path)
    bad = []
    for text, expected in cases:
        got = list(tok(text, add_special_tokens=False)["input_ids"])
        if got != expected:
            bad.append((text, expected, got))
    return len(cases), bad
