//! `lockstep compare REF TEST [--oracle ORACLE] [--report R.md] [--json R.json] [--plot P.svg]
//! [--html R.html]`.
//! Exit 0 when everything passes, 1 when something fails (a NaN or infinity on either side
//! always fails, even at the same place on both), 2 on bad input.

use super::common::PrecisionArg;
use crate::cli_error::{CliError, CliResult};
use lockstep_trace::TraceStore;
use lockstep_verify::{compare_stores, policy_for_stores, report, NamedComparison};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `compare`.
#[derive(clap::Args)]
pub struct Args {
    /// The reference trace (e.g. from `lockstep reference`): a file, or a folder of per-layer
    /// part files (`lockstep reference --out DIR/`).
    reference: PathBuf,
    /// The trace under test (ours, or any port's): a file or a folder.
    test: PathBuf,
    /// A pure-float64 reference trace on the same ids (file or folder): the yardstick for the
    /// f32/bf16 tiers.
    #[arg(long)]
    oracle: Option<PathBuf>,
    /// Force the precision tier (default: from the traces' dtype metadata).
    #[arg(long, value_enum)]
    tier: Option<PrecisionArg>,
    /// Write a Markdown report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write a JSON report (top-level "first_divergence").
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of the per-layer error.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write a self-contained HTML report (summary, first divergence, per-layer chart, details).
    #[arg(long)]
    html: Option<PathBuf>,
}

/// Writes a report file atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, text: &str) -> CliResult<()> {
    lockstep_trace::write_atomic(path, text.as_bytes())
        .map_err(|e| CliError::input(format!("cannot write {}: {e}", path.display())))
}

/// Compares two traces and prints the verdict.
pub fn run(a: Args) -> CliResult<ExitCode> {
    // Each side is a trace file or a trace folder (one file per layer), read a layer at a time.
    let reference = TraceStore::open(&a.reference)?;
    let test = TraceStore::open(&a.test)?;
    let oracle = a.oracle.as_deref().map(TraceStore::open).transpose()?;
    let tier = a.tier.map(|t| t.0);
    let policy = policy_for_stores(&reference, &test, oracle.as_ref(), tier)
        .map_err(|e| CliError::input(e.to_string()))?;
    let cmp = compare_stores(&reference, &test, oracle.as_ref(), &policy)?;
    let passed = cmp.passed;
    let label = a
        .test
        .file_name()
        .map_or("test".into(), |f| f.to_string_lossy().into_owned());
    let inputs = [NamedComparison::new(label, cmp)];
    let c = &inputs[0].comparison;
    println!(
        "{} tensors compared in the {} tier: {}",
        c.tensors.len(),
        c.tier.as_str(),
        c.verdict()
    );
    if let Some((name, ratio)) = c
        .tensors
        .iter()
        .filter_map(|t| t.tolerance_ratio().map(|r| (&t.name, r)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        println!("closest to its tolerance: {name} at {ratio:.3} of the bound");
    }
    println!(
        "first_divergence: {}",
        c.first_divergence.as_deref().unwrap_or("none")
    );
    for line in c.first_nonfinite.lines() {
        println!("first non-finite value, {line}");
    }
    if let Some(p) = &a.report {
        write_atomic(p, &report::markdown(&inputs))?;
    }
    if let Some(p) = &a.json {
        write_atomic(p, &report::json(&inputs))?;
    }
    if let Some(p) = &a.plot {
        write_atomic(
            p,
            &report::svg_per_layer("max |difference| per layer", &inputs),
        )?;
    }
    if let Some(p) = &a.html {
        let title = format!(
            "lockstep compare: {} against {}",
            a.test.display(),
            a.reference.display()
        );
        write_atomic(p, &lockstep_verify::html::compare_html(&title, &inputs))?;
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
