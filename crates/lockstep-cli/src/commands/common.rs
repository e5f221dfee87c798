//! Argument pieces shared by several subcommands.

use crate::cli_error::{CliError, CliResult};
use clap::builder::PossibleValue;
use lockstep_engine::Tokenizer;
use lockstep_engine::{Dtype, Precision};
use std::path::Path;

/// `--dtype` of generate, chat, bench, serve and trace: the shared [`Dtype`], offered to clap
/// with its names and help (no name table of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtypeArg(pub Dtype);

impl std::ops::Deref for DtypeArg {
    type Target = Dtype;
    fn deref(&self) -> &Dtype {
        &self.0
    }
}

impl clap::ValueEnum for DtypeArg {
    fn value_variants<'a>() -> &'a [Self] {
        const ALL: [DtypeArg; 5] = [
            DtypeArg(Dtype::ALL[0]),
            DtypeArg(Dtype::ALL[1]),
            DtypeArg(Dtype::ALL[2]),
            DtypeArg(Dtype::ALL[3]),
            DtypeArg(Dtype::ALL[4]),
        ];
        &ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()).help(self.help()))
    }
}

/// A [`Precision`] on the command line (`compare --tier`), by its shared name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecisionArg(pub Precision);

impl clap::ValueEnum for PrecisionArg {
    fn value_variants<'a>() -> &'a [Self] {
        const ALL: [PrecisionArg; 3] = [
            PrecisionArg(Precision::ALL[0]),
            PrecisionArg(Precision::ALL[1]),
            PrecisionArg(Precision::ALL[2]),
        ];
        &ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.0.as_str()))
    }
}

/// `verify --dtype`: one precision tier, or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierChoice {
    /// Just this tier.
    One(Precision),
    /// f64 and f32, plus bf16 when the checkpoint is stored in bf16.
    All,
}

impl clap::ValueEnum for TierChoice {
    fn value_variants<'a>() -> &'a [Self] {
        const ALL: [TierChoice; 4] = [
            TierChoice::One(Precision::ALL[0]),
            TierChoice::One(Precision::ALL[1]),
            TierChoice::One(Precision::ALL[2]),
            TierChoice::All,
        ];
        &ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            TierChoice::One(p) => p.as_str(),
            TierChoice::All => "all",
        }))
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
