//! The oracle-relative tiers (f32 with an oracle, bf16) on synthetic noisy traces.

use lockstep_trace::{TensorData, Trace};

use crate::tests::*;
use crate::*;

#[test]
fn bf16_rule_is_oracle_relative() {
    // Test slightly closer to the oracle than the reference: pass (drift within noise).
    let (o, r, t) = noisy("bf16", 0.05, 0.04, "bf16");
    let cmp = compare(&r, &t, Some(&o));
    assert_eq!(cmp.tier, Tier::BF16);
    assert!(cmp.passed, "{:#?}", cmp.first_failure());
    assert_eq!(cmp.verdict(), Verdict::DriftWithinNoise);
    let l = cmp.get("logits").unwrap();
    let tol = l.tolerance.as_ref().unwrap();
    assert_eq!(tol.against, Against::Oracle);
    assert!(tol.min_top1_agreement.is_some());
    assert!(l.ref_vs_oracle_logits.is_some() && l.test_vs_oracle_logits.is_some());
    // Far off the oracle: fail at the first tensor.
    let (o, r, t) = noisy("bf16", 0.05, 0.5, "bf16");
    let cmp = compare(&r, &t, Some(&o));
    assert!(!cmp.passed);
    assert_eq!(cmp.first_divergence.as_deref(), Some("embed"));
    // A reference that equals the oracle exactly leaves the bf16 half-ulp floor.
    let (o, _, _) = noisy("bf16", 0.0, 0.0, "bf16");
    let mut r = o.clone();
    r.metadata.insert("dtype".into(), "bf16".into());
    let mut t = r.clone();
    let e = get(&r, "embed", 0);
    set(&mut t, "embed", 0, e + 1e-4);
    let cmp = compare(&r, &t, Some(&o));
    assert_eq!(cmp.get("embed").unwrap().status, Status::Pass);
    set(&mut t, "embed", 0, e + 0.1);
    let cmp = compare(&r, &t, Some(&o));
    assert_eq!(cmp.first_divergence.as_deref(), Some("embed"));
}

#[test]
fn bf16_logits_need_top1_agreement_with_the_oracle() {
    let (o, r, t) = noisy("bf16", 0.05, 0.0, "bf16");
    // Logits with a clear winner (index 0 at 1.0), a runner-up (index 1 at 0.9), the rest ≤ 0.
    let oracle_logits: Vec<f64> = (0..B * T * VOCAB)
        .map(|i| match i % VOCAB {
            0 => 1.0,
            1 => 0.9,
            j => -(j as f64) / VOCAB as f64,
        })
        .collect();
    let set_logits = |tr: &Trace, f: &dyn Fn(usize, f64) -> f64| {
        let mut tr = tr.clone();
        let vals: Vec<f64> = oracle_logits
            .iter()
            .enumerate()
            .map(|(i, &x)| f(i, x))
            .collect();
        tr.insert("logits", vec![B, T, VOCAB], TensorData::F64(vals))
            .unwrap();
        tr
    };
    let o = set_logits(&o, &|_, x| x);
    // The reference: 0.1 of noise on the tail, argmax kept everywhere.
    let r = set_logits(&r, &|i, x| if i % VOCAB >= 2 { x + 0.1 } else { x });
    // Ours: within 2 × 0.1 of the oracle everywhere, but the argmax flipped at positions 1
    // and 2 of the four.
    let flip = |i: usize, x: f64| match (i / VOCAB, i % VOCAB) {
        (1 | 2, 0) => x - 0.06,
        (1 | 2, 1) => x + 0.06,
        _ => x,
    };
    let t_bad = set_logits(&t, &flip);
    let cmp = compare(&r, &t_bad, Some(&o));
    let l = cmp.get("logits").unwrap();
    let tol = l.tolerance.as_ref().unwrap();
    assert!(tol.measured <= tol.threshold, "{tol:?}");
    // Four positions: the slack is one position (0.25), more than 0.02.
    assert_eq!(tol.min_top1_agreement, Some(0.75));
    assert_eq!(
        l.test_vs_oracle_logits.as_ref().unwrap().top1_agreement,
        0.5
    );
    assert_eq!(l.status, Status::Fail);
    assert!(l.note.as_ref().unwrap().contains("top-1"));
    assert_eq!(cmp.first_divergence.as_deref(), Some("logits"));
    // One parting more than the reference's (none) is the statistic's resolution: pass.
    let one = |i: usize, x: f64| if i / VOCAB == 1 { x } else { flip(i, x) };
    let cmp = compare(&r, &set_logits(&t, &one), Some(&o));
    let l = cmp.get("logits").unwrap();
    assert_eq!(
        l.test_vs_oracle_logits.as_ref().unwrap().top1_agreement,
        0.75
    );
    assert_eq!(l.status, Status::Pass, "{:?}", l.note);
    // Same distance without the flip: pass.
    let t_ok = set_logits(&t, &|i, x| if i % VOCAB >= 2 { x - 0.06 } else { x });
    let cmp = compare(&r, &t_ok, Some(&o));
    assert_eq!(cmp.get("logits").unwrap().status, Status::Pass);
}

