//! `lockstep reference --model DIR (--tokens ..|--prompt ..) --dtype D --out FILE`: the PyTorch
//! reference trace, through the project's Python tracer.

use super::common::PrecisionArg;
use crate::cli_error::CliResult;
use crate::harness::python::ReferenceEnv;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `reference`.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder or a llama.cpp .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "prompt")]
    tokens: Option<String>,
    /// Text, tokenized by the transformers tokenizer.
    #[arg(long)]
    prompt: Option<String>,
    /// Reference precision: f64 (pure float64), f32, or bf16.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: PrecisionArg,
    /// Output trace file.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the reference tracer.
pub fn run(a: Args) -> CliResult<ExitCode> {
    let env = ReferenceEnv::find()?;
    let model = a.model.to_string_lossy().into_owned();
    let out = a.out.to_string_lossy().into_owned();
    let mut args = vec![
        "trace",
        "--model",
        &model,
        "--dtype",
        a.dtype.0.as_str(),
        "--out",
        &out,
    ];
    if let Some(t) = &a.tokens {
        args.extend(["--tokens", t]);
    }
    if let Some(p) = &a.prompt {
        args.extend(["--prompt", p]);
    }
    let stdout = crate::progress::with_spinner(
        format!("running the reference (transformers) on {model}"),
        || env.run(&args),
    )?;
    print!("{stdout}");
    Ok(ExitCode::SUCCESS)
}
