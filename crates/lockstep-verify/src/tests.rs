//! Unit tests on small synthetic traces (no Python, no model).

use lockstep_trace::{LayerTap, TapName, TensorData, Trace};

use crate::report::{self, NamedComparison};
use crate::stats::{diff_stats, logit_stats, unravel};
use crate::*;

pub(crate) const B: usize = 1;
pub(crate) const T: usize = 4;
pub(crate) const HID: usize = 8;
pub(crate) const HEADS: usize = 2;
pub(crate) const KV: usize = 1;
pub(crate) const D: usize = 4;
pub(crate) const INTER: usize = 16;
pub(crate) const VOCAB: usize = 32;
pub(crate) const LAYERS: usize = 3;

/// Deterministic pseudo-random values in [-scale, scale).
pub(crate) fn values(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub(crate) fn tap_shape(tap: LayerTap) -> Vec<usize> {
    match tap {
        LayerTap::Q | LayerTap::QNorm | LayerTap::QRope => vec![B, HEADS, T, D],
        LayerTap::K | LayerTap::KNorm | LayerTap::V | LayerTap::KRope => vec![B, KV, T, D],
        LayerTap::AttnProbs => vec![B, HEADS, T, T],
        LayerTap::AttnOut => vec![B, T, HEADS * D],
        LayerTap::MlpAct => vec![B, T, INTER],
        _ => vec![B, T, HID],
    }
}

/// The canonical tensors of a small model, with deterministic values, as f64.
pub(crate) fn base_tensors() -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let mut v = Vec::new();
    let mut seed = 1;
    let mut push = |name: String, shape: Vec<usize>, scale: f64| {
        let n = shape.iter().product();
        seed += 1;
        v.push((name, shape.clone(), values(seed, n, scale)));
    };
    push("embed".into(), vec![B, T, HID], 1.0);
    for i in 0..LAYERS {
        for tap in LayerTap::ALL {
            let scale = if tap == LayerTap::AttnProbs { 0.5 } else { 2.0 };
            push(TapName::Layer(i, tap).to_string(), tap_shape(tap), scale);
        }
    }
    push("final_norm".into(), vec![B, T, HID], 2.0);
    push("logits".into(), vec![B, T, VOCAB], 8.0);
    v
}

/// A trace of `tensors` stored as `dtype` ("f64" or "f32"), with tokens and metadata.
pub(crate) fn make_trace(
    tensors: &[(String, Vec<usize>, Vec<f64>)],
    dtype: &str,
    ids: &[i64],
) -> Trace {
    let mut t = Trace::new();
    t.insert("tokens", vec![B, ids.len()], TensorData::I64(ids.to_vec()))
        .unwrap();
    for (name, shape, vals) in tensors {
        let data = match dtype {
            "f64" => TensorData::F64(vals.clone()),
            _ => TensorData::F32(vals.iter().map(|&x| x as f32).collect()),
        };
        t.insert(name.clone(), shape.clone(), data).unwrap();
    }
    t.metadata.insert("dtype".into(), dtype.into());
    t.metadata.insert("producer".into(), "test".into());
    t
}

const IDS: [i64; T] = [9707, 11, 1879, 0];

pub(crate) fn f64_trace() -> Trace {
    make_trace(&base_tensors(), "f64", &IDS)
}

pub(crate) fn set(t: &mut Trace, name: &str, idx: usize, value: f64) {
    let x = t.get_mut(name).unwrap();
    match &mut x.data {
        TensorData::F64(v) => v[idx] = value,
        TensorData::F32(v) => v[idx] = value as f32,
        _ => panic!("not float"),
    }
}

pub(crate) fn get(t: &Trace, name: &str, idx: usize) -> f64 {
    t.get(name).unwrap().data.to_f64()[idx]
}

pub(crate) fn compare(r: &Trace, t: &Trace, o: Option<&Trace>) -> TraceComparison {
    let policy = TolerancePolicy::for_traces(r, t, o).unwrap();
    compare_traces(r, t, o, &policy)
}

