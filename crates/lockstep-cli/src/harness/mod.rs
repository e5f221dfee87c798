//! The harness: everything that *drives* an implementation for `lockstep verify` and `selftest`:
//! lockstep's engine ([`engine_pipeline`]), another port's trace files ([`port_pipeline`]) and the
//! Python reference ([`pyref`], [`python`]). The judging itself is `lockstep_verify`'s, which
//! depends on the trace format only.

pub mod checks;
pub mod endpoint;
pub mod endpoint_response;
pub mod engine_pipeline;
pub mod error;
pub mod generation;
pub mod http;
pub mod inputs;
pub mod port_pipeline;
pub mod protocol;
pub mod pyref;
pub mod python;
pub mod q8dot_phase;
pub mod reference;

pub use error::{HarnessError, HarnessResult};
use lockstep_trace::{LayerTap, TapName, Trace, TraceStore};
use lockstep_verify::{judge, Tier, TraceComparison};
use std::path::Path;

/// Times the steps a pipeline announces through its progress callback: each step lasts from its
/// announcement to the next one's (or to [`StepClock::finish`]).
#[derive(Debug, Default)]
pub struct StepClock {
    current: Option<(String, std::time::Instant)>,
    done: Vec<lockstep_verify::StepTime>,
}

impl StepClock {
    /// Ends the step under way, if any, and starts `name`.
    pub fn step(&mut self, name: &str) {
        self.close();
        self.current = Some((name.to_string(), std::time::Instant::now()));
    }

