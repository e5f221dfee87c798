//! The engine pipeline's first two phases: tokenization identity and weights identity.

use super::engine_pipeline::VerifyOptions;
use super::inputs::{chat_conversations, CHAT_LABELS, SPECIAL_TEXTS};
use super::reference::Reference;
use super::{short, show_ids, HarnessError, HarnessResult};
use lockstep_engine::chat::{ChatTemplate, Message};
use lockstep_engine::{Model, Tokenizer};
use lockstep_verify::Phase;
use std::fmt::Write as _;

/// Phase 1: our tokenizer against the reference's on every input and on special-token strings.
/// Returns the ids the forward phases use (the reference's, so both sides see the same input).
pub fn tokenization_phase(
    opts: &VerifyOptions,
    model: &Model,
    reference: &mut dyn Reference,
) -> HarnessResult<(Phase, Vec<Vec<u32>>)> {
    let name = "tokenization";
    let tok = Tokenizer::from_dir(&opts.model)?;
    let mut texts: Vec<String> = opts.inputs.iter().map(|i| i.text.clone()).collect();
    let n_inputs = texts.len();
    if tok.token_to_id("<|im_start|>").is_some() {
        texts.extend(SPECIAL_TEXTS.iter().map(|s| s.to_string()));
    }
    let theirs = reference.tokenize(&opts.model, &texts)?;
    let mut ok = 0;
    let mut table = String::from(
        "| text | tokens (ours) | tokens (transformers) | identical |\n|---|---|---|---|\n",
    );
    for (text, r) in texts.iter().zip(&theirs) {
        let ours = tok.encode(text)?;
        let same = &ours == r;
        ok += same as usize;
        let _ = writeln!(
            table,
            "| `{}` | {} | {} | {} |",
            short(text),
            show_ids(&ours),
            show_ids(r),
            if same { "yes" } else { "**NO**" }
        );
    }
    // The chat template, when the model has one: rendered text and ids must both be identical.
    let mut n_chat = 0;
    if let Some(template) = ChatTemplate::from_dir(&opts.model)? {
        let convs = chat_conversations();
        let theirs_chat = reference.chat(&opts.model, &convs)?;
        for ((label, conv), (their_text, their_ids)) in CHAT_LABELS
            .iter()
            .zip(convs.as_array().unwrap())
            .zip(&theirs_chat)
        {
            let messages: Vec<Message> = serde_json::from_value(conv["messages"].clone())
                .map_err(|e| HarnessError::input(format!("a built-in conversation: {e}")))?;
            let tools = conv.get("tools").filter(|t| !t.is_null());
            let (same_text, ours_n) = match template.render(&messages, true, tools) {
                Ok(text) => {
                    let ids = tok.encode(&text)?;
                    (text == *their_text && ids == *their_ids, ids.len())
                }
                Err(e) => {
                    let _ = writeln!(table, "| chat: {label} | error: {e} | | **NO** |");
                    n_chat += 1;
                    continue;
                }
            };
            n_chat += 1;
            ok += same_text as usize;
            let _ = writeln!(
                table,
                "| chat template: {label} | {ours_n} ids | {} ids | {} |",
                their_ids.len(),
                if same_text {
                    "yes (text and ids)"
                } else {
                    "**NO**"
                }
            );
        }
    }
    let total = texts.len() + n_chat;
    let ids: Vec<Vec<u32>> = theirs[..n_inputs].to_vec();
    for (i, v) in ids.iter().enumerate() {
        if v.is_empty() {
            return Err(HarnessError::input(format!(
                "input {:?} tokenizes to no tokens",
                opts.inputs[i].text
            )));
        }
        model.check_tokens(v, 0)?;
    }
    let summary = format!(
        "{ok}/{total} texts tokenize identically (incl. {} with special tokens, {n_chat} chat-template renderings)",
        texts.len() - n_inputs
    );
    let phase = if ok == total {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
    };
    Ok((phase.with_details(table), ids))
}