#[test]
fn identical_traces_pass_with_no_divergence() {
    let r = f64_trace();
    let cmp = compare(&r, &r.clone(), None);
    assert_eq!(cmp.tier, Tier::F64);
    assert!(cmp.passed, "{:#?}", cmp.first_failure());
    assert_eq!(cmp.first_divergence, None);
    assert_eq!(cmp.verdict(), Verdict::Match);
    assert_eq!(cmp.tensors[0].name, "tokens");
    assert_eq!(cmp.tensors.len(), 1 + base_tensors().len());
    assert_eq!(cmp.num_tokens(), Some(T));
    let l = cmp.get("logits").unwrap().logits.as_ref().unwrap();
    assert_eq!(l.kl_max, 0.0);
    assert_eq!(l.top1_agreement, 1.0);
    assert_eq!(l.top5_agreement, 1.0);
    let js: serde_json::Value =
        serde_json::from_str(&report::json(&[NamedComparison::new("hello", cmp)])).unwrap();
    assert_eq!(js["first_divergence"], serde_json::Value::Null);
    assert_eq!(js["passed"], true);
    assert_eq!(js["tier"], "f64");
    assert_eq!(js["schema_version"], report::SCHEMA_VERSION);
    let keys: Vec<&str> = js.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "schema_version",
            "passed",
            "tier",
            "first_divergence",
            "first_nonfinite",
            "verdict",
            "inputs",
            "tensors"
        ]
    );
    assert_eq!(js["tensors"][0]["input"], "hello");
    assert!(js["tensors"][0]["likely_cause"].is_string());
}

#[test]
fn one_changed_element_names_exactly_that_tensor() {
    let r = f64_trace();
    let mut t = r.clone();
    let idx = 5;
    let old = get(&r, "layers.0.k", idx);
    set(&mut t, "layers.0.k", idx, old + 1e-7);
    let cmp = compare(&r, &t, None);
    assert!(!cmp.passed);
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.0.k"));
    let failing: Vec<&str> = cmp
        .tensors
        .iter()
        .filter(|x| x.status.is_failure())
        .map(|x| x.name.as_str())
        .collect();
    assert_eq!(failing, vec!["layers.0.k"]);
    let k = cmp.get("layers.0.k").unwrap();
    assert_eq!(k.status, Status::Fail);
    let s = k.stats.as_ref().unwrap();
    assert_eq!(s.max_abs_index, idx);
    assert_eq!(s.max_abs_position, unravel(idx, &[B, KV, T, D]));
    assert_eq!(s.max_abs_position, vec![0, 0, 1, 1]);
    assert_eq!(s.expected_at_max, old);
    assert_eq!(s.actual_at_max, old + 1e-7);
    assert!((s.max_abs - 1e-7).abs() < 1e-15);
    let v = cmp.verdict();
    assert!(matches!(&v, Verdict::Bug { tensor, .. } if tensor == "layers.0.k"));
    assert!(v.to_string().contains("q/k/v bias"), "{v}");

    // A change below 1e-9 passes in the f64 tier.
    let mut t2 = r.clone();
    set(&mut t2, "layers.0.k", idx, old + 1e-11);
    assert!(compare(&r, &t2, None).passed);
}

#[test]
fn f64_tolerance_is_scale_aware() {
    let mut tensors = base_tensors();
    for (name, _, v) in &mut tensors {
        if name == "layers.1.out" {
            v[0] = 1000.0;
        }
    }
    let r = make_trace(&tensors, "f64", &IDS);
    let mut t = r.clone();
    set(&mut t, "layers.1.out", 1, get(&r, "layers.1.out", 1) + 5e-7);
    let cmp = compare(&r, &t, None);
    let c = cmp.get("layers.1.out").unwrap();
    assert_eq!(c.status, Status::Pass);
    assert!((c.tolerance.as_ref().unwrap().threshold - 1e-6).abs() < 1e-18);
    // Logits stay absolute: 1e-9 even though |logits| ≈ 8.
    let mut t = r.clone();
    set(&mut t, "logits", 0, get(&r, "logits", 0) + 5e-9);
    let cmp = compare(&r, &t, None);
    assert_eq!(cmp.first_divergence.as_deref(), Some("logits"));
    assert_eq!(
        cmp.get("logits")
            .unwrap()
            .tolerance
            .as_ref()
            .unwrap()
            .threshold,
        1e-9
    );
}

