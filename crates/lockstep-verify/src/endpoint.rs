//! Black-box judgement of a serving endpoint (`lockstep verify --endpoint`): only what an
//! OpenAI-compatible server returns, its chosen tokens and their top-k log-probabilities, judged
//! against the reference (PyTorch at the declared dtype) and the pure-f64 oracle, both run on the
//! server's own sequence (prompt plus what it generated), so every step is judged on the very
//! context the server saw.
//!
//! Per step (one position whose next token the server chose or, with `echo`, one prompt token):
//!
//! - **greedy**: the server's token is the reference's argmax, or the two are a near-tie seen by
//!   *both* sides (the rule of [`crate::near_tie`]): within the tier's log-probability bound in the
//!   reference's own log-probabilities and in the server's (which must list the reference's token
//!   among its top-k for its gap to be known);
//! - **log-probabilities**: the largest `|Δ logprob|` over the returned entries (top-k and the
//!   chosen token) against the tier's bound, which comes from the reference's own distance from
//!   the oracle ([`logprob_bound`], never from the server); the KL divergence over the returned
//!   top-k (both sides renormalised over those tokens), whose bound follows from the same bound
//!   ([`crate::tolerance::ENDPOINT_KL_FACTOR`]); top-1 agreement.
//!
//! Everything here is pure: the CLI's harness talks HTTP and runs the reference.

use crate::report::Phase;
use crate::tolerance::{
    bf16_half_ulp, bf16_top1_slack, finite_noise, Tier, BF16_NOISE_MULTIPLE, ENDPOINT_KL_FACTOR,
    F32_LOGITS_TOLERANCE, F32_NOISE_MULTIPLE, F64_TOLERANCE,
};
use serde::Serialize;
use std::fmt::Write as _;

/// What the server returned for one position of the sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerStep {
    /// Index in the full sequence (prompt + generated) of the token this step predicts: the
    /// distribution is the model's over `sequence[position]` given `sequence[..position]`.
    pub position: usize,
    /// A generated token (judged for greedy identity), or a prompt token returned by `echo`.
    pub generated: bool,
    /// The token at this position (generated or echoed), when its id is known.
    pub token: Option<u32>,
    /// The server's log-probability of that token.
    pub logprob: Option<f64>,
    /// The server's top-k `(token, logprob)` whose ids are known, most likely first.
    pub top: Vec<(u32, f64)>,
    /// Top-k entries left out because their text names several tokens (or none).
    pub unresolved: usize,
}

/// Log-softmax rows of a logits tensor `[rows, vocab]` (row `r` predicts sequence position `r+1`).
#[derive(Debug, Clone, Copy)]
pub struct LogitRows<'a> {
    /// The logits, row-major.
    pub data: &'a [f64],
    /// The vocabulary size (row length).
    pub vocab: usize,
}

impl LogitRows<'_> {
    /// Rows available.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    /// The log-probabilities predicting sequence position `position` (`None` past the end or at
    /// position 0, which nothing predicts).
    pub fn logprobs(&self, position: usize) -> Option<Vec<f64>> {
        let row = position.checked_sub(1)?;
        let l = self.data.get(row * self.vocab..(row + 1) * self.vocab)?;
        let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + l.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        Some(l.iter().map(|x| x - lse).collect())
    }
}

/// The largest distance rounding may explain in `tier`, from the reference's own distance
/// `noise = max|ref − oracle|` of its log-probabilities and the largest |oracle logprob| judged:
/// f64 `1e-9`; f32 `max(1e-4, 3 · noise)` (the f32 logits rule); bf16 `max(2 · noise,
/// bf16 half-ulp of max|oracle|)` (the bf16 rule). A non-finite noise never widens it.
pub fn logprob_bound(tier: Tier, noise: f64, oracle_magnitude: f64) -> f64 {
    let noise = finite_noise(noise).unwrap_or(0.0);
    match tier {
        Tier::F64 => F64_TOLERANCE,
        Tier::F32 => F32_LOGITS_TOLERANCE.max(F32_NOISE_MULTIPLE * noise),
        Tier::BF16 => (BF16_NOISE_MULTIPLE * noise).max(bf16_half_ulp(oracle_magnitude)),
    }
}

