//! Argument pieces shared by several subcommands.

use crate::cli_error::{CliError, CliResult};
use lockstep_engine::Tokenizer;
use std::path::Path;

/// Compute precision chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// float64 everywhere (the exact tier).
    F64,
    /// float32, rounding where transformers does.
    F32,
    /// bf16 weights and activations, rounded where transformers' bf16 forward rounds.
    Bf16,
    /// bf16 weights as stored, float32 activations (faster and more accurate than bf16).
    Bf16w,
}

impl DtypeArg {
    /// The trace metadata name.
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F64 => "f64",
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::Bf16w => "bf16w",
        }
    }
}

/// Parses `--tokens 1,2,3`.
pub fn parse_token_list(s: &str) -> CliResult<Vec<u32>> {
    let ids: Result<Vec<u32>, _> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse::<u32>)
        .collect();
    match ids {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err(CliError::input("--tokens is empty")),
        Err(e) => Err(CliError::input(format!(
            "--tokens must be comma-separated non-negative integers ({e}): '{s}'"
        ))),
    }
}

/// Token ids from `--tokens` or, through the model's tokenizer, from `--prompt`.
pub fn input_ids(
    model_dir: &Path,
    tokens: Option<&str>,
    prompt: Option<&str>,
) -> CliResult<Vec<u32>> {
    match (tokens, prompt) {
        (Some(t), None) => parse_token_list(t),
        (None, Some(p)) => {
            let ids = Tokenizer::from_dir(model_dir)?.encode(p)?;
            if ids.is_empty() {
                return Err(CliError::input("the prompt tokenizes to no tokens"));
            }
            Ok(ids)
        }
        _ => Err(CliError::input("give exactly one of --tokens and --prompt")),
    }
}

/// Refuses a run of the model at `model` whose memory estimate exceeds the memory available now
/// (`MemAvailable`), with the numbers; with `force` it only warns. Where the available memory
/// cannot be read, the run goes ahead.
pub fn enforce_memory_estimate(
    estimate: &lockstep_engine::resources::MemoryEstimate,
    model: &std::path::Path,
    force: bool,
) -> crate::cli_error::CliResult<()> {
    let Some(available) = lockstep_engine::resources::available_memory() else {
        return Ok(());
    };
    match estimate.check(available) {
        Ok(()) => Ok(()),
        Err(e) if force => {
            eprintln!("warning (--force): {e}");
            Ok(())
        }
        Err(e) => Err(crate::cli_error::CliError::input(format!(
            "{}: {e}",
            model.display()
        ))),
    }
}
