//! `lockstep chat --model DIR [--system TEXT] [sampling flags]`: an interactive session with history.
//!
//! Each stdin line is a user message; the whole conversation is rendered with the checkpoint's chat
//! template (with the generation prompt) and the reply streams to stdout. `/reset` forgets the
//! history, `/exit` (or end of input) ends the session. Non-finite logits (NaN/inf) end the
//! session with one line naming the first non-finite tensor, exit 1 (as `generate`).

use super::generate::{
    chat_template, describe, preload, print_flush, run_generation, speed_line, SamplingArgs,
};
use crate::cli_error::{CliError, CliResult};
use lockstep_engine::chat::Message;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `chat`.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder or .gguf file with a chat template.
    #[arg(long)]
    model: PathBuf,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Tokens of history the memory estimate allows for besides one turn's new tokens.
const CHAT_HISTORY_ALLOWANCE: usize = 8192;

/// Runs the session.
pub fn run(a: Args) -> CliResult<ExitCode> {
    let template = chat_template(&a.model)?;
    let pre = preload(&a.model)?;
    // A conversation grows to at most the context; size the run by one turn of new tokens after
    // a long history (the whole context when that is smaller).
    let turn = a.sampling.max_new_tokens(&pre.defaults, 0);
    let context = turn
        .saturating_add(CHAT_HISTORY_ALLOWANCE)
        .min(pre.config.max_position_embeddings);
    pre.check_memory(a.sampling.dtype, 1, 0, context, a.sampling.force)?;
    let loaded = pre.load_model(a.sampling.dtype)?;
    let interactive = std::io::stdin().is_terminal();
    let mut history: Vec<Message> = vec![];
    let reset = |h: &mut Vec<Message>| {
        h.clear();
        if let Some(s) = &a.system {
            h.push(Message::new("system", s));
        }
    };
    reset(&mut history);
    let opts0 = a.sampling.options(&loaded.defaults, 0)?;
    eprintln!(
        "loaded {} in {:.2} s; {}. One message per line; /reset forgets, /exit or end of input quits.",
        a.model.display(),
        loaded.load_s,
        describe(&opts0)
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| CliError::input(format!("cannot read stdin: {e}")))?;
        let msg = line.trim_end_matches('\r');
        match msg.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                reset(&mut history);
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", msg));
        let text = template.render(&history, true, None)?;
        let ids = loaded.tokenizer.encode(&text)?;
        let mut opts = opts0.clone();
        opts.max_new_tokens = a.sampling.max_new_tokens(&loaded.defaults, ids.len());
        // One seed per session, a different stream per turn.
        opts.seed = opts0.seed.wrapping_add(turn);
        turn += 1;
        let g = run_generation(&loaded, a.sampling.dtype, &ids, &opts, print_flush)?;
        print_flush("\n");
        eprintln!("[{}]", speed_line(&g));
        history.push(Message::new("assistant", g.text.trim()));
    }
    Ok(ExitCode::SUCCESS)
}
