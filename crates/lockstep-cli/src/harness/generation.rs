//! The greedy generation phase: lockstep's `generate` against `transformers.generate`, per tier.

use super::engine_pipeline::VerifyOptions;
use super::inputs::InputKind;
use super::reference::{GenerateJob, Reference, TOP_MAX};
use super::HarnessResult;
use lockstep_engine::chat::{ChatTemplate, Message};
use lockstep_engine::generate::{generate_batch, GenerateOptions, GenerationDefaults};
use lockstep_engine::{with_float, BatchKvCache, Float, LogitsFor, Model, PaddedBatch, Tokenizer};
use lockstep_verify::near_tie::{judge_parting, GeneratedRow};
use lockstep_verify::{Phase, Tier};
use std::fmt::Write as _;

/// Greedy generation in the arithmetic of `tier` (f32 or bf16): our `generate` against
/// `transformers.generate` with the model loaded in that dtype, token for token, on the first
/// single-token prompt, the multi-token inputs and (when the checkpoint has a chat template) a
/// chat-formatted question; then all of them again as one left-padded batch. Where the two part,
/// it is a near-tie (rounding decides) only when the two tokens are within `tie` in the
/// reference's own logits and in ours ([`lockstep_verify::near_tie`]); otherwise a real
/// difference. `tie` is the reference's yardstick for the tier: the f32 logits tolerance, or for
/// bf16 how far PyTorch's own bf16 logits lie from the f64 oracle on the inputs.
pub fn generation_phase(
    model: &Model,
    opts: &VerifyOptions,
    ids: &[Vec<u32>],
    reference: &mut dyn Reference,
    tier: Tier,
    tie: f64,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<Phase> {
    let name = format!("greedy generation [{tier}]");
    let tok = Tokenizer::from_dir(&opts.model)?;
    let mut prompts: Vec<(String, Vec<u32>)> = vec![];
    let mut singles = opts
        .inputs
        .iter()
        .zip(ids)
        .filter(|(i, _)| i.kind == InputKind::Single);
    if let Some((input, t)) = singles.next() {
        prompts.push((input.label.clone(), t.clone()));
    }
    for (input, t) in opts.inputs.iter().zip(ids) {
        if input.kind == InputKind::Multi {
            prompts.push((input.label.clone(), t.clone()));
        }
    }
    if let Some(template) = ChatTemplate::from_dir(&opts.model)? {
        let text = template.render(
            &[Message::new("user", "What is the capital of France?")],
            true,
            None,
        )?;
        prompts.push(("chat: capital of France".into(), tok.encode(&text)?));
    }
    if prompts.is_empty() {
        return Ok(Phase::skip(name, "no prompt"));
    }
    let defaults = GenerationDefaults::from_dir(&opts.model, &model.config)?;
    let gen_opts = GenerateOptions {
        max_new_tokens: opts.generate_tokens,
        eos_token_ids: defaults.eos_token_ids.clone(),
        ignore_eos: false,
        stop: vec![],
        sampling: lockstep_engine::sampling::SamplingParams::greedy(),
        seed: 0,
    };
    let rows: Vec<Vec<u32>> = prompts.iter().map(|(_, p)| p.clone()).collect();
    let job = |prompts: Vec<Vec<u32>>| GenerateJob {
        model: opts.model.clone(),
        dtype: tier.as_str().into(),
        prompts,
        max_new_tokens: opts.generate_tokens,
        tie_within: tie,
    };
    let mut jobs: Vec<GenerateJob> = rows.iter().map(|p| job(vec![p.clone()])).collect();
    if rows.len() > 1 {
        jobs.push(job(rows.clone()));
    }
    // Ours first, while the model's pages are in memory: the reference then loads its own copy
    // of the weights (15 GB at 7B), which on a machine of 23 GB pushed our mapped file out of the
    // page cache and made each of our steps read it from disk again (7B plan, 2026-12-03: 72 s
    // for our 80 steps after transformers.generate, 2.2 tok/s alone).
    progress(&format!(
        "greedy generation in {tier}: lockstep, {} prompt(s) alone and batched",
        rows.len()
    ));
    let ours = match with_float!(tier, T => generate_ours::<T>(model, &tok, &rows, &gen_opts)) {
        Ok(v) => v,
        // Non-finite logits: our generate refuses to pick tokens; the phase fails, saying where.
        Err(e @ lockstep_engine::EngineError::NonFinite(_)) => {
            return Ok(Phase::fail(name, e.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    progress(&format!(
        "greedy generation in {tier}: transformers.generate, {} run(s)",
        jobs.len()
    ));
    let theirs = reference.generate(&jobs)?;
    let mut table = String::from(
        "| prompt | run | prompt tokens | lockstep | transformers | identical | verdict |\n|---|---|---:|---:|---:|---:|---|\n",
    );
    let (mut identical, mut ties, mut bugs) = (0, 0, vec![]);
    // `batch`: the prompts of our run that made `ours` (one, or all of them), `generated` its
    // rows' tokens, `row` this one's place in it.
    let mut check = |label: &str,
                     run: &str,
                     prompt: &[u32],
                     (batch, generated, row): (&[Vec<u32>], &[Vec<u32>], usize),
                     theirs: &GeneratedRow|
     -> HarnessResult<()> {
        let ours = &generated[row][..];
        let (theirs, theirs_top) = (&theirs.ids[..], &theirs.top);
        // transformers pads a batch row that ended (EOS) until the batch ends: cut after its EOS.
        let theirs = match theirs
            .iter()
            .position(|t| gen_opts.eos_token_ids.contains(t))
        {
            Some(e) if run == "batched" => &theirs[..=e],
            _ => theirs,
        };
        let same = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
        let verdict = if ours == theirs {
            identical += 1;
            "PASS".to_string()
        } else if same < ours.len() && same < theirs.len() {
            // Our own logits at the step where the two part, as the run that picked our token
            // computed them, and the reference's own.
            let logits =
                with_float!(tier, T => replayed_logits::<T>(model, batch, generated, row, same))?;
            let top = theirs_top.get(same).map_or(&[][..], |t| &t[..]);
            // The reference lists every token within `tie` of its best (up to TOP_MAX): ours
            // missing from a shorter list is further than that.
            let listed_within = (top.len() < TOP_MAX).then_some(tie);
            let p = judge_parting(ours[same], theirs[same], top, &logits, tie, listed_within);
            if p.our_gap.is_nan() || p.our_gap < 0.0 {
                // The replay's argmax is not the token our run picked (greedy, no penalty in
                // this phase): our generation does not reproduce, whatever the reference says.
                bugs.push(format!("{label} ({run}) at token {same}: not reproducible"));
                format!("**FAIL** at token {same}: lockstep picked {} but its own logits replayed at that step rank {} {:.1e} higher: its generation does not reproduce", ours[same], theirs[same], -p.our_gap)
            } else if p.near_tie {
                ties += 1;
                format!("near-tie at token {same}: lockstep {} vs transformers {}: {} (both ≤ {tie:.0e}): rounding decides, not a bug", ours[same], theirs[same], p.describe())
            } else {
                bugs.push(format!("{label} ({run}) at token {same}"));
                format!("**FAIL** at token {same}: lockstep {} vs transformers {}: {} (a near-tie needs both ≤ {tie:.0e})", ours[same], theirs[same], p.describe())
            }
        } else {
            bugs.push(format!(
                "{label} ({run}): lengths {} vs {}",
                ours.len(),
                theirs.len()
            ));
            format!(
                "**FAIL**: same first {same} tokens, then one side stops ({} vs {})",
                ours.len(),
                theirs.len()
            )
        };
        let _ = writeln!(
            table,
            "| {label} | {run} | {} | {} | {} | {same}/{} | {verdict} |",
            prompt.len(),
            ours.len(),
            theirs.len(),
            ours.len().max(theirs.len())
        );
        Ok(())
    };
    for (i, (label, prompt)) in prompts.iter().enumerate() {
        let alone = (
            std::slice::from_ref(&rows[i]),
            std::slice::from_ref(&ours.alone[i]),
            0,
        );
        check(label, "alone", prompt, alone, &theirs[i][0])?;
    }
    for (i, (label, prompt)) in prompts.iter().enumerate().filter(|_| rows.len() > 1) {
        check(
            label,
            "batched",
            prompt,
            (&rows[..], &ours.batch[..], i),
            &theirs[rows.len()][i],
        )?;
    }
    let runs = rows.len() + if rows.len() > 1 { rows.len() } else { 0 };
    let summary = format!(
        "greedy {} new tokens in {tier} on {} prompt(s), alone and as one left-padded batch, vs transformers.generate in {tier}: {identical}/{runs} identical{}",
        opts.generate_tokens,
        rows.len(),
        if ties > 0 { format!(", {ties} parted on a near-tie (rounding)") } else { String::new() }
    );
    Ok(if bugs.is_empty() {
        Phase::pass(name, summary)
    } else {
        Phase::fail(name, format!("{summary}; differs: {}", bugs.join(", ")))
    }
    .with_details(table))
}

/// Our new ids: each prompt's generated alone, and (with more than one prompt) each row's of
/// the batch.
struct Ours {
    alone: Vec<Vec<u32>>,
    batch: Vec<Vec<u32>>,
}

/// Our greedy generations in `T`'s arithmetic: each prompt alone, then (with more than one) all of
/// them as one left-padded batch.
fn generate_ours<T: Float>(
    model: &Model,
    tok: &Tokenizer,
    rows: &[Vec<u32>],
    opts: &GenerateOptions,
) -> lockstep_engine::Result<Ours> {
    let alone = rows
        .iter()
        .map(|p| {
            generate_batch::<T>(model, tok, std::slice::from_ref(p), opts, |_, _| {})
                .map(|mut g| g.remove(0).generated)
        })
        .collect::<Result<_, _>>()?;
    let batch = if rows.len() > 1 {
        generate_batch::<T>(model, tok, rows, opts, |_, _| {})?
            .into_iter()
            .map(|g| g.generated)
            .collect()
    } else {
        vec![]
    };
    Ok(Ours { alone, batch })
}

/// Our logits (as f32, in `T`'s arithmetic) at generated step `step` of row `row`, replayed as
/// [`generate_batch`] computed them: `prompts` prefilled as one left-padded batch, then each
/// row's own `generated` tokens fed back a step at a time, a row leaving the batch after its last
/// token. These are the logits that picked our token at that step: a full forward pass over the
/// context can differ from them (in bf16 on AMX by more than the last bit: the prefill's tiles
/// sum in another order than a decode step).
fn replayed_logits<T: Float>(
    model: &Model,
    prompts: &[Vec<u32>],
    generated: &[Vec<u32>],
    row: usize,
    step: usize,
) -> lockstep_engine::Result<Vec<f32>> {
    let vocab = model.config.vocab_size;
    let batch = PaddedBatch::left_padded(prompts, 0);
    let mut cache = BatchKvCache::<T>::new(model.config.num_layers, prompts.len());
    let mut logits =
        model.forward_batch::<T>(&batch.tokens, &batch.mask, &mut cache, LogitsFor::Last)?;
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for s in 0..step {
        let stays = |r: &usize| generated[*r].len() > s + 1;
        let keep: Vec<bool> = active.iter().map(stays).collect();
        cache.keep_rows(&keep);
        active.retain(stays);
        let next: Vec<u32> = active.iter().map(|&r| generated[r][s]).collect();
        let all = vec![true; next.len()];
        logits = model.forward_batch::<T>(&next, &all, &mut cache, LogitsFor::Last)?;
    }
    let slot = active
        .iter()
        .position(|&r| r == row)
        .expect("the row generated past `step`");
    Ok(logits[slot * vocab..(slot + 1) * vocab]
        .iter()
        .map(|v| v.to_f64() as f32)
        .collect())
}
