//! The harness: everything that *drives* an implementation for `lockstep verify` and `selftest`:
//! lockstep's engine ([`engine_pipeline`]), another port's trace files ([`port_pipeline`]) and the
//! Python reference ([`pyref`], [`python`]). The judging itself is `lockstep_verify`'s, which
//! depends on the trace format only.

pub mod checks;
pub mod engine_pipeline;
pub mod error;
pub mod generation;
pub mod inputs;
pub mod port_pipeline;
pub mod pyref;
pub mod python;
pub mod reference;

pub use error::{HarnessError, HarnessResult};
use lockstep_trace::Trace;
use lockstep_verify::{judge, Tier, TraceComparison};
use std::path::Path;

/// Ids for a table cell: the list when short, else the count.
pub fn show_ids(v: &[u32]) -> String {
    if v.len() <= 8 {
        format!("{v:?}")
    } else {
        format!("{} ids", v.len())
    }
}

/// A text for a table cell: one line, at most 40 characters.
pub fn short(text: &str) -> String {
    let one = text.replace('\n', "\\n");
    if one.chars().count() > 40 {
        format!("{}…", one.chars().take(40).collect::<String>())
    } else {
        one
    }
}

/// Judges `test` in `tier` against the reference traces `read` returns by dtype name: in f64 the
/// oracle is the reference itself; below it, the reference run in the tier's dtype is judged
/// against with the f64 oracle beside it.
pub fn judge_in_tier(
    tier: Tier,
    test: &Trace,
    read: &dyn Fn(&str) -> HarnessResult<Trace>,
) -> HarnessResult<TraceComparison> {
    let oracle = read(Tier::F64.as_str())?;
    Ok(if tier == Tier::F64 {
        judge(&oracle, test, None, tier)?
    } else {
        judge(&read(tier.as_str())?, test, Some(&oracle), tier)?
    })
}

/// Reads a trace the reference wrote (a failure is the reference's).
pub fn read_reference_trace(path: &Path) -> HarnessResult<Trace> {
    Trace::read(path).map_err(|e| HarnessError::reference(format!("its trace is unreadable: {e}")))
}

/// Creates the work folder.
pub fn create_work_dir(dir: &Path) -> HarnessResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| HarnessError::io(format!("cannot create {}", dir.display()), e))
}