#[test]
fn shape_mismatch_and_missing_are_reported_not_crashed() {
    let r = f64_trace();
    let mut t = Trace::new();
    for name in r.names() {
        let x = r.get(name).unwrap();
        if name == "layers.1.v" {
            continue; // missing in test
        }
        if name == "layers.0.attn_out" {
            let n = x.data.len();
            t.insert(name, vec![B, n], x.data.clone()).unwrap();
        } else {
            t.insert(name, x.shape.clone(), x.data.clone()).unwrap();
        }
    }
    t.insert("extra", vec![1], TensorData::F64(vec![1.0]))
        .unwrap();
    t.metadata = r.metadata.clone();
    let cmp = compare(&r, &t, None);
    assert!(!cmp.passed);
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.0.attn_out"));
    let a = cmp.get("layers.0.attn_out").unwrap();
    assert_eq!(a.status, Status::ShapeMismatch);
    assert_eq!(a.ref_shape.as_deref(), Some(&[B, T, HEADS * D][..]));
    assert_eq!(a.test_shape.as_deref(), Some(&[B, T * HEADS * D][..]));
    let v = cmp.get("layers.1.v").unwrap();
    assert_eq!(v.status, Status::Missing);
    assert!(v.test_shape.is_none());
    let e = cmp.get("extra").unwrap();
    assert_eq!(e.status, Status::Missing);
    assert!(e.ref_shape.is_none());
    // Forward order: extra (non-canonical) last.
    assert_eq!(cmp.tensors.last().unwrap().name, "extra");
    let md = report::markdown(&[NamedComparison::new("x", cmp)]);
    assert!(md.contains("SHAPE MISMATCH"));
    assert!(md.contains("MISSING"));
}

#[test]
fn token_mismatch_is_the_first_divergence() {
    let r = f64_trace();
    let mut ids = IDS;
    ids[2] = 1880;
    let t = make_trace(&base_tensors(), "f64", &ids);
    let cmp = compare(&r, &t, None);
    assert!(!cmp.passed);
    assert_eq!(cmp.first_divergence.as_deref(), Some("tokens"));
    assert_eq!(cmp.tensors[0].status, Status::TokenMismatch);
    assert!(cmp.tensors[0].note.as_ref().unwrap().contains("position 2"));
    // Everything else still compared (and identical).
    assert_eq!(
        cmp.tensors.iter().filter(|x| x.status.is_failure()).count(),
        1
    );
    assert!(cmp
        .verdict()
        .to_string()
        .starts_with("bug: first divergence at tokens"));

    // Oracle tokens must match too.
    let r32 = make_trace(&base_tensors(), "f32", &IDS);
    let o = make_trace(&base_tensors(), "f64", &ids);
    let cmp = compare(&r32, &r32.clone(), Some(&o));
    assert_eq!(cmp.first_divergence.as_deref(), Some("tokens"));
}

