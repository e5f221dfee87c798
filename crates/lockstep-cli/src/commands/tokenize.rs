//! `lockstep tokenize --model DIR --text TEXT`.

use crate::cli_error::CliResult;
use lockstep_engine::Tokenizer;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `tokenize`.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder holding tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Text to tokenize.
    #[arg(long)]
    text: String,
}

/// Prints the ids as a JSON array (the last line of stdout).
pub fn run(a: Args) -> CliResult<ExitCode> {
    let ids = Tokenizer::from_dir(&a.model)?.encode(&a.text)?;
    println!("{}", serde_json::to_string(&ids).expect("ids serialize"));
    Ok(ExitCode::SUCCESS)
}
