//! `lockstep`: run Qwen2 / Llama checkpoints in Rust and prove they compute what PyTorch computes.
//!
//! A thin binary: argument parsing and file I/O here; the work lives in `lockstep-engine`
//! (the model) and `lockstep-verify` (comparison and reports); the `harness` module drives the
//! engine, other ports' traces and the Python reference for `verify` and `selftest`.

mod cli_error;
mod commands;
mod harness;
mod progress;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Command-line interface.
#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Run Qwen2/Llama checkpoints in Rust and verify them tensor by tensor against PyTorch",
    after_help = "Exit codes: 0 success (verification passed), 1 verification failed, 2 bad input or environment (one `error:` line), 3 the Python reference (transformers) failed."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the token ids of a text (JSON array on the last line).
    Tokenize(commands::tokenize::Args),
    /// Run one forward pass and write its trace (every intermediate tensor) as safetensors.
    Trace(commands::trace::Args),
    /// Write the PyTorch reference trace (transformers, pinned) of one forward pass.
    Reference(commands::reference::Args),
    /// Compare two traces tensor by tensor; exit 0 pass, 1 fail, 2 bad input.
    Compare(commands::compare::Args),
    /// Verify a model phase by phase against the PyTorch reference (report, JSON, SVG); exit 0
    /// pass, 1 fail, 2 bad input, 3 the reference failed.
    Verify(commands::verify::Args),
    /// Inject every known fault and show the verifier detects and localizes each.
    Selftest(commands::selftest::Args),
    /// Generate text (greedy or sampled), streaming it to stdout; speeds on stderr.
    Generate(commands::generate::Args),
    /// An interactive chat session with history (one user message per stdin line).
    Chat(commands::chat::Args),
    /// Measure load time, prefill and decode speed, peak RSS and decode weight bandwidth.
    Bench(commands::bench::Args),
    /// An OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching.
    Serve(commands::serve::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {} (see lockstep --help)", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Trace(a) => commands::trace::run(a),
        Command::Reference(a) => commands::reference::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Selftest(a) => commands::selftest::run(a),
        Command::Generate(a) => on_pool(|| commands::generate::run(a)),
        Command::Chat(a) => on_pool(|| commands::chat::run(a)),
        Command::Bench(a) => on_pool(|| commands::bench::run(a)),
        Command::Serve(a) => commands::serve::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Clap's message on one line: its first paragraph (the usage block and tips after it dropped),
/// lines joined, so that "the following required arguments were not provided:" keeps the
/// names listed under it.
fn one_line(msg: &str) -> String {
    let text: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let text = text.join(" ");
    match text.trim_start_matches("error: ") {
        "" => "bad arguments".to_string(),
        t => t.to_string(),
    }
}

/// Runs `f` on a worker thread of rayon's global pool while this thread waits asleep, so that
/// the engine's serial steps (norms, attention's bookkeeping, sampling) and its parallel
/// matmuls share the pool's threads: otherwise this thread is one more than the cores, and
/// between matmuls it competes with the pool's spinning workers for them. Not for `serve`,
/// whose server would hold a worker for good.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn clap_messages_keep_their_first_paragraph_on_one_line() {
        let missing = "error: the following required arguments were not provided:\n  --model <MODEL>\n\n\
                       Usage: lockstep bench --model <MODEL>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(missing),
            "the following required arguments were not provided: --model <MODEL>"
        );
        let unexpected = "error: unexpected argument '--x' found\n\n  tip: to pass '--x' as a value, use '-- --x'\n\nUsage: lockstep bench\n";
        assert_eq!(one_line(unexpected), "unexpected argument '--x' found");
        assert_eq!(one_line("\n\n"), "bad arguments");
    }
}