#[test]
fn tier_selection() {
    let tensors = base_tensors();
    let f64t = make_trace(&tensors, "f64", &IDS);
    let f32t = make_trace(&tensors, "f32", &IDS);
    let mut bf = make_trace(&tensors, "f32", &IDS);
    bf.metadata.insert("dtype".into(), "bf16".into());

    let tier = |r: &Trace, t: &Trace, o: Option<&Trace>| TolerancePolicy::for_traces(r, t, o);
    assert_eq!(tier(&f64t, &f64t, None).unwrap().tier, Tier::F64);
    assert_eq!(tier(&f32t, &f32t, None).unwrap().tier, Tier::F32);
    assert_eq!(tier(&f32t, &f32t, Some(&f64t)).unwrap().tier, Tier::F32);
    assert_eq!(tier(&bf, &bf, Some(&f64t)).unwrap().tier, Tier::BF16);
    // A more precise test (bf16 weights, f32 activations) is judged in the reference's tier.
    let p = tier(&bf, &f32t, Some(&f64t)).unwrap();
    assert_eq!(p.tier, Tier::BF16);
    assert!(!p.notes.is_empty());
    assert_eq!(tier(&bf, &bf, None), Err(PolicyError::OracleRequired));
    assert!(matches!(
        tier(&f32t, &bf, Some(&f64t)),
        Err(PolicyError::TierMismatch {
            reference: Tier::F32,
            test: Tier::BF16
        })
    ));
    assert!(matches!(
        tier(&f32t, &f32t, Some(&f32t)),
        Err(PolicyError::OracleNotF64 { .. })
    ));
    let mut odd = f32t.clone();
    odd.metadata.insert("dtype".into(), "int8".into());
    assert!(matches!(
        tier(&odd, &f32t, None),
        Err(PolicyError::UnknownDtype { .. })
    ));
    // No metadata: inferred from the logits' storage, with a note.
    let mut bare = f32t.clone();
    bare.metadata.clear();
    let p = tier(&bare, &bare, None).unwrap();
    assert_eq!(p.tier, Tier::F32);
    assert!(p.notes.iter().any(|n| n.contains("inferred")));
    // Explicit override.
    let p = TolerancePolicy::for_traces_with_tier(&f64t, &f32t, None, Some(Tier::F32)).unwrap();
    assert_eq!(p.tier, Tier::F32);
    assert!(TolerancePolicy::for_traces_with_tier(&f32t, &f32t, None, Some(Tier::BF16)).is_err());
}

#[test]
fn kl_is_zero_for_identical_logits_and_positive_otherwise() {
    let p = values(7, 3 * VOCAB, 6.0);
    let s = logit_stats(&p, &p, VOCAB).unwrap();
    assert_eq!(s.positions, 3);
    assert_eq!(s.kl_mean, 0.0);
    assert_eq!(s.kl_max, 0.0);
    assert_eq!(s.top1_agreement, 1.0);
    assert_eq!(s.first_top1_mismatch, None);

    let mut q = p.clone();
    for x in &mut q[VOCAB..2 * VOCAB] {
        *x *= 0.5;
    }
    let s = logit_stats(&p, &q, VOCAB).unwrap();
    assert!(s.kl_mean > 0.0 && s.kl_max > 0.0);
    assert_eq!(s.kl_max_position, 1);
    // Scaling keeps the argmax; a swap of the top two moves it.
    assert_eq!(s.top1_agreement, 1.0);
    let mut q = p.clone();
    let row = &mut q[0..VOCAB];
    let top = (0..VOCAB)
        .max_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap())
        .unwrap();
    row[top] = -100.0;
    let s = logit_stats(&p, &q, VOCAB).unwrap();
    assert!((s.top1_agreement - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(s.first_top1_mismatch, Some(0));
    // One of five candidates lost at one of three positions.
    assert!((s.top5_agreement - (1.0 - 1.0 / 15.0)).abs() < 1e-12);
    // Huge logits stay finite (stable log-sum-exp).
    let big: Vec<f64> = p.iter().map(|x| x * 1e3).collect();
    let s = logit_stats(&big, &p, VOCAB).unwrap();
    assert!(s.kl_mean.is_finite() && s.kl_mean > 0.0);
}

#[test]
fn diff_stats_basics() {
    let a = [1.0, -2.0, 3.0, 0.0];
    let b = [1.0, -2.5, 3.0, 0.0];
    let s = diff_stats(&a, &b, &[2, 2]);
    assert_eq!(s.max_abs, 0.5);
    assert_eq!(s.max_abs_position, vec![0, 1]);
    assert_eq!(s.mean_abs, 0.125);
    assert_eq!(s.max_rel, 0.25);
    assert!((s.nmse - 0.25 / 14.0).abs() < 1e-15);
    assert!(s.cosine < 1.0 && s.cosine > 0.99);
    assert_eq!(s.expected_magnitude, 3.0);
    let s = diff_stats(&a, &a, &[4]);
    assert_eq!((s.max_abs, s.nmse, s.cosine), (0.0, 0.0, 1.0));
    let z = [0.0; 3];
    assert_eq!(diff_stats(&z, &z, &[3]).cosine, 1.0);
}

#[test]
fn non_finite_test_values_fail() {
    let r = f64_trace();
    let mut t = r.clone();
    set(&mut t, "layers.2.mlp_act", 3, f64::NAN);
    set(&mut t, "logits", 0, f64::INFINITY);
    let cmp = compare(&r, &t, None);
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.2.mlp_act"));
    assert_eq!(
        cmp.get("layers.2.mlp_act").unwrap().status,
        Status::NonFinite
    );
    assert_eq!(cmp.get("logits").unwrap().status, Status::NonFinite);
    let s = cmp.get("logits").unwrap().stats.clone().unwrap();
    assert_eq!(s.max_abs, f64::INFINITY);
    assert_eq!(s.actual_nonfinite, 1);
    // JSON still serializes (non-finite numbers become null).
    let js = report::json(&[NamedComparison::new("nan", cmp)]);
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["first_divergence"], "layers.2.mlp_act");
}

