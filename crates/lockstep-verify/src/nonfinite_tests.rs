//! Tests of non-finite values: never equal, never a wider tolerance, located per side.

use lockstep_trace::Trace;

use crate::stats::{diff_stats, logit_stats};
use crate::tests::*;
use crate::*;

/// Sets every element of column `col` of a `[B, T, ·]` tensor to `v` (a NaN weight row of
/// down_proj makes exactly one hidden column NaN at every position).
fn set_column(t: &mut Trace, name: &str, col: usize, v: f64) {
    let shape = t.get(name).unwrap().shape.clone();
    let cols = *shape.last().unwrap();
    let n: usize = shape.iter().product();
    for i in (col..n).step_by(cols) {
        set(t, name, i, v);
    }
}

/// A NaN entering at `layers.1.mlp_out` on both sides and flowing on to everything after it.
fn nan_from_layer1_mlp_out(t: &mut Trace) {
    let mut names: Vec<String> = t.names().into_iter().map(str::to_string).collect();
    lockstep_trace::sort_forward(&mut names);
    let from = names.iter().position(|n| n == "layers.1.mlp_out").unwrap();
    set_column(t, "layers.1.mlp_out", 5, f64::NAN);
    for n in &names[from + 1..] {
        if n != "tokens" {
            set(t, n, 0, f64::NAN);
        }
    }
}

#[test]
fn nan_on_both_sides_is_never_equal_and_names_where_it_enters() {
    let mut r = f64_trace();
    nan_from_layer1_mlp_out(&mut r);
    let t = r.clone();
    let cmp = compare(&r, &t, None);
    assert!(!cmp.passed);
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.1.mlp_out"));
    let c = cmp.get("layers.1.mlp_out").unwrap();
    assert_eq!(c.status, Status::NonFinite);
    assert_eq!(
        c.nonfinite,
        Some(nonfinite::NonFiniteCounts {
            test: T,
            reference: T,
            oracle: 0
        })
    );
    // Everything the NaN reaches fails too, logits included.
    for n in ["layers.1.out", "layers.2.attn_probs", "logits"] {
        assert_eq!(cmp.get(n).unwrap().status, Status::NonFinite, "{n}");
    }
    // Earlier tensors still pass.
    assert_eq!(cmp.get("layers.1.mlp_act").unwrap().status, Status::Pass);
    let l = cmp.get("logits").unwrap().logits.clone().unwrap();
    assert_eq!(l.top1_agreement, (T - 1) as f64 / T as f64);
    assert_eq!(l.first_top1_mismatch, Some(0));
    // Where it first appears, per side: column 5 of token 0.
    for side in [&cmp.first_nonfinite.reference, &cmp.first_nonfinite.test] {
        let s = side.as_ref().unwrap();
        assert_eq!(s.tensor, "layers.1.mlp_out");
        assert_eq!(s.layer, Some(1));
        assert_eq!(s.index, vec![0, 0, 5]);
        assert_eq!(s.token_position, Some(0));
        assert_eq!(s.value, "NaN");
        assert_eq!(s.count, T);
    }
    assert_eq!(cmp.first_nonfinite.oracle, None);
    // The verdict blames non-finite values at the op they enter, not the tap's usual suspects.
    let Verdict::Bug { tensor, cause } = cmp.verdict() else {
        panic!("{:?}", cmp.verdict())
    };
    assert_eq!(tensor, "layers.1.mlp_out");
    assert!(
        cause.contains("non-finite") && cause.contains("down_proj"),
        "{cause}"
    );
    assert!(cause.contains("the reference and the test"), "{cause}");
    // Restricted to the logits (the single-token phase), the cause points upstream.
    let logits = cmp.get("logits").unwrap();
    let cause = cmp.cause_of(logits);
    assert!(cause.contains("carried from `layers.1.mlp_out`"), "{cause}");
    assert!(!cause.contains("lm_head"), "{cause}");

    // Reports: the markdown verdict and the JSON say where, per side.
    let inputs = [NamedComparison::new("nan", cmp)];
    let md = report::markdown(&inputs);
    assert!(
        md.contains("Non-finite values (NaN/inf) first appear"),
        "{md}"
    );
    assert!(
        md.contains("reference: NaN at `layers.1.mlp_out`[0, 0, 5]"),
        "{md}"
    );
    assert!(
        md.contains("test: NaN at `layers.1.mlp_out`[0, 0, 5]"),
        "{md}"
    );
    assert!(!md.contains("causal mask, scaling"), "{md}");
    let js: serde_json::Value = serde_json::from_str(&report::json(&inputs)).unwrap();
    assert_eq!(js["passed"], false);
    assert_eq!(js["first_divergence"], "layers.1.mlp_out");
    let first = &js["inputs"][0]["first_nonfinite_reference"];
    assert_eq!(first["tensor"], "layers.1.mlp_out");
    assert_eq!(first["index"], serde_json::json!([0, 0, 5]));
    assert_eq!(
        js["inputs"][0]["first_nonfinite_test"]["tensor"],
        "layers.1.mlp_out"
    );
    assert_eq!(js["first_nonfinite"]["test"]["layer"], 1);
}

#[test]
fn identical_infinities_are_not_equal() {
    let mut r = f64_trace();
    set(&mut r, "layers.0.resid_attn", 2, f64::INFINITY);
    let cmp = compare(&r, &r.clone(), None);
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.0.resid_attn"));
    let c = cmp.get("layers.0.resid_attn").unwrap();
    assert_eq!(c.status, Status::NonFinite);
    let s = c.stats.as_ref().unwrap();
    assert_eq!((s.max_abs, s.max_abs_index), (f64::INFINITY, 2));
    assert_eq!((s.actual_nonfinite, s.expected_nonfinite), (1, 1));
    assert_eq!(cmp.first_nonfinite.reference.as_ref().unwrap().value, "inf");
    let s = diff_stats(&[f64::NAN, 1.0], &[f64::NAN, 1.0], &[2]);
    assert_eq!(s.max_abs, f64::INFINITY);
    assert!(s.nmse.is_infinite());
}

