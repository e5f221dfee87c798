//! lockstep's engine: a Rust implementation of the Qwen2 / Qwen2.5 and Llama model families that
//! loads Hugging Face checkpoints and computes what `transformers` computes, with every
//! intermediate tensor observable for verification.
//!
//! - [`config`]: config.json, v4 and v5 keys.
//! - [`weights`]: memory-mapped safetensors (single file or shards).
//! - [`gguf`]: llama.cpp GGUF files (metadata, dequantization, HF tensor names).
//! - [`tokenizer`]: tokenizer.json through the `tokenizers` crate.
//! - [`kernels`]: matmul, RMSNorm, RoPE, attention, activation; each with a reference version.
//! - [`model`]: the decoder forward pass.
//! - [`observer`]: taps for traces, free when off.
//! - [`trace_capture`]: one traced forward pass written in the lockstep trace format.
//! - [`sampling`]: transformers' logits processors (repetition penalty, temperature, top-k, top-p,
//!   min-p), argmax and a seeded sampler.
//! - [`streaming`]: whether a forward pass streams the layers through the page cache.
//! - [`generate`]: prefill + KV-cache decode, stop conditions, streaming detokenization.
//! - [`bandwidth`]: the machine's read bandwidth, the rate a decode step is judged against.
//! - [`sequence`]: one generating row, and the decode step of rows with their own caches
//!   (continuous batching).

pub mod allocator;
pub mod bandwidth;
pub mod chat;
pub mod chat_py;
pub mod config;
pub mod error;
pub mod faults;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod observer;
pub mod resources;
pub mod sampling;
pub mod sequence;
pub mod source;
pub mod streaming;
pub mod switch;
pub mod team;
pub mod tokenizer;
pub mod trace_capture;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{EngineError, Result};
pub use faults::Fault;
pub use kernels::{Bf16, Float, Precision};
pub use lockstep_trace::Dtype;
pub use model::{BatchKvCache, KvCache, LogitsFor, Model, PaddedBatch};
pub use observer::{NoObserver, Observer, TapView, TraceRecorder};
pub use tokenizer::Tokenizer;

/// The engine's version, recorded in traces.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