/// Builds (oracle, reference, test) for the oracle-relative tiers: the reference is the oracle
/// plus noise of amplitude `ref_noise`, the test the oracle plus noise of amplitude `test_noise`.
pub(crate) fn noisy(
    ref_dtype: &str,
    ref_noise: f64,
    test_noise: f64,
    test_dtype: &str,
) -> (Trace, Trace, Trace) {
    let base = base_tensors();
    let perturb = |seed: u64, amp: f64| -> Vec<(String, Vec<usize>, Vec<f64>)> {
        base.iter()
            .enumerate()
            .map(|(i, (n, s, v))| {
                let e = values(seed + i as u64 * 31, v.len(), amp);
                (
                    n.clone(),
                    s.clone(),
                    v.iter().zip(e).map(|(x, d)| x + d).collect(),
                )
            })
            .collect()
    };
    let oracle = make_trace(&base, "f64", &IDS);
    let mut r = make_trace(&perturb(1000, ref_noise), "f64", &IDS);
    r.metadata.insert("dtype".into(), ref_dtype.into());
    let mut t = make_trace(&perturb(5000, test_noise), "f64", &IDS);
    t.metadata.insert("dtype".into(), test_dtype.into());
    (oracle, r, t)
}

/// Checks that tags are balanced and properly nested (an XML-ish well-formedness test).
pub(crate) fn balanced_tags(s: &str) -> Result<usize, Box<dyn std::error::Error>> {
    let mut stack: Vec<String> = Vec::new();
    let mut count = 0;
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        let j = rest[i..].find('>').ok_or("unterminated tag")? + i;
        let tag = &rest[i + 1..j];
        if tag.contains('<') {
            return Err(format!("'<' inside tag: {tag}").into());
        }
        count += 1;
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().ok_or_else(|| format!("unopened </{name}>"))?;
            if top != name.trim() {
                return Err(format!("<{top}> closed by </{name}>").into());
            }
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().ok_or("empty tag")?;
            stack.push(name.to_string());
        }
        rest = &rest[j + 1..];
    }
    if stack.is_empty() {
        Ok(count)
    } else {
        Err(format!("unclosed: {stack:?}").into())
    }
}
