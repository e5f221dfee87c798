//! `lockstep serve --model DIR|FILE.gguf [--host 127.0.0.1] [--port 8080] [--dtype f32] [--max-batch 16]`:
//! an OpenAI-compatible HTTP server (the work lives in the `lockstep-serve` crate).

use super::common::DtypeArg;
use crate::cli_error::{CliError, CliResult};
use lockstep_serve::{ServeError, ServeOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json) or a llama.cpp .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the one chosen is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Compute precision (f32 matches transformers' float32 generate token for token).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Most requests decoding together; more wait for a free slot.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Testing aid: serve with a deliberate bug injected into the engine (the faults of
    /// `lockstep verify --inject`), to see `lockstep verify --endpoint` catch a wrong server.
    #[arg(long)]
    inject: Option<lockstep_engine::Fault>,
}

/// Runs `serve` until Ctrl-C.
pub fn run(a: Args) -> CliResult<ExitCode> {
    let dtype = *a.dtype;
    let opts = ServeOptions {
        model: a.model,
        host: a.host,
        port: a.port,
        dtype,
        max_batch: a.max_batch,
        fault: a.inject,
    };
    match lockstep_serve::serve(&opts) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(ServeError::Engine(e)) => Err(e.into()),
        Err(e) => Err(CliError::input(e.to_string())),
    }
}
