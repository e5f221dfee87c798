//! Judging a mixture-of-experts router's top-k expert ids (`layers.{i}.router_topk_ids`).
//!
//! Ids are exact integers: they either agree or name another expert, and a numeric distance
//! between two ids means nothing. An id that differs from the reference's is excused only when
//! the *reference's own* router logits put the two experts within the allowance its
//! `router_logits` comparison was judged by (a near-tie the reference itself cannot resolve at
//! this precision); the test's logits never excuse anything.

use crate::compare::{Against, AppliedTolerance, Status, TensorComparison};
use crate::tolerance::Tolerance;
use lockstep_trace::{LayerTap, TapName, TensorData, Trace};

/// Whether `name` is a top-k ids tensor (judged by [`judge_topk_ids`]).
pub fn is_topk_ids(name: &str) -> bool {
    matches!(
        TapName::parse(name),
        Some(TapName::Layer(_, LayerTap::RouterTopkIds))
    )
}

/// Re-judges the ids record `c` (made by `compare_tensors`) of layer `name`: every id equal to
/// the reference's, or excused by the reference's margin. `earlier` are the records compared
/// before it (the layer's `router_logits` among them: its applied threshold is the allowance).
pub fn judge_topk_ids(
    c: &mut TensorComparison,
    name: &str,
    reference: &Trace,
    test: &Trace,
    earlier: &[TensorComparison],
    rule: Tolerance,
) {
    if !matches!(c.status, Status::Pass | Status::Fail | Status::Unjudged) {
        return; // shape mismatch, non-finite: already a failure of its own kind
    }
    let Some(TapName::Layer(l, _)) = TapName::parse(name) else {
        return;
    };
    let logits_name = TapName::Layer(l, LayerTap::RouterLogits).to_string();
    let (Some(r), Some(t)) = (reference.get(name), test.get(name)) else {
        return;
    };
    // Ids are int64 in every trace lockstep, the reference and the writer make; anything else
    // keeps the numeric comparison.
    if !matches!((&r.data, &t.data), (TensorData::I64(_), TensorData::I64(_))) {
        return;
    }
    let (r, t) = (r.data.to_f64(), t.data.to_f64());
    let k = c
        .ref_shape
        .as_ref()
        .and_then(|s| s.last().copied())
        .unwrap_or(1)
        .max(1);
    let ref_logits = reference.get(&logits_name).map(|x| x.data.to_f64());
    let allowance = earlier
        .iter()
        .find(|x| x.name == logits_name)
        .and_then(|x| x.tolerance.as_ref())
        .map_or(0.0, |a| a.threshold);
    let experts = ref_logits
        .as_ref()
        .map_or(0, |v| v.len() / (r.len() / k).max(1));
    let (mut differ, mut excused, mut first_bad) = (0usize, 0usize, None);
    for (i, (&a, &b)) in r.iter().zip(&t).enumerate() {
        if a == b {
            continue;
        }
        differ += 1;
        let tok = i / k;
        // The reference's own logits of the two experts.
        let margin = ref_logits.as_ref().and_then(|v| {
            let row = v.get(tok * experts..(tok + 1) * experts)?;
            let (ia, ib) = (a as usize, b as usize);
            (b >= 0.0 && ib < experts).then(|| (row[ia] - row[ib]).abs())
        });
        match margin {
            Some(m) if m <= allowance => excused += 1,
            _ => {
                first_bad.get_or_insert((tok, i % k, a, b, margin));
            }
        }
    }
    let unexcused = differ - excused;
    c.tolerance = Some(AppliedTolerance {
        rule,
        against: Against::Reference,
        measured: unexcused as f64,
        threshold: 0.0,
        explanation: format!(
            "ids exact; a different expert excused only by the reference's own router logits within {} ({excused} excused)",
            crate::compare::sci(allowance)
        ),
        min_top1_agreement: None,
    });
    c.status = if unexcused == 0 {
        Status::Pass
    } else {
        Status::Fail
    };
    c.note = match first_bad {
        Some((tok, slot, a, b, m)) => Some(format!(
            "{unexcused} of {} ids differ beyond a near-tie; first at token {tok}, slot {slot}: reference expert {a}, test expert {b} (reference's margin {}, allowance {})",
            r.len(),
            m.map_or("unknown".to_string(), crate::compare::sci),
            crate::compare::sci(allowance)
        )),
        None if excused > 0 => Some(format!(
            "{excused} ids differ where the reference's own logits are a near-tie (within {})",
            crate::compare::sci(allowance)
        )),
        None => None,
    };
}

#[cfg(test)]
mod tests {
    use crate::compare::{compare_traces, Status};
    use crate::tolerance::{Tier, TolerancePolicy};
    use lockstep_trace::{TensorData, Trace};

    /// Two tokens, 4 experts, top-2; token 1's experts 2 and 3 are a near-tie in the reference.
    fn trace(ids: [i64; 4], logits: [f64; 8]) -> Trace {
        let mut t = Trace::default();
        t.insert(
            "layers.0.router_logits",
            vec![1, 2, 4],
            TensorData::F64(logits.to_vec()),
        )
        .unwrap();
        t.insert(
            "layers.0.router_topk_ids",
            vec![1, 2, 2],
            TensorData::I64(ids.to_vec()),
        )
        .unwrap();
        t
    }

    #[test]
    fn ids_are_exact_unless_the_reference_itself_is_a_near_tie() {
        let policy = TolerancePolicy::new(Tier::F64);
        let logits = [3.0, 1.0, 0.0, -1.0, 0.0, 2.0, 1.0, 1.0 + 1e-12];
        let reference = trace([0, 1, 1, 3], logits);
        let status = |test: &Trace| {
            let c = compare_traces(&reference, test, None, &policy);
            c.get("layers.0.router_topk_ids").unwrap().status
        };
        assert_eq!(status(&trace([0, 1, 1, 3], logits)), Status::Pass);
        // Expert 2 instead of 3: the reference's logits tie them within 1e-12.
        assert_eq!(status(&trace([0, 1, 1, 2], logits)), Status::Pass);
        // Expert 0 instead of 1 on token 0: 2.0 apart in the reference.
        assert_eq!(status(&trace([0, 0, 1, 3], logits)), Status::Fail);
        // The test's own logits making a tie excuse nothing.
        let mut tied = logits;
        tied[1] = 3.0;
        assert_eq!(status(&trace([1, 0, 1, 3], tied)), Status::Fail);
    }
}