/// KL(p ‖ q) of two distributions given as log-probabilities over the same tokens, each
/// renormalised over those tokens.
pub fn topk_kl(p: &[f64], q: &[f64]) -> f64 {
    let norm = |v: &[f64]| {
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        v.iter().map(|x| x - lse).collect::<Vec<_>>()
    };
    let (p, q) = (norm(p), norm(q));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// A greedy step where the server's token is not the reference's argmax.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parting {
    /// Generated step (0 = the first new token).
    pub step: usize,
    /// The server's token.
    pub server: u32,
    /// The reference's argmax.
    pub reference: u32,
    /// The reference's logprob of its token minus its logprob of the server's.
    pub reference_gap: f64,
    /// The server's logprob of its token minus its logprob of the reference's (`None`: the
    /// reference's token is not among the server's top-k).
    pub server_gap: Option<f64>,
    /// Both gaps within the bound: rounding decides, not a bug.
    pub near_tie: bool,
}

/// The judgement of one input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointJudgement {
    /// The input's label.
    pub label: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Generated steps judged.
    pub generated: usize,
    /// Echoed prompt positions judged.
    pub echoed: usize,
    /// Generated steps whose token is the reference's argmax.
    pub greedy_identical: usize,
    /// Every step where the two part.
    pub partings: Vec<Parting>,
    /// The reference's own distance from the oracle (max |Δ logprob| over the vocabulary at the
    /// judged positions; 0 in f64, where the reference is the oracle).
    pub noise: f64,
    /// The bound on |Δ logprob| ([`logprob_bound`]).
    pub bound: f64,
    /// The largest |server − reference| logprob over the returned entries (bf16: − oracle).
    pub max_dlogprob: f64,
    /// Where it is: (position, token).
    pub max_at: Option<(usize, u32)>,
    /// The largest |server − oracle| logprob over the returned entries: how far the server is
    /// from exact math, to set beside `noise` (the reference's own distance).
    pub from_oracle: f64,
    /// The largest KL over the returned top-k, reference ‖ server.
    pub max_kl: f64,
    /// Its bound: `ENDPOINT_KL_FACTOR · bound²`.
    pub kl_bound: f64,
    /// Steps whose server top-1 is the reference's argmax (bf16: the oracle's), of `top1_of`.
    pub top1_agree: usize,
    /// Steps with a server top-1.
    pub top1_of: usize,
    /// bf16: steps whose reference argmax is the oracle's.
    pub reference_top1_agree: usize,
    /// Top-k entries left out (their text names several tokens).
    pub unresolved: usize,
    /// Why the greedy continuation fails (empty: identical or parted on near-ties only).
    pub greedy_failures: Vec<String>,
    /// Why the log-probabilities fail (empty: within the bounds).
    pub failures: Vec<String>,
}

impl EndpointJudgement {
    /// Whether the input passes.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.greedy_failures.is_empty()
    }
}

