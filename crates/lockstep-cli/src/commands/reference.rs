//! `lockstep reference --model DIR (--tokens ..|--prompt ..) --dtype D --out FILE|DIR/
//! [--device D | --device-map M]`: the PyTorch reference trace, through the project's Python
//! tracer.

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
    /// Output trace file, or a folder (an existing one, or a path ending in `/`): one part file
    /// per layer, which `lockstep compare` reads a layer at a time.
    #[arg(long)]
    out: PathBuf,
    /// Torch device to run the reference on (`cuda:0`, ...; default: this CPU), for traces made
    /// on another machine and verified here.
    #[arg(long)]
    device: Option<String>,
    /// accelerate's `device_map` (`auto`, `balanced`, `sequential`, or a JSON {module: device}
    /// map): the model spread over several devices.
    #[arg(long)]
    device_map: Option<String>,
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
    if let Some(d) = &a.device {
        args.extend(["--device", d]);
    }
    if let Some(d) = &a.device_map {
        args.extend(["--device-map", d]);
    }
    let stdout = crate::progress::with_spinner(
        format!("running the reference (transformers) on {model}"),
        || env.run(&args),
    )?;
    print!("{stdout}");
    Ok(ExitCode::SUCCESS)
}