/// Each checkpoint tensor lockstep uses (not a tied head, which is the embedding), in the
/// checkpoint's order: name, element count and sha256 of the tensor as loaded, hashed on every core.
fn our_checksums(model: &Model) -> Vec<(String, u64, String)> {
    use rayon::prelude::*;
    let tied = model.config.tie_word_embeddings;
    let tensors: Vec<_> = model
        .checkpoint
        .tensors
        .iter()
        .filter(|(n, _)| !(tied && n.as_str() == "lm_head.weight"))
        .collect();
    tensors
        .par_iter()
        .map(|(n, t)| {
            let sum = t.sha256_as_loaded_hex();
            model.checkpoint.done_with(t);
            (n.to_string(), t.numel() as u64, sum)
        })
        .collect()
}

/// Phase 2: every tensor we use bit-identical to what the reference loaded.
pub fn weights_phase(
    model: &Model,
    reference: &mut dyn Reference,
    nonfinite: &[lockstep_verify::nonfinite::NonFiniteWeight],
) -> HarnessResult<Phase> {
    let name = "weights";
    let c = &model.config;
    // Ours hashed on every core while the reference computes its own checksums (each side reads
    // and hashes the whole checkpoint: 15 GB at 7B, ~8 s of one core here on 2026-12-03).
    let (theirs, ours) = std::thread::scope(|scope| {
        let ours = scope.spawn(|| our_checksums(model));
        (reference.weights(&model.checkpoint.dir), ours.join())
    });
    let theirs = theirs?;
    let ours =
        ours.map_err(|_| HarnessError::input("hashing the checkpoint's tensors panicked"))?;
    let mut problems = vec![];
    // Non-finite values are never a valid weight, whatever the reference loaded.
    problems.extend(nonfinite.iter().map(|w| w.describe()));
    let mut checked = 0;
    let mut ours_count: u64 = 0;
    for (n, numel, ours) in &ours {
        ours_count += numel;
        match theirs.checksums.get(n) {
            Some(h) if h == ours => checked += 1,
            Some(_) => problems.push(format!("`{n}` differs from what transformers loaded")),
            None => problems.push(format!("`{n}` was not loaded by transformers")),
        }
    }
    for n in theirs.checksums.keys() {
        let aliased = n == "lm_head.weight" && c.tie_word_embeddings;
        if !model.checkpoint.contains(n) && !aliased {
            problems.push(format!("transformers has `{n}`, the checkpoint does not"));
        }
    }
    let expected = c.parameter_count() as u64;
    if ours_count != expected || theirs.parameter_count != expected {
        problems.push(format!(
            "parameter count: config implies {expected}, lockstep loaded {ours_count}, transformers {}",
            theirs.parameter_count
        ));
    }
    // Tied head: ours must be the embedding matrix exactly when the reference's is.
    let ours_tied = model.lm_head.bytes().as_ptr() == model.embed_tokens.bytes().as_ptr();
    if ours_tied != theirs.tied {
        problems.push(format!(
            "tied embeddings: lockstep {ours_tied}, transformers {}",
            theirs.tied
        ));
    }
    let ours_bias = model.layers.iter().all(|l| l.qkv_bias.is_some());
    if ours_bias != theirs.qkv_bias {
        problems.push(format!(
            "q/k/v biases: lockstep {}, transformers {}",
            if ours_bias { "present" } else { "absent" },
            if theirs.qkv_bias { "present" } else { "absent" }
        ));
    }
    let details = format!(
        "| check | result |\n|---|---|\n| tensors bit-identical (sha256, {} dtype) | {checked}/{} |\n| parameters | {ours_count} (transformers {}, config {expected}) |\n| tied embeddings | lockstep {ours_tied}, transformers {} |\n| q/k/v biases | lockstep {ours_bias}, transformers {} |\n{}",
        theirs.dtype,
        theirs.checksums.len(),
        theirs.parameter_count,
        theirs.tied,
        theirs.qkv_bias,
        problems.iter().map(|p| format!("\n- {p}")).collect::<String>()
    );
    let summary = format!(
        "{checked} tensors bit-identical, {ours_count} parameters{}",
        if problems.is_empty() {
            String::new()
        } else {
            format!("; {} problem(s): {}", problems.len(), problems[0])
        }
    );
    Ok(if problems.is_empty() {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, summary)
    }
    .with_details(details))
}
