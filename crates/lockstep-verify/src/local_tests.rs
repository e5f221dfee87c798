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

/// The largest power of two at most `x` (positive, normal), found by exact doubling and halving.
fn power_of_two_below(x: f64) -> i32 {
    let mut e = x.log2().floor() as i32;
    while 2f64.powi(e) > x {
        e -= 1;
    }
    while 2f64.powi(e + 1) <= x {
        e += 1;
    }
    e
}

#[test]
fn ulp_at_is_the_power_of_two_below_the_scale() {
    let mut xs: Vec<f64> = values(2000, 9)
        .iter()
        .map(|v| v.abs() * 1e3 + 1e-300)
        .collect();
    for e in [-1000, -60, -1, 0, 1, 7, 40, 1000] {
        let p = 2f64.powi(e);
        // A power of two, and the doubles just below and above it: `log2` rounds the one below
        // up to `e` for large enough `e`.
        xs.extend([
            p,
            f64::from_bits(p.to_bits() - 1),
            f64::from_bits(p.to_bits() + 1),
        ]);
    }
    for x in xs {
        for p in [8, 24, 53] {
            let want = 2f64.powi(power_of_two_below(x)) * 2f64.powi(1 - p);
            assert_eq!(ulp_at(x, p), want, "x {x:e}, p {p}");
        }
    }
    assert_eq!(ulp_at(10.0 - 1e-15, 8), 2f64.powi(3 - 7));
    // Below the normal range the ulp is a subnormal power of two.
    assert_eq!(ulp_at(f64::MIN_POSITIVE, 53), f64::from_bits(1));
    assert_eq!(ulp_at(f64::INFINITY, 8), f64::INFINITY);
}

#[test]
fn judged_from_disk_a_layer_at_a_time_as_in_memory() {
    // Three parts (embed, two layers, logits), the test stored in bf16 as lockstep's bf16 traces
    // are, one op rounded twice (fails), one missing from the test.
    let names: [(&str, [usize; 2]); 5] = [
        ("embed", [8, 64]),
        ("layers.0.input_norm", [8, 64]),
        ("layers.0.o_proj", [8, 64]),
        ("layers.1.input_norm", [8, 64]),
        ("logits", [8, 96]),
    ];
    let (mut exact, mut reference, mut test) = (Trace::new(), Trace::new(), Trace::new());
    for t in [&mut exact, &mut reference, &mut test] {
        t.insert("tokens", vec![1, 8], TensorData::I64(vec![0; 8]))
            .unwrap();
    }
    for (i, &(name, shape)) in names.iter().enumerate() {
        let x = values(shape[0] * shape[1], 20 + i as u64);
        let r = bf16(&x);
        let t: Vec<f64> = match name {
            // Rounded to f32 first, then to bf16: double rounding.
            "layers.0.o_proj" => bf16(
                &x.iter()
                    .map(|&v| v as f32 as f64 * (1.0 + 2f64.powi(-9)))
                    .collect::<Vec<_>>(),
            ),
            _ => r.clone(),
        };
        exact
            .insert(name, shape.to_vec(), TensorData::F64(x))
            .unwrap();
        reference
            .insert(name, shape.to_vec(), TensorData::F64(r))
            .unwrap();
        if name != "layers.1.input_norm" {
            let stored = t.iter().map(|&v| half::bf16::from_f64(v)).collect();
            test.insert(name, shape.to_vec(), TensorData::BF16(stored))
                .unwrap();
        }
    }
    let in_memory = judge_local(&test, Some(&reference), &exact, Tier::BF16);
    let dir = tempfile::tempdir().unwrap();
    let open = |t: &Trace, file: &str| {
        let p = dir.path().join(file);
        t.write(&p).unwrap();
        TraceStore::open(&p).unwrap()
    };
    let (e, r, t) = (
        open(&exact, "e.safetensors"),
        open(&reference, "r.safetensors"),
        open(&test, "t.safetensors"),
    );
    let stored = judge_local_stored(&t, Some(&r), &e, Tier::BF16).unwrap();
    let summary = |l: &LocalComparison| -> Vec<(String, OpStatus, f64, Option<LocalStats>)> {
        l.ops
            .iter()
            .map(|o| (o.name.clone(), o.status, o.ratio, o.test.clone()))
            .collect()
    };
    assert_eq!(summary(&stored), summary(&in_memory));
    assert_eq!(stored.first_divergence.as_deref(), Some("layers.0.o_proj"));
    assert_eq!(
        stored.get("layers.1.input_norm").unwrap().status,
        OpStatus::Missing
    );
    assert_eq!(stored.get("logits").unwrap().status, OpStatus::Pass);
    assert!(!stored.passed);
    // A side that cannot be read is named.
    std::fs::write(dir.path().join("t.safetensors"), b"short").unwrap();
    assert!(TraceStore::open(&dir.path().join("t.safetensors")).is_err());
    std::fs::remove_file(dir.path().join("r.safetensors")).unwrap();
    let err = judge_local_stored(&t, Some(&r), &e, Tier::BF16).unwrap_err();
    assert_eq!(err.0, LocalSide::Test);
}
