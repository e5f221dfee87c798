//! [`compare_traces`] over traces on disk, one part (decoder layer) at a time: memory bounded by
//! one layer's tensors of each trace, whether each is a single file or a trace folder.

use super::{compare_traces, TraceComparison};
use crate::tolerance::{PolicyError, Tier, TolerancePolicy};
use lockstep_trace::{Part, Trace, TraceError, TraceStore};

/// Why a streamed comparison could not run.
#[derive(Debug, thiserror::Error)]
pub enum StreamCompareError {
    /// A trace could not be read.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The traces' precision tiers do not allow a judgement.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// What the policy is made from: each trace's metadata and its logits (the tier is inferred from
/// their storage when a trace has no `dtype` metadata).
fn probe(store: &TraceStore) -> Result<Trace, TraceError> {
    // The `dtype` metadata decides the tier when present: the logits are not read then.
    if store.metadata().contains_key("dtype") {
        store.load(&[])
    } else {
        store.load(&["logits"])
    }
}

/// The tolerance policy of three stored traces, as [`TolerancePolicy::for_traces_with_tier`]
/// makes it from whole traces.
pub fn policy_for_stores(
    reference: &TraceStore,
    test: &TraceStore,
    oracle: Option<&TraceStore>,
    tier: Option<Tier>,
) -> Result<TolerancePolicy, StreamCompareError> {
    let o = oracle.map(probe).transpose()?;
    Ok(TolerancePolicy::for_traces_with_tier(
        &probe(reference)?,
        &probe(test)?,
        o.as_ref(),
        tier,
    )?)
}

/// [`compare_traces`] on stored traces, loading one [`Part`] of each at a time: the result is
/// the one the whole traces give (the same records in the same order, the same verdict).
pub fn compare_stores(
    reference: &TraceStore,
    test: &TraceStore,
    oracle: Option<&TraceStore>,
    policy: &TolerancePolicy,
) -> Result<TraceComparison, TraceError> {
    let mut parts: Vec<Part> = reference.parts();
    parts.extend(test.parts());
    parts.sort();
    parts.dedup();
    // The tensors of one part of each trace, and the oracle's `tokens` with its first part (the
    // ids are checked against it).
    let load = |part: Part| -> Result<(Trace, Trace, Option<Trace>), TraceError> {
        let r = reference.load_part(part)?;
        let t = test.load_part(part)?;
        let o = match oracle {
            Some(o) => {
                let mut names: Vec<&str> = o
                    .names()
                    .into_iter()
                    .filter(|n| Part::of(n) == part)
                    .collect();
                if part != Part::Before {
                    names.retain(|n| *n != "tokens");
                }
                Some(o.load(&names)?)
            }
            None => None,
        };
        Ok((r, t, o))
    };
    let mut merged: Option<TraceComparison> = None;
    let mut next = parts.first().map(|&p| load(p)).transpose()?;
    for i in 0..parts.len() {
        let (r, t, o) = next.take().expect("loaded before its turn");
        // The next part is read while this one is compared.
        let (c, following) = rayon::join(
            || compare_traces(&r, &t, o.as_ref(), policy),
            || parts.get(i + 1).map(|&p| load(p)).transpose(),
        );
        next = following?;
        merged = Some(match merged {
            None => c,
            Some(m) => merge(m, c),
        });
    }
    let mut m =
        merged.unwrap_or_else(|| compare_traces(&Trace::new(), &Trace::new(), None, policy));
    // What whole traces give: "no tensors" only when no part held any, passed only with some.
    let numeric = m.tensors.iter().filter(|t| t.name != "tokens").count();
    if numeric > 0 {
        m.warnings.retain(|w| w != "no tensors to compare");
    }
    m.passed = numeric > 0 && m.tensors.iter().all(|t| t.status == super::Status::Pass);
    m.first_divergence = m
        .tensors
        .iter()
        .find(|t| t.status.is_failure())
        .map(|t| t.name.clone());
    Ok(m)
}

/// Two parts' comparisons as one, the earlier first.
fn merge(mut a: TraceComparison, b: TraceComparison) -> TraceComparison {
    // Each part re-checks the ids against what it holds: keep the first `tokens` record only.
    let has_tokens = a.tensors.iter().any(|t| t.name == "tokens");
    a.tensors.extend(
        b.tensors
            .into_iter()
            .filter(|t| !(has_tokens && t.name == "tokens")),
    );
    for w in b.warnings {
        if !a.warnings.contains(&w) {
            a.warnings.push(w);
        }
    }
    let f = &mut a.first_nonfinite;
    f.reference = f.reference.take().or(b.first_nonfinite.reference);
    f.test = f.test.take().or(b.first_nonfinite.test);
    f.oracle = f.oracle.take().or(b.first_nonfinite.oracle);
    a.token_ids = a.token_ids.or(b.token_ids);
    a.token_shape = a.token_shape.or(b.token_shape);
    a.passed = a.passed && b.passed;
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{base_tensors, f64_trace, make_trace, set};
    use lockstep_trace::write_parts;

    /// Writes `t` as a file or a folder and opens it.
    fn stored(t: &Trace, dir: &std::path::Path, name: &str, folder: bool) -> TraceStore {
        let p = dir.join(name);
        if folder {
            write_parts(t, &p).unwrap();
        } else {
            t.write(&p).unwrap();
        }
        TraceStore::open(&p).unwrap()
    }

    #[test]
    fn stored_traces_compare_exactly_as_whole_ones() {
        let d = tempfile::tempdir().unwrap();
        let ids = [9707, 11, 1879, 0];
        let oracle = f64_trace();
        let reference = make_trace(&base_tensors(), "f32", &ids);
        let mut bug = reference.clone();
        set(&mut bug, "layers.1.mlp_out", 5, 40.0);
        set(&mut bug, "layers.2.k", 1, f64::NAN);
        let mut other_ids = reference.clone();
        other_ids
            .insert(
                "tokens",
                vec![1, 4],
                lockstep_trace::TensorData::I64(vec![9707, 11, 1879, 1]),
            )
            .unwrap();
        let mut partial = reference.clone();
        partial.metadata.insert("producer".into(), "a port".into());
        let mut kept = Trace::new();
        kept.metadata = partial.metadata.clone();
        for n in partial.names() {
            if !n.starts_with("layers.2.") {
                let t = partial.get(n).unwrap();
                kept.insert(n, t.shape.clone(), t.data.clone()).unwrap();
            }
        }
        let cases = [
            ("identical", reference.clone(), true),
            ("a bug and a NaN", bug, false),
            ("other token ids", other_ids, false),
            ("a layer missing", kept, false),
        ];
        for (what, test, passes) in cases {
            let whole_policy =
                TolerancePolicy::for_traces(&reference, &test, Some(&oracle)).unwrap();
            let whole = compare_traces(&reference, &test, Some(&oracle), &whole_policy);
            assert_eq!(whole.passed, passes, "{what}");
            for (k, (rf, tf, of)) in [
                (true, true, true),
                (false, true, false),
                (true, false, true),
                (false, false, false),
            ]
            .into_iter()
            .enumerate()
            {
                let r = stored(&reference, d.path(), &format!("r{k}{what}"), rf);
                let t = stored(&test, d.path(), &format!("t{k}{what}"), tf);
                let o = stored(&oracle, d.path(), &format!("o{k}{what}"), of);
                let policy = policy_for_stores(&r, &t, Some(&o), None).unwrap();
                let got = compare_stores(&r, &t, Some(&o), &policy).unwrap();
                // Debug text, not ==: a NaN statistic is not equal to itself.
                assert_eq!(
                    format!("{got:?}"),
                    format!("{whole:?}"),
                    "{what}: folders {rf} {tf} {of}"
                );
            }
        }
    }
}
