//! Unit tests of the endpoint judgement ([`crate::endpoint`]).

use crate::endpoint::*;
use crate::report::PhaseStatus;
use crate::tolerance::{bf16_half_ulp, Tier};

const VOCAB: usize = 6;

/// Logits of a 4-token prompt plus 2 generated tokens: row r predicts position r + 1.
fn logits(shift: f64) -> Vec<f64> {
    let mut v = vec![];
    for r in 0..5 {
        for t in 0..VOCAB {
            // Token (r % VOCAB) clearly first, token (r + 1) % VOCAB second.
            let x = if t == r % VOCAB {
                3.0
            } else if t == (r + 1) % VOCAB {
                1.0
            } else {
                -(t as f64) * 0.25
            };
            v.push(x + if t == 0 { shift } else { 0.0 });
        }
    }
    v
}

fn rows(v: &[f64]) -> LogitRows<'_> {
    LogitRows {
        data: v,
        vocab: VOCAB,
    }
}

/// What a faithful server returns for the two generated steps (positions 4 and 5), from `v`.
fn steps_from(v: &[f64], k: usize, echo: bool) -> Vec<ServerStep> {
    let r = rows(v);
    let positions: Vec<usize> = if echo { (1..6).collect() } else { vec![4, 5] };
    positions
        .into_iter()
        .map(|p| {
            let lp = r.logprobs(p).unwrap();
            let mut idx: Vec<usize> = (0..VOCAB).collect();
            idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
            let tok = idx[0] as u32;
            ServerStep {
                position: p,
                generated: p >= 4,
                token: Some(tok),
                logprob: Some(lp[tok as usize]),
                top: idx[..k].iter().map(|&i| (i as u32, lp[i])).collect(),
                unresolved: 0,
            }
        })
        .collect()
}

#[test]
fn a_faithful_server_passes_and_the_bound_comes_from_the_reference() {
    let reference = logits(0.0);
    let oracle = logits(2e-5); // the reference's own distance from the oracle
    let steps = steps_from(&reference, 3, false);
    let j = judge_endpoint("p", 4, &steps, Tier::F32, rows(&reference), rows(&oracle));
    assert!(j.passed(), "{j:?}");
    assert_eq!((j.generated, j.greedy_identical, j.echoed), (2, 2, 0));
    assert!(j.noise > 1e-6 && j.noise < 1e-4, "{}", j.noise);
    // max(1e-4, 3 × noise): the f32 floor here.
    assert_eq!(j.bound, 1e-4);
    assert!(j.max_dlogprob < 1e-12);
    assert_eq!((j.top1_agree, j.top1_of), (2, 2));
    // The server is the reference here: exactly as far from the oracle as PyTorch itself.
    assert!(j.from_oracle > 0.0 && j.from_oracle <= j.noise + 1e-15);
    let phases = endpoint_phases(Tier::F32, std::slice::from_ref(&j), "echo");
    assert!(
        phases[1]
            .summary
            .contains("as close to exact math as PyTorch"),
        "{}",
        phases[1].summary
    );
    // A noisier reference widens the bound (3 × its distance), never the server.
    let noisy = logits(1e-3);
    let j = judge_endpoint("p", 4, &steps, Tier::F32, rows(&reference), rows(&noisy));
    assert!((j.bound - 3.0 * j.noise).abs() < 1e-15 && j.bound > 1e-3);
}

#[test]
fn shifted_logprobs_fail_and_say_where_and_how_far() {
    let reference = logits(0.0);
    let oracle = logits(1e-6);
    let mut steps = steps_from(&reference, 3, false);
    steps[1].top[1].1 += 0.05;
    let j = judge_endpoint(
        "\"Hello\"",
        4,
        &steps,
        Tier::F32,
        rows(&reference),
        rows(&oracle),
    );
    assert!(!j.passed());
    assert!(j.greedy_failures.is_empty(), "greedy still identical");
    assert!((j.max_dlogprob - 0.05).abs() < 1e-9, "{}", j.max_dlogprob);
    assert_eq!(j.max_at, Some((5, steps[1].top[1].0)));
    let why = &j.failures[0];
    assert!(why.contains("\"Hello\": generated step 1"), "{why}");
    assert!(why.contains("5.00e-2 > bound 1.0e-4"), "{why}");
    let phases = endpoint_phases(Tier::F32, &[j], "not supported");
    assert_eq!(phases[0].status, PhaseStatus::Pass);
    assert_eq!(phases[1].status, PhaseStatus::Fail);
    assert!(
        phases[1].summary.contains("generated step 1"),
        "{}",
        phases[1].summary
    );
    // What the distance means: how many times PyTorch f32's own distance from the oracle.
    assert!(
        phases[1].summary.contains("× PyTorch f32's own distance"),
        "{}",
        phases[1].summary
    );
}

#[test]
fn a_reshaped_top_k_fails_the_kl_bound() {
    let reference = logits(0.0);
    let oracle = logits(0.0);
    let mut steps = steps_from(&reference, 3, false);
    // Within 1e-4 each would pass |Δ|; stretch by 0.02 in opposite directions instead.
    steps[0].top[1].1 += 0.02;
    steps[0].top[2].1 -= 0.02;
    let j = judge_endpoint("p", 4, &steps, Tier::F32, rows(&reference), rows(&oracle));
    assert!(j.max_kl > j.kl_bound, "{j:?}");
    assert_eq!(j.kl_bound, 0.5 * 1e-4 * 1e-4);
    assert!(
        j.failures.iter().any(|f| f.contains("top-k KL")),
        "{:?}",
        j.failures
    );
    // KL is zero for identical distributions and for a constant shift.
    assert!(topk_kl(&[-1.0, -2.0], &[-1.5, -2.5]).abs() < 1e-15);
}