/// Judges one input's steps in `tier`: `reference` the reference's logits on the server's
/// sequence in the tier's dtype, `oracle` the pure-f64 oracle's on the same sequence.
pub fn judge_endpoint(
    label: &str,
    prompt_tokens: usize,
    steps: &[ServerStep],
    tier: Tier,
    reference: LogitRows,
    oracle: LogitRows,
) -> EndpointJudgement {
    let (mut failures, mut greedy_failures) = (vec![], vec![]);
    // Log-probabilities of both sides at every judged position, and the reference's noise.
    let mut rows = vec![];
    let (mut noise, mut magnitude) = (0.0f64, 0.0f64);
    for s in steps {
        match (reference.logprobs(s.position), oracle.logprobs(s.position)) {
            (Some(r), Some(o)) => {
                if tier != Tier::F64 {
                    let d = r.iter().zip(&o).map(|(a, b)| (a - b).abs());
                    noise = noise.max(d.fold(0.0, f64::max));
                }
                for (t, _) in entries(s) {
                    magnitude = magnitude.max(o.get(t as usize).map_or(0.0, |v| v.abs()));
                }
                rows.push((s, r, o));
            }
            _ => failures.push(format!(
                "position {} is beyond the reference run ({} positions)",
                s.position,
                reference.rows() + 1
            )),
        }
    }
    let bound = logprob_bound(tier, noise, magnitude);
    let kl_bound = ENDPOINT_KL_FACTOR * bound * bound;
    let mut j = EndpointJudgement {
        label: label.into(),
        prompt_tokens,
        generated: 0,
        echoed: 0,
        greedy_identical: 0,
        partings: vec![],
        noise,
        bound,
        max_dlogprob: 0.0,
        max_at: None,
        from_oracle: 0.0,
        max_kl: 0.0,
        kl_bound,
        top1_agree: 0,
        top1_of: 0,
        reference_top1_agree: 0,
        unresolved: 0,
        greedy_failures: vec![],
        failures: vec![],
    };
    let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32;
    let mut worst_kl_at = None;
    for (s, r, o) in &rows {
        j.unresolved += s.unresolved;
        let at = |v: &[f64], t: u32| v.get(t as usize).copied().unwrap_or(f64::NAN);
        // |Δ logprob| over the returned entries: against the reference, or (f32) the oracle when
        // that is nearer (the reference's own error is in |server − reference|); bf16: the oracle.
        let dist = |v: &[f64]| {
            entries(s).map(|(t, lp)| ((lp - at(v, t)).abs(), t)).fold(
                (0.0f64, None),
                |acc, (d, t)| {
                    if d > acc.0 || d.is_nan() {
                        (if d.is_nan() { f64::INFINITY } else { d }, Some(t))
                    } else {
                        acc
                    }
                },
            )
        };
        j.from_oracle = j.from_oracle.max(dist(o).0);
        let (d, t) = match tier {
            Tier::BF16 => dist(o),
            Tier::F32 => {
                let (a, b) = (dist(r), dist(o));
                if b.0 < a.0 {
                    b
                } else {
                    a
                }
            }
            Tier::F64 => dist(r),
        };
        if d > j.max_dlogprob || (j.max_at.is_none() && t.is_some()) {
            j.max_dlogprob = d.max(j.max_dlogprob);
            j.max_at = t.map(|t| (s.position, t));
        }
        // KL over the returned top-k.
        if s.top.len() > 1 {
            let theirs: Vec<f64> = s.top.iter().map(|e| e.1).collect();
            let kl_against = |v: &[f64]| {
                let ours: Vec<f64> = s.top.iter().map(|e| at(v, e.0)).collect();
                topk_kl(&ours, &theirs)
            };
            // As |Δ logprob|: f32 also against the oracle, bf16 against the oracle only.
            let kl = match tier {
                Tier::BF16 => kl_against(o),
                Tier::F32 => kl_against(r).min(kl_against(o)),
                Tier::F64 => kl_against(r),
            };
            let kl = if kl.is_nan() { f64::INFINITY } else { kl };
            if kl > j.max_kl {
                j.max_kl = kl;
                worst_kl_at = Some(s.position);
            }
        }
        // Top-1 and greedy identity.
        let (rt, ot) = (argmax(r), argmax(o));
        let best = if tier == Tier::BF16 { ot } else { rt };
        if let Some(&(st, _)) = s.top.first() {
            j.top1_of += 1;
            j.top1_agree += (st == best) as usize;
            j.reference_top1_agree += (rt == ot) as usize;
        }
        if s.generated {
            let step = j.generated;
            j.generated += 1;
            let Some(tok) = s.token else {
                greedy_failures.push(format!(
                    "{label}: generated step {step}: the server's token is unknown"
                ));
                continue;
            };
            if tok == rt {
                j.greedy_identical += 1;
            } else {
                let reference_gap = at(r, rt) - at(r, tok);
                let server_gap = s
                    .top
                    .iter()
                    .find(|e| e.0 == rt)
                    .and_then(|e| s.logprob.map(|lp| lp - e.1));
                let near_tie =
                    reference_gap.abs() <= bound && server_gap.is_some_and(|g| g.abs() <= bound);
                if !near_tie {
                    greedy_failures.push(format!(
                        "{label}: generated step {step} (position {}): the server chose token {tok}, the reference {rt} ({reference_gap:.2e} apart in the reference's log-probabilities, {} in the server's; a near-tie needs both ≤ {bound:.1e})",
                        s.position,
                        server_gap.map_or("not among its top-k".to_string(), |g| format!("{g:.2e}"))
                    ));
                }
                j.partings.push(Parting {
                    step,
                    server: tok,
                    reference: rt,
                    reference_gap,
                    server_gap,
                    near_tie,
                });
            }
        } else {
            j.echoed += 1;
        }
    }
    if j.max_dlogprob > bound {
        let (pos, tok) = j.max_at.unwrap_or((0, 0));
        let step = pos.checked_sub(prompt_tokens).map_or_else(
            || format!("prompt position {pos}"),
            |g| format!("generated step {g}"),
        );
        failures.push(format!(
            "{label}: {step}, token {tok}: |Δ logprob| {:.2e} > bound {bound:.1e} ({})",
            j.max_dlogprob,
            bound_words(tier, noise)
        ));
    }
    if j.max_kl > kl_bound {
        failures.push(format!(
            "{label}: top-k KL {:.2e} at position {} > bound {kl_bound:.1e}",
            j.max_kl,
            worst_kl_at.unwrap_or(0)
        ));
    }
    if tier == Tier::BF16 && j.top1_of > 0 {
        let (a, b) = (
            j.top1_agree as f64 / j.top1_of as f64,
            j.reference_top1_agree as f64 / j.top1_of as f64,
        );
        let slack = bf16_top1_slack(j.top1_of);
        if a < b - slack - 1e-12 {
            failures.push(format!(
                "{label}: top-1 agreement with the oracle {a:.3} < the reference's {b:.3} − {slack:.3}"
            ));
        }
    }
    if j.generated == 0 {
        greedy_failures.push(format!("{label}: the server generated nothing to judge"));
    }
    j.failures = failures;
    j.greedy_failures = greedy_failures;
    j
}