#[test]
fn f32_rule_uses_the_reference_noise_when_an_oracle_is_given() {
    // Reference 1e-5 off the oracle: ours may be up to 3× that (or the f32 floor).
    // Ours equals the oracle: |ours − ref| = |ref − oracle| ≤ 3 × that → pass.
    let (o, r, t) = noisy("f32", 1e-5, 0.0, "f32");
    let cmp = compare(&r, &t, Some(&o));
    assert!(cmp.passed, "{:#?}", cmp.first_failure());
    let c = cmp.get("layers.1.q").unwrap();
    let tol = c.tolerance.as_ref().unwrap();
    let noise = c.ref_vs_oracle.as_ref().unwrap().max_abs;
    let floor = 64.0 * f32::EPSILON as f64 * c.stats.as_ref().unwrap().expected_magnitude.max(1.0);
    assert_eq!(tol.threshold, (3.0 * noise).max(floor));
    // Logits: max(1e-4, 3 × noise).
    let lt = cmp
        .get("logits")
        .unwrap()
        .tolerance
        .as_ref()
        .unwrap()
        .threshold;
    assert!(lt >= 1e-4);
    // 1e-3 off at one element: fail there.
    let mut t3 = t.clone();
    set(&mut t3, "layers.1.q", 0, get(&r, "layers.1.q", 0) + 1e-3);
    let cmp = compare(&r, &t3, Some(&o));
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.1.q"));
    assert!(cmp
        .verdict()
        .to_string()
        .contains("first divergence at layers.1.q"));
    // Without an oracle: 2e-4 · max(1, max|ref|).
    let cmp = compare(&r, &t3, None);
    let c = cmp.get("layers.1.q").unwrap();
    let mag = c.stats.as_ref().unwrap().expected_magnitude.max(1.0);
    assert!((c.tolerance.as_ref().unwrap().threshold - 2e-4 * mag).abs() < 1e-15);
    assert_eq!(c.status, Status::Fail);
    assert_eq!(
        cmp.get("logits")
            .unwrap()
            .tolerance
            .as_ref()
            .unwrap()
            .threshold,
        1e-4
    );
}

#[test]
fn f32_rule_judges_ours_against_the_oracle_when_the_reference_is_off_the_other_way() {
    // The reference 1e-2 above the oracle at one element: the bound is 3 × 1e-2.
    let (o, mut r, t) = noisy("f32", 1e-5, 0.0, "f32");
    let at = |t: &Trace| get(t, "layers.1.q", 0);
    set(&mut r, "layers.1.q", 0, at(&o) + 1e-2);
    // Ours 2.5e-2 below it: 3.5e-2 from the reference, but within the bound of the exact value.
    let mut t1 = t.clone();
    set(&mut t1, "layers.1.q", 0, at(&o) - 2.5e-2);
    let cmp = compare(&r, &t1, Some(&o));
    let c = cmp.get("layers.1.q").unwrap();
    let tol = c.tolerance.as_ref().unwrap();
    assert_eq!(c.status, Status::Pass, "{tol:?}");
    assert_eq!(tol.against, Against::Oracle);
    assert!((tol.threshold - 3e-2).abs() < 1e-9, "{tol:?}");
    assert!((tol.measured - 2.5e-2).abs() < 1e-9, "{tol:?}");
    assert!(
        tol.explanation.contains("|ours−ref|"),
        "{}",
        tol.explanation
    );
    // Ours 3.5e-2 below the oracle: over the bound from both; judged (and failed) on |ours − ref|.
    let mut t2 = t.clone();
    set(&mut t2, "layers.1.q", 0, at(&o) - 3.5e-2);
    let cmp = compare(&r, &t2, Some(&o));
    let c = cmp.get("layers.1.q").unwrap();
    let tol = c.tolerance.as_ref().unwrap();
    assert_eq!(c.status, Status::Fail);
    assert_eq!(tol.against, Against::Reference);
    assert!((tol.measured - 4.5e-2).abs() < 1e-9, "{tol:?}");
    assert_eq!(cmp.first_divergence.as_deref(), Some("layers.1.q"));
}

#[test]
fn a_tensor_the_oracle_lacks_is_unjudged_in_bf16_and_falls_back_in_f32() {
    let drop = |o: &Trace| {
        let mut p = Trace::new();
        for n in o.names() {
            if n != "layers.0.attn_probs" {
                let x = o.get(n).unwrap();
                p.insert(n, x.shape.clone(), x.data.clone()).unwrap();
            }
        }
        p.metadata = o.metadata.clone();
        p
    };
    let (o, r, t) = noisy("bf16", 0.05, 0.04, "bf16");
    let cmp = compare(&r, &t, Some(&drop(&o)));
    assert_eq!(
        cmp.get("layers.0.attn_probs").unwrap().status,
        Status::Unjudged
    );
    assert!(!cmp.passed);
    assert_eq!(cmp.first_divergence, None);
    assert!(matches!(cmp.verdict(), Verdict::Inconclusive { .. }));

    let (o, r, t) = noisy("f32", 1e-5, 0.0, "f32");
    let cmp = compare(&r, &t, Some(&drop(&o)));
    let c = cmp.get("layers.0.attn_probs").unwrap();
    assert_eq!(c.status, Status::Pass);
    assert!(c
        .tolerance
        .as_ref()
        .unwrap()
        .explanation
        .contains("no oracle"));
    assert!(cmp.passed);
}