#[test]
fn nan_in_the_reference_alone_fails() {
    let r0 = f64_trace();
    let mut r = r0.clone();
    set(&mut r, "layers.0.q", 1, f64::NAN);
    let cmp = compare(&r, &r0, None);
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.0.q"));
    let c = cmp.get("layers.0.q").unwrap();
    assert_eq!(c.status, Status::NonFinite);
    assert_eq!(c.nonfinite.unwrap().reference, 1);
    assert_eq!(c.nonfinite.unwrap().test, 0);
    assert!(cmp.first_nonfinite.test.is_none());
    let s = cmp.first_nonfinite.reference.as_ref().unwrap();
    // q is [B, heads, T, D]: flat 1 is head 0, token 0, dim 1.
    assert_eq!(
        (s.index.clone(), s.token_position),
        (vec![0, 0, 0, 1], Some(0))
    );
    let Verdict::Bug { cause, .. } = cmp.verdict() else {
        panic!()
    };
    assert!(cause.contains("in the reference"), "{cause}");
}

#[test]
fn nan_in_the_reference_or_oracle_never_widens_a_tolerance() {
    // f32 tier with an oracle: the reference's noise k·|ref − oracle| is the tolerance. A NaN in
    // the reference (or the oracle) must not make it infinite so that a wrong test passes.
    for nan_in in ["reference", "oracle"] {
        let (mut o, mut r, mut t) = noisy("f32", 1e-6, 1e-6, "f32");
        match nan_in {
            "reference" => set(&mut r, "layers.1.v", 0, f64::NAN),
            _ => set(&mut o, "layers.1.v", 0, f64::NAN),
        }
        // A gross error elsewhere in the same tensor.
        let x = get(&t, "layers.1.v", 3);
        set(&mut t, "layers.1.v", 3, x + 0.5);
        let cmp = compare(&r, &t, Some(&o));
        let c = cmp.get("layers.1.v").unwrap();
        assert_eq!(c.status, Status::NonFinite, "{nan_in}: {c:#?}");
        let counts = c.nonfinite.unwrap();
        assert_eq!(
            (counts.reference, counts.oracle),
            if nan_in == "reference" {
                (1, 0)
            } else {
                (0, 1)
            }
        );
        let tol = c.tolerance.as_ref().unwrap();
        assert!(tol.threshold.is_finite() && tol.threshold < 0.5, "{tol:?}");
        assert_eq!(cmp.first_divergence.as_deref(), Some("layers.1.v"));
        if nan_in == "oracle" {
            assert_eq!(
                cmp.first_nonfinite.oracle.as_ref().unwrap().tensor,
                "layers.1.v"
            );
        }
    }
    // bf16 tier: a NaN in the oracle fails the tensor instead of passing anything.
    let (mut o, r, t) = noisy("bf16", 0.05, 0.04, "bf16");
    set(&mut o, "layers.0.k", 0, f64::NAN);
    let cmp = compare(&r, &t, Some(&o));
    let c = cmp.get("layers.0.k").unwrap();
    assert_eq!(c.status, Status::NonFinite);
    assert!(c.tolerance.as_ref().unwrap().threshold.is_finite());
}

#[test]
fn non_finite_logits_never_agree() {
    let p = [f64::NAN; VOCAB];
    let s = logit_stats(&p, &p, VOCAB).unwrap();
    assert_eq!(s.top1_agreement, 0.0);
    assert_eq!(s.top5_agreement, 0.0);
    assert_eq!(s.kl_max, f64::INFINITY);
    assert_eq!(s.first_top1_mismatch, Some(0));
}

#[test]
fn the_nonfinite_sentence_names_the_weight_and_the_first_tensor() {
    use crate::nonfinite::{nonfinite_summary, NonFiniteWeight};
    let mut r = f64_trace();
    nan_from_layer1_mlp_out(&mut r);
    let cmp = compare(&r, &r.clone(), None);
    let w = NonFiniteWeight {
        name: "model.layers.1.mlp.down_proj.weight".into(),
        nan: 1,
        inf: 0,
        first_index: vec![5, 7],
    };
    assert_eq!(w.layer(), Some(1));
    assert_eq!(
        w.describe(),
        "`model.layers.1.mlp.down_proj.weight`: 1 NaN, first at [5, 7]"
    );
    assert_eq!(
        nonfinite_summary(std::slice::from_ref(&w), &[&cmp]).as_deref(),
        Some(
            "NaN in model.layers.1.mlp.down_proj.weight[5, 7] reaches layers.1.mlp_out on both sides"
        )
    );
    // A finite checkpoint whose run goes non-finite: the computation did it.
    let s = nonfinite_summary(&[], &[&cmp]).unwrap();
    assert!(s.starts_with("the checkpoint is finite"), "{s}");
    // Nothing non-finite anywhere: no sentence.
    let clean = compare(&f64_trace(), &f64_trace(), None);
    assert_eq!(nonfinite_summary(&[], &[&clean]), None);
    // Only the test goes non-finite.
    let mut t = f64_trace();
    set(&mut t, "layers.2.mlp_act", 0, f64::NAN);
    let c = compare(&f64_trace(), &t, None);
    let s = nonfinite_summary(&[], &[&c]).unwrap();
    assert!(s.contains("layers.2.mlp_act in the test only"), "{s}");
}