/// The bound's origin in words.
fn bound_words(tier: Tier, noise: f64) -> String {
    match tier {
        Tier::F64 => "the f64 tier's 1e-9".into(),
        Tier::F32 => {
            format!("max(1e-4, 3 × the reference's own distance from the oracle {noise:.1e})")
        }
        Tier::BF16 => format!(
            "max(2 × the reference's own distance from the oracle {noise:.1e}, bf16 half-ulp)"
        ),
    }
}

/// What the server's distance from exact math means, beside PyTorch's own at the tier's dtype.
fn oracle_words(tier: Tier, from_oracle: f64, noise: f64) -> String {
    if tier == Tier::F64 {
        return format!("the server is {from_oracle:.1e} from the f64 oracle");
    }
    let ratio = if noise > 0.0 {
        format!("{:.1}×", from_oracle / noise)
    } else {
        "∞×".into()
    };
    format!(
        "the server is {from_oracle:.1e} from the f64 oracle, {ratio} PyTorch {tier}'s own distance ({noise:.1e}){}",
        if from_oracle <= noise {
            ": as close to exact math as PyTorch at this dtype"
        } else {
            ""
        }
    )
}

/// The returned entries of a step: its top-k and its chosen token.
fn entries(s: &ServerStep) -> impl Iterator<Item = (u32, f64)> + '_ {
    s.top.iter().copied().chain(s.token.zip(s.logprob))
}

