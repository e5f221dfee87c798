//! `lockstep selftest`: inject every fault into the engine, verify each against the reference
//! (f64 tier) and show that each is detected and localized where it enters the computation.

use super::verify::{inputs, open_session, run_phases};
use crate::cli_error::{CliError, CliResult};
use lockstep_engine::Fault;
use lockstep_trace::forward_rank;
use lockstep_verify::Tier;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `selftest`.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder (default: the built-in default model). Must be an untied GQA Qwen2 model
    /// for every fault to be observable.
    #[arg(long)]
    model: Option<PathBuf>,
}

/// Runs every fault and prints the table; exit 0 when all are detected and localized.
pub fn run(a: Args) -> CliResult<ExitCode> {
    let (model, work, mut reference) = open_session(a.model.as_deref())?;

    // The clean engine must pass first, or the table means nothing.
    let clean = run_phases(
        &model,
        vec![Tier::F64],
        inputs(&[]),
        None,
        &mut reference,
        &work,
        0,
    )?;
    if !clean.passed {
        return Err(CliError::input(
            "the engine without faults does not pass the f64 tier on this model; selftest needs a passing baseline",
        ));
    }
    println!("| fault | detected | first divergence | enters at | localized |");
    println!("|---|---|---|---|---|");
    let mut all_ok = true;
    for fault in Fault::ALL {
        let out = run_phases(
            &model,
            vec![Tier::F64],
            inputs(&[]),
            Some(fault),
            &mut reference,
            &work,
            0,
        )?;
        let first = out
            .full
            .iter()
            .flat_map(|(_, cs)| cs.iter())
            .filter_map(|c| c.comparison.first_divergence.clone())
            .min_by_key(|n| forward_rank(n));
        let detected = !out.passed;
        let localized = first.as_deref() == Some(fault.enters_at());
        all_ok &= detected && localized;
        println!(
            "| {fault} | {} | {} | {} | {} |",
            if detected { "yes" } else { "NO" },
            first.as_deref().unwrap_or("-"),
            fault.enters_at(),
            if localized { "yes" } else { "NO" }
        );
    }
    println!(
        "{}",
        if all_ok {
            "selftest: every fault detected and localized"
        } else {
            "selftest: FAILED"
        }
    );
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