    fn close(&mut self) {
        if let Some((step, start)) = self.current.take() {
            self.done.push(lockstep_verify::StepTime {
                step,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }

    /// Ends the step under way; every step with its time, in order.
    pub fn finish(mut self) -> Vec<lockstep_verify::StepTime> {
        self.close();
        self.done
    }
}

/// The tensors the logits phases judge: the input ids and the logits.
pub fn is_logits_or_tokens(name: &str) -> bool {
    matches!(
        TapName::parse(name),
        Some(TapName::Tokens | TapName::Logits)
    )
}

/// The tensors the attention-weights phase judges: the input ids and every layer's
/// attention probabilities.
pub fn is_attention_probs_or_tokens(name: &str) -> bool {
    matches!(
        TapName::parse(name),
        Some(TapName::Tokens | TapName::Layer(_, LayerTap::AttnProbs))
    )
}

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

/// [`judge_in_tier`] with the test trace already written to `test` and every trace read a
/// decoder layer at a time ([`lockstep_verify::compare_stores`]: the same records and verdict as
/// whole traces give). At 7B the whole traces of the 260-token input took 12.8 GB beside the
/// mapped weights (the f64 oracle 3.8 GB, PyTorch bf16 1.9, ours), pushing the weights out of the
/// page cache; a layer at a time they take ~1.8 GB.
pub fn judge_stored_in_tier(
    tier: Tier,
    test: &Path,
    reference: &dyn Fn(&str) -> std::path::PathBuf,
) -> HarnessResult<TraceComparison> {
    use lockstep_verify::{compare_stores, policy_for_stores, StreamCompareError};
    let open_reference =
        |dt: &str| TraceStore::open(&reference(dt)).map_err(reference_trace_unreadable);
    let oracle = open_reference(Tier::F64.as_str())?;
    let test_store = TraceStore::open(test)
        .map_err(|e| HarnessError::input(format!("cannot read {}: {e}", test.display())))?;
    let tier_reference = (tier != Tier::F64)
        .then(|| open_reference(tier.as_str()))
        .transpose()?;
    let (reference, oracle) = match &tier_reference {
        Some(r) => (r, Some(&oracle)),
        None => (&oracle, None),
    };
    let policy =
        policy_for_stores(reference, &test_store, oracle, Some(tier)).map_err(|e| match e {
            StreamCompareError::Policy(p) => HarnessError::from(p),
            StreamCompareError::Trace(t) => reference_trace_unreadable(t),
        })?;
    compare_stores(reference, &test_store, oracle, &policy)
        .map_err(|e| HarnessError::input(format!("cannot read the traces to compare: {e}")))
}

/// Reads a trace the reference wrote (a failure is the reference's).
pub fn read_reference_trace(path: &Path) -> HarnessResult<Trace> {
    Trace::read(path).map_err(reference_trace_unreadable)
}

/// Where the reference writes the trace `stem` in `work`: with `folder` (a model the reference
/// streams: [`pyref::streamed`] in f64, decided once per run) a trace folder (`{stem}.trace/`, one
/// part file per decoder layer), which its streamed passes write a layer at a time as each is done
/// instead of holding the whole trace (at the 7B shape's 260-token input the float64 trace is
/// 3.8 GB and its op-level outputs ~5 GB); else a single file (`{stem}.safetensors`). Both read
/// through [`TraceStore`].
pub fn reference_output(work: &Path, stem: &str, folder: bool) -> std::path::PathBuf {
    if folder {
        work.join(format!("{stem}.trace{}", std::path::MAIN_SEPARATOR))
    } else {
        work.join(format!("{stem}.safetensors"))
    }
}

/// A trace the reference wrote that cannot be read: the reference's failure.
fn reference_trace_unreadable(e: lockstep_trace::TraceError) -> HarnessError {
    HarnessError::reference(format!("its trace is unreadable: {e}"))
}

/// Creates the work folder.
pub fn create_work_dir(dir: &Path) -> HarnessResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| HarnessError::io(format!("cannot create {}", dir.display()), e))
}

/// One test trace to judge op by op: its label, its file, and its end-to-end comparison.
pub struct OpsInput {
    /// Label for tables.
    pub label: String,
    /// The test trace file.
    pub test: std::path::PathBuf,
    /// The test trace's end-to-end comparison, for the made-vs-inherited table.
    pub end_to_end: Option<TraceComparison>,
}

/// Judges every op of each test trace on its own inputs in `tier` (one reference run for all of
/// them): the reference recomputes each op from the trace's copies of its inputs, in pure f64 and
/// in the tier's dtype, and [`lockstep_verify::judge_local_stored`] judges the test's local error against
/// the reference's. `prefix` names the output files in `work`.
pub fn judge_ops(
    reference: &mut dyn reference::Reference,
    model: &Path,
    tier: Tier,
    inputs: Vec<OpsInput>,
    work: &Path,
    prefix: &str,
) -> HarnessResult<Vec<lockstep_verify::local::NamedLocal>> {
    let folders = pyref::streamed(model, "f64");
    let paths: Vec<(std::path::PathBuf, Option<std::path::PathBuf>)> = (0..inputs.len())
        .map(|i| {
            let base = format!("{prefix}-{i}-{tier}");
            (
                reference_output(work, &format!("{base}.ops-exact"), folders),
                (tier != Tier::F64)
                    .then(|| reference_output(work, &format!("{base}.ops-ref"), folders)),
            )
        })
        .collect();
    let jobs: Vec<reference::OpsJob> = inputs
        .iter()
        .zip(&paths)
        .map(|(inp, (x, r))| reference::OpsJob {
            model: model.to_path_buf(),
            test: inp.test.clone(),
            dtype: tier.as_str().into(),
            out_exact: x.clone(),
            out_reference: r.clone(),
        })
        .collect();
    reference.local_ops(&jobs)?;
    let mut out = vec![];
    let reference_file = |p: &Path| TraceStore::open(p).map_err(reference_trace_unreadable);
    for (inp, (x, r)) in inputs.into_iter().zip(paths) {
        let test_error = |e| HarnessError::input(format!("{}: {e}", inp.test.display()));
        let test = TraceStore::open(&inp.test).map_err(test_error)?;
        let exact = reference_file(&x)?;
        let rtrace = r.as_deref().map(reference_file).transpose()?;
        // One decoder layer of the three traces in memory at a time. The 7B shape's 260-token
        // input (2026-12-03, 2 cores): 8.3 s and 0.9 GB peak, against 25 s and 9.3 GB with the
        // traces read whole (most of it the kernel zeroing their 7.6 GB of fresh pages).
        let local = lockstep_verify::judge_local_stored(&test, rtrace.as_ref(), &exact, tier)
            .map_err(|(side, e)| match side {
                lockstep_verify::LocalSide::Test => test_error(e),
                _ => reference_trace_unreadable(e),
            })?;
        out.push(lockstep_verify::local::NamedLocal {
            label: inp.label,
            local,
            end_to_end: inp.end_to_end,
        });
    }
    Ok(out)
}

/// The op-level phase of `tier` for these test traces ("ours" or "port" names the side in the
/// progress line and the output files), with its judgements; skipped only when the model's float64
/// copy would not fit in memory and the reference cannot stream its architecture layer by layer
/// ([`pyref::local_ops_supported`]).
pub fn op_level_phase(
    reference: &mut dyn reference::Reference,
    model: &Path,
    tier: Tier,
    inputs: Vec<OpsInput>,
    work: &Path,
    side: &str,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<(
    lockstep_verify::Phase,
    Vec<lockstep_verify::local::NamedLocal>,
)> {
    let name = format!("op-level (each op on its own inputs) [{tier}]");
    if !pyref::local_ops_supported(model) {
        return Ok((
            lockstep_verify::Phase::skip(
                name,
                "the model's float64 copy would not fit in memory and the op-level reference cannot stream this model layer by layer (it streams Hugging Face folders of every architecture but Qwen3-MoE)",
            ),
            vec![],
        ));
    }
    progress(&format!(
        "op-level in {tier}: transformers recomputes each op on the test trace's own inputs"
    ));
    let items = judge_ops(reference, model, tier, inputs, work, side)?;
    Ok((lockstep_verify::local::local_phase(name, &items), items))
}

#[cfg(test)]
mod tests {
    use super::StepClock;

    #[test]
    fn step_clock_times_each_step_until_the_next() {
        let mut clock = StepClock::default();
        clock.step("first");
        std::thread::sleep(std::time::Duration::from_millis(30));
        clock.step("second");
        let steps = clock.finish();
        let names: Vec<&str> = steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        assert!(steps[0].seconds >= 0.03, "{steps:?}");
        assert!(steps[1].seconds < steps[0].seconds, "{steps:?}");
        assert!(StepClock::default().finish().is_empty());
    }
}