/// The endpoint's phases in `tier`: greedy continuation, then top-k log-probabilities.
/// `prompt_logprobs` says how the prompt positions were obtained (`echo`), or why not.
pub fn endpoint_phases(
    tier: Tier,
    judgements: &[EndpointJudgement],
    prompt_logprobs: &str,
) -> Vec<Phase> {
    let greedy_name = format!("greedy continuation [{tier}]");
    let lp_name = format!("top-k log-probabilities [{tier}]");
    let mut gtable = String::from(
        "| input | prompt tokens | generated | identical | partings |\n|---|---:|---:|---:|---|\n",
    );
    let mut ltable = String::from(
        "| input | positions | max \\|Δ logprob\\| | bound | reference vs oracle | server vs oracle | max top-k KL | KL bound | top-1 agreement | unresolved entries | verdict |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let (mut gfail, mut lfail) = (vec![], vec![]);
    let (mut gen, mut same, mut ties) = (0, 0, 0);
    for j in judgements {
        gen += j.generated;
        same += j.greedy_identical;
        ties += j.partings.iter().filter(|p| p.near_tie).count();
        let mut partings: Vec<String> = j
            .partings
            .iter()
            .take(5)
            .map(|p| {
                format!(
                    "step {}: server {} vs reference {}{}",
                    p.step,
                    p.server,
                    p.reference,
                    if p.near_tie {
                        " (near-tie)"
                    } else {
                        " **FAIL**"
                    }
                )
            })
            .collect();
        if j.partings.len() > 5 {
            partings.push(format!("{} more", j.partings.len() - 5));
        }
        let _ = writeln!(
            gtable,
            "| {} | {} | {} | {}/{} | {} |",
            j.label,
            j.prompt_tokens,
            j.generated,
            j.greedy_identical,
            j.generated,
            if partings.is_empty() {
                "none".into()
            } else {
                partings.join("; ")
            }
        );
        gfail.extend(&j.greedy_failures);
        lfail.extend(&j.failures);
        let _ = writeln!(
            ltable,
            "| {} | {} gen + {} prompt | {:.2e} | {:.1e} | {:.1e} | {:.1e} | {:.2e} | {:.1e} | {}/{} | {} | {} |",
            j.label,
            j.generated,
            j.echoed,
            j.max_dlogprob,
            j.bound,
            j.noise,
            j.from_oracle,
            j.max_kl,
            j.kl_bound,
            j.top1_agree,
            j.top1_of,
            j.unresolved,
            if j.failures.is_empty() { "PASS" } else { "**FAIL**" }
        );
    }
    let gsummary = format!(
        "{same}/{gen} generated tokens are the reference's argmax on the same context{}",
        if ties > 0 {
            format!(", {ties} parted on a near-tie (rounding)")
        } else {
            String::new()
        }
    );
    let greedy = if gfail.is_empty() && gen > 0 {
        Phase::pass(greedy_name, gsummary)
    } else {
        Phase::fail(
            greedy_name,
            format!(
                "{gsummary}; {}",
                gfail.first().map_or("nothing generated", |s| s.as_str())
            ),
        )
    }
    .with_details(gtable);
    let worst = judgements
        .iter()
        .max_by(|a, b| (a.max_dlogprob / a.bound).total_cmp(&(b.max_dlogprob / b.bound)));
    let from_oracle = judgements.iter().map(|j| j.from_oracle).fold(0.0, f64::max);
    let noise = judgements.iter().map(|j| j.noise).fold(0.0, f64::max);
    let lsummary = match worst {
        Some(w) => format!(
            "{} input(s); largest |Δ logprob| {:.2e} ({}) against a bound of {:.1e} from the reference's own distance from the oracle; {}; prompt log-probabilities: {prompt_logprobs}",
            judgements.len(),
            w.max_dlogprob,
            w.label,
            w.bound,
            oracle_words(tier, from_oracle, noise)
        ),
        None => "no input".into(),
    };
    let logprobs = if lfail.is_empty() && !judgements.is_empty() {
        Phase::pass(lp_name, lsummary)
    } else {
        Phase::fail(
            lp_name,
            format!(
                "{lsummary}; {}",
                lfail.first().map_or("nothing judged", |s| s.as_str())
            ),
        )
    }
    .with_details(ltable);
    vec![greedy, logprobs]
}
