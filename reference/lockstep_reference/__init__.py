"""lockstep's reference side: PyTorch + Hugging Face transformers traces in the lockstep trace format.

Modules: `tracer` (trace one forward pass, pure-f64 patches), `numpy_oracle` (independent float64
forward), `st_io` (byte-exact safetensors reading, model fingerprint), `fixtures` (random-weight test
models, tokenizer and llama.cpp test data), `vocab_cases` (llama.cpp tokenizer test-case reader).
"""

__version__ = "0.1.0"
