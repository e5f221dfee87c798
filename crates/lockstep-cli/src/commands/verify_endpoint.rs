//! `lockstep verify --endpoint URL`: a running OpenAI-compatible server judged as a black box
//! (its greedy tokens and top-k log-probabilities) against the reference and the f64 oracle.

use super::common::TierChoice;
use super::verify::{describe_model, inputs, open_session, tiers, write_reports, Args};
use crate::cli_error::CliResult;
use crate::harness::endpoint::{run_endpoint_verify, EndpointOptions};
use crate::harness::inputs::InputKind;
use lockstep_verify::Tier;
use std::process::ExitCode;

/// New tokens per completion when `--generate-tokens` is not given.
const DEFAULT_TOKENS: usize = 32;

/// Runs `verify --endpoint URL`.
pub fn run_endpoint(a: Args) -> CliResult<ExitCode> {
    let url = a.endpoint.clone().unwrap_or_default();
    // Check the URL before the reference environment or the default model is touched.
    crate::harness::http::BaseUrl::parse(&url)?;
    let (model, work, mut reference) = open_session(a.model.as_deref())?;
    let tier = match a.dtype {
        TierChoice::All => Tier::F32,
        TierChoice::One(t) => *tiers(TierChoice::One(t), &model)?
            .first()
            .unwrap_or(&Tier::F32),
    };
    let inputs = inputs(&a.prompt)
        .into_iter()
        .filter(|i| !a.single_only || i.kind == InputKind::Single)
        .collect();
    let opts = EndpointOptions {
        url: url.clone(),
        model: model.clone(),
        tier,
        inputs,
        max_tokens: a.generate_tokens.unwrap_or(DEFAULT_TOKENS).max(1),
        top_logprobs: a.top_logprobs,
        work_dir: work,
    };
    let steps = crate::progress::Steps::start();
    let mut progress = |msg: &str| steps.step(msg);
    let (outcome, info) = run_endpoint_verify(&opts, &mut reference, &mut progress)?;
    drop(steps);
    let title = format!(
        "lockstep verify: endpoint {} (`{}`) against transformers [{tier}]",
        info.url, info.model_id
    );
    let desc = format!(
        "{}\n\nThe server at {} was asked for greedy completions (temperature 0) of token-id prompts with top-{} log-probabilities; the reference (transformers, {tier}) and the pure-f64 oracle ran here on each sequence the server produced, so every step is judged on the server's own context.",
        describe_model(&model),
        info.url,
        opts.top_logprobs
    );
    write_reports(
        &a,
        &title,
        &desc,
        &outcome,
        "endpoint verification has no per-layer data (black box)",
    )
}