#[test]
fn a_parting_is_a_near_tie_only_when_both_sides_see_one() {
    // Row 3 (position 4): tokens 3 and 4 nearly tied in the reference.
    let mut reference = logits(0.0);
    reference[3 * VOCAB + 4] = 3.0 - 2e-5;
    let oracle = reference.clone();
    let mut steps = steps_from(&reference, 3, false);
    assert_eq!(steps[0].token, Some(3));
    // The server picks 4, and sees the two tied as well.
    let lp = rows(&reference).logprobs(4).unwrap();
    steps[0].token = Some(4);
    steps[0].logprob = Some(lp[4]);
    steps[0].top = vec![(4, lp[4]), (3, lp[3]), (5, lp[5])];
    let j = judge_endpoint("p", 4, &steps, Tier::F32, rows(&reference), rows(&oracle));
    assert!(j.greedy_failures.is_empty(), "{:?}", j.greedy_failures);
    assert_eq!(j.partings.len(), 1);
    assert!(j.partings[0].near_tie);
    // The server's own log-probabilities are not tied (its 4 well above 3): a real difference.
    steps[0].logprob = Some(lp[4] + 0.5);
    steps[0].top[0].1 = lp[4] + 0.5;
    let j = judge_endpoint("p", 4, &steps, Tier::F32, rows(&reference), rows(&oracle));
    assert!(!j.partings[0].near_tie);
    assert!(
        j.greedy_failures[0].contains("generated step 0 (position 4)"),
        "{:?}",
        j.greedy_failures
    );
    // The reference's token not among the server's top-k: the server's gap is unknown, no tie.
    let lp = rows(&reference).logprobs(4).unwrap();
    steps[0].logprob = Some(lp[4]);
    steps[0].top = vec![(4, lp[4])];
    let j = judge_endpoint("p", 4, &steps, Tier::F32, rows(&reference), rows(&oracle));
    assert!(
        j.greedy_failures[0].contains("not among its top-k"),
        "{:?}",
        j.greedy_failures
    );
    let phases = endpoint_phases(Tier::F32, &[j], "echo");
    assert_eq!(phases[0].status, PhaseStatus::Fail);
}

#[test]
fn a_clear_argmax_difference_fails_greedy() {
    let reference = logits(0.0);
    let mut steps = steps_from(&reference, 2, false);
    let lp = rows(&reference).logprobs(5).unwrap();
    steps[1].token = Some(5);
    steps[1].logprob = Some(lp[5]);
    let j = judge_endpoint(
        "p",
        4,
        &steps,
        Tier::F64,
        rows(&reference),
        rows(&reference),
    );
    assert_eq!(j.bound, 1e-9);
    assert_eq!(j.partings.len(), 1);
    assert!(!j.greedy_failures.is_empty());
}

#[test]
fn echoed_prompt_positions_are_judged_and_counted() {
    let reference = logits(0.0);
    let steps = steps_from(&reference, 3, true);
    let j = judge_endpoint(
        "p",
        4,
        &steps,
        Tier::F64,
        rows(&reference),
        rows(&reference),
    );
    assert!(j.passed(), "{j:?}");
    assert_eq!((j.echoed, j.generated), (3, 2));
    let mut bad = steps.clone();
    bad[0].top[0].1 -= 1e-6;
    let j = judge_endpoint("p", 4, &bad, Tier::F64, rows(&reference), rows(&reference));
    assert!(
        j.failures[0].contains("prompt position 1"),
        "{:?}",
        j.failures
    );
}

#[test]
fn bf16_is_judged_against_the_oracle_with_its_top1_rule() {
    let oracle = logits(0.0);
    let reference = logits(0.01);
    let steps = steps_from(&oracle, 3, false);
    let j = judge_endpoint("p", 4, &steps, Tier::BF16, rows(&reference), rows(&oracle));
    assert!(j.passed(), "{j:?}");
    assert!(j.bound >= bf16_half_ulp(1.0));
    // A server as far from the oracle as 10 × the reference fails.
    let mut far = steps.clone();
    far[0].top[1].1 += 10.0 * j.noise + 0.2;
    let j2 = judge_endpoint("p", 4, &far, Tier::BF16, rows(&reference), rows(&oracle));
    assert!(!j2.failures.is_empty());
    assert_eq!(logprob_bound(Tier::BF16, f64::NAN, 0.0), 0.0);
}

#[test]
fn nothing_generated_or_a_position_beyond_the_reference_fails() {
    let reference = logits(0.0);
    let j = judge_endpoint("p", 4, &[], Tier::F32, rows(&reference), rows(&reference));
    assert!(j.greedy_failures[0].contains("generated nothing"));
    let mut steps = steps_from(&reference, 2, false);
    steps[1].position = 40;
    let j = judge_endpoint(
        "p",
        4,
        &steps,
        Tier::F32,
        rows(&reference),
        rows(&reference),
    );
    assert!(
        j.failures[0].contains("beyond the reference run"),
        "{:?}",
        j.failures
    );
    let phases = endpoint_phases(Tier::F32, &[], "n/a");
    assert!(phases.iter().all(|p| p.status == PhaseStatus::Fail));
}
