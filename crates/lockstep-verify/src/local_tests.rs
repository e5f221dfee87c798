//! Unit tests of the op-level judgement (local.rs).

use super::*;
use lockstep_trace::TensorData;

/// Deterministic pseudo-random values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f64> {
    crate::tests::values(seed, n, 2.0)
}

fn bf16(v: &[f64]) -> Vec<f64> {
    v.iter()
        .map(|&x| half::bf16::from_f64(x).to_f64())
        .collect()
}

fn trace(name: &str, shape: &[usize], v: Vec<f64>) -> Trace {
    let mut t = Trace::new();
    t.insert("tokens", vec![1, 1], TensorData::I64(vec![0]))
        .unwrap();
    t.insert(name, shape.to_vec(), TensorData::F64(v)).unwrap();
    t
}

const SHAPE: [usize; 2] = [32, 64];

#[test]
fn rounding_like_the_reference_passes_bf16() {
    let x = values(32 * 64, 1);
    let exact = trace("embed", &SHAPE, x.clone());
    let reference = trace("embed", &SHAPE, bf16(&x));
    let test = trace("embed", &SHAPE, bf16(&x));
    let l = judge_local(&test, Some(&reference), &exact, Tier::BF16);
    assert!(l.passed, "{}", l.verdict());
    assert_eq!(l.ops[0].status, OpStatus::Pass);
}

#[test]
fn a_row_scale_error_of_half_an_ulp_fails_on_bias_bf16() {
    // What an RMSNorm variance computed in bf16 does: every row scaled by the same small
    // factor, smaller than the rounding of each element.
    let x = values(32 * 64, 2);
    let exact = trace("embed", &SHAPE, x.clone());
    let reference = trace("embed", &SHAPE, bf16(&x));
    let scaled: Vec<f64> = x
        .chunks(64)
        .enumerate()
        .flat_map(|(r, row)| {
            let f = 1.0 + if r % 2 == 0 { 1.0 } else { -1.0 } * 2f64.powi(-9);
            row.iter().map(move |v| v * f).collect::<Vec<_>>()
        })
        .collect();
    let test = trace("embed", &SHAPE, bf16(&scaled));
    let l = judge_local(&test, Some(&reference), &exact, Tier::BF16);
    assert_eq!(
        l.first_divergence.as_deref(),
        Some("embed"),
        "{}",
        l.verdict()
    );
    assert!(l.ops[0].reasons.iter().any(|r| r.contains("row bias")));
}

#[test]
fn rounding_twice_fails_on_size_bf16() {
    // Rounding to a coarser grid (7 bits) is an error twice the size of bf16's rounding.
    let x = values(32 * 64, 3);
    let exact = trace("embed", &SHAPE, x.clone());
    let reference = trace("embed", &SHAPE, bf16(&x));
    let coarse: Vec<f64> = x
        .iter()
        .map(|&v| {
            let e = 2f64.powi(v.abs().log2().floor() as i32 - 6);
            (v / e).round() * e
        })
        .collect();
    let test = trace("embed", &SHAPE, coarse);
    let l = judge_local(&test, Some(&reference), &exact, Tier::BF16);
    assert_eq!(l.ops[0].status, OpStatus::Fail, "{}", l.verdict());
}

#[test]
fn nan_never_passes_even_where_the_reference_is_nan() {
    let mut x = values(32 * 64, 4);
    let exact = trace("embed", &SHAPE, x.clone());
    x[5] = f64::NAN;
    let both = trace("embed", &SHAPE, x.clone());
    let l = judge_local(&both, Some(&both), &exact, Tier::F32);
    assert_eq!(l.ops[0].status, OpStatus::NonFinite);
    assert!(!l.passed);
}

#[test]
fn f64_tier_judges_against_the_exact_op_alone() {
    let x = values(32 * 64, 5);
    let exact = trace("embed", &SHAPE, x.clone());
    let close: Vec<f64> = x.iter().map(|v| v * (1.0 + 1e-13)).collect();
    let l = judge_local(&trace("embed", &SHAPE, close), None, &exact, Tier::F64);
    assert!(l.passed, "{}", l.verdict());
    let off: Vec<f64> = x.iter().map(|v| v + 1e-8).collect();
    let l = judge_local(&trace("embed", &SHAPE, off), None, &exact, Tier::F64);
    assert_eq!(l.ops[0].status, OpStatus::Fail);
}

#[test]
fn a_missing_op_fails_and_nothing_judged_does_not_pass() {
    let x = values(32 * 64, 6);
    let exact = trace("embed", &SHAPE, x.clone());
    let mut test = Trace::new();
    test.insert("tokens", vec![1, 1], TensorData::I64(vec![0]))
        .unwrap();
    let l = judge_local(&test, None, &exact, Tier::F64);
    assert_eq!(l.ops[0].status, OpStatus::Missing);
    let empty = Trace::new();
    let l = judge_local(&test, None, &empty, Tier::F64);
    assert!(!l.passed, "no op judged must not pass");
    let p = local_phase("op-level [f64]", &[]);
    assert_eq!(p.status, crate::report::PhaseStatus::Fail);
}
