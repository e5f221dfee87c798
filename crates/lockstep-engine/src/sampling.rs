//! Choosing the next token: the logits processors of `transformers.generate`, in its order and with
//! its semantics, and a small seeded random number generator.
//!
//! `transformers` (5.x, `GenerationMixin._get_logits_processor`) turns the last position's logits,
//! cast to float32, into the next token like this:
//!
//! 1. `RepetitionPenaltyLogitsProcessor` (greedy and sampling alike): for every distinct token of the
//!    context (prompt and generated so far), a score `s < 0` becomes `s * penalty`, else `s / penalty`;
//! 2. only when sampling (`do_sample`), the warpers, each skipped when neutral:
//!    `TemperatureLogitsWarper` (`s / t`, when `t != 1`), `TopKLogitsWarper` (scores below the k-th
//!    largest become -inf; ties at the k-th value are kept), `TopPLogitsWarper` (sort ascending,
//!    softmax, cumulative sum; tokens whose cumulative probability is `<= 1 - top_p` are removed, the
//!    most likely one always kept), `MinPLogitsWarper` (softmax; tokens whose probability is below
//!    `min_p * max_probability` are removed, the most likely one always kept);
//! 3. greedy: the first index of the largest score (`argmax`); sampling: a draw from
//!    `softmax(scores)` (`torch.multinomial`; here from a seeded [`Rng`], so sampled text is
//!    reproducible for a given seed but not equal to PyTorch's random stream).

/// PCG32 (PCG-XSH-RR 64/32, O'Neill 2014): a tiny, fast, well-distributed generator. The same seed
/// gives the same stream on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    inc: u64,
}

impl Rng {
    const MULT: u64 = 6364136223846793005;

    /// A generator seeded with `seed` (expanded with SplitMix64, so nearby seeds give unrelated streams).
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut splitmix = || {
            sm = sm.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^ (z >> 31)
        };
        let init_state = splitmix();
        let init_seq = splitmix();
        let mut r = Rng {
            state: 0,
            inc: (init_seq << 1) | 1,
        };
        r.next_u32();
        r.state = r.state.wrapping_add(init_state);
        r.next_u32();
        r
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Self::MULT).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// A uniform double in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let hi = (self.next_u32() as u64) << 32;
        let bits = (hi | self.next_u32() as u64) >> 11;
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// How the next token is chosen (the `transformers.GenerationConfig` fields that matter here).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Sample (true) or take the argmax (false, greedy).
    pub do_sample: bool,
    /// Softmax temperature (> 0; applied only when sampling and != 1).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off; applied only when sampling).
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1] (1: off; applied only when sampling).
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in [0, 1] (None: off; sampling only).
    pub min_p: Option<f32>,
    /// Repetition penalty (> 0; 1: off; applied in greedy decoding too).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    /// transformers' global defaults: greedy, temperature 1, top_k 50, top_p 1, no min_p, no penalty.
    fn default() -> Self {
        SamplingParams {
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no processors.
    pub fn greedy() -> Self {
        SamplingParams::default()
    }

    /// Checks every value's range; the error is one line naming the flag's meaning.
    pub fn validate(&self) -> Result<(), InvalidSampling> {
        let bad = |param, msg| Err(InvalidSampling { param, msg });
        let t = self.temperature;
        if self.do_sample && !(t > 0.0 && t.is_finite()) {
            return bad(
                "temperature",
                format!(
                    "temperature must be a positive number when sampling, got {t} (0 means greedy)"
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must lie in (0, 1], got {}", self.top_p),
            );
        }
        if let Some(m) = self.min_p {
            if !(0.0..=1.0).contains(&m) {
                return bad("min_p", format!("min_p must lie in [0, 1], got {m}"));
            }
        }
        let r = self.repetition_penalty;
        if !(r > 0.0 && r.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("repetition_penalty must be a positive number, got {r}"),
            );
        }
        Ok(())
    }
}

/// A sampling setting out of range; renders as the one-line message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{msg}")]
pub struct InvalidSampling {
    /// The setting (`temperature`, `top_p`, `min_p`, `repetition_penalty`).
    pub param: &'static str,
    /// What is wrong, with the value.
    pub msg: String,
}

/// `RepetitionPenaltyLogitsProcessor`: every distinct token of `context` gets `s * penalty` when its
/// score is negative and `s / penalty` otherwise. Ids outside the scores are ignored.
pub fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &t in context {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// `TemperatureLogitsWarper`: `s / temperature`.
pub fn apply_temperature(scores: &mut [f32], temperature: f32) {
    for s in scores {
        *s /= temperature;
    }
}

/// `TopKLogitsWarper`: scores strictly below the k-th largest score become -inf (ties with the k-th
/// score survive, as in `scores < topk(scores, k)[-1]`). `k = 0` or `k >= len` keeps everything.
pub fn apply_top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    // Descending; NaN sorts last.
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f64 of f32 scores (-inf gives 0).
pub fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
        .max(f32::MIN) as f64;
    let mut p: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    for x in &mut p {
        *x /= sum;
    }
    p
}

/// `TopPLogitsWarper`: sort ascending (stable), softmax, cumulative sum; tokens whose cumulative
/// probability is `<= 1 - top_p` become -inf; the most likely token is always kept.
pub fn apply_top_p(scores: &mut [f32], top_p: f32) {
    if top_p >= 1.0 || scores.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let probs = softmax(&sorted);
    let threshold = 1.0 - top_p as f64;
    let mut cum = 0.0;
    let last = order.len() - 1;
    for (rank, (&i, p)) in order.iter().zip(probs).enumerate() {
        cum += p;
        if cum <= threshold && rank < last {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// `MinPLogitsWarper`: tokens whose probability is below `min_p` times the largest probability
/// become -inf; the most likely token is always kept.
pub fn apply_min_p(scores: &mut [f32], min_p: f32) {
    if scores.is_empty() {
        return;
    }
    let probs = softmax(scores);
    let top = argmax(scores);
    let cut = min_p as f64 * probs[top];
    for (i, (s, p)) in scores.iter_mut().zip(probs).enumerate() {
        if p < cut && i != top {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The first index of the largest score, as `torch.argmax` picks it among numbers. Unlike
/// `torch.argmax`, which returns the index of a NaN, a NaN never wins here while a number is
/// left (all NaN: the last index); generation stops on non-finite logits before it samples, so
/// the two never meet a NaN in practice.
pub fn argmax(scores: &[f32]) -> usize {
    // Two passes that vectorize: the largest value that is not NaN (`f32::max` passes over NaN),
    // in 16 lanes; then the first index holding it. The same index as the one-pass scan
    // [`argmax_scan`], which the tests compare it with.
    let mut lanes = [f32::NAN; 16];
    let mut chunks = scores.chunks_exact(16);
    for c in &mut chunks {
        for (l, &s) in lanes.iter_mut().zip(c) {
            *l = l.max(s);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NAN, |m, &s| m.max(s));
    if max.is_nan() {
        // Every score is NaN (or there are none): the scan ends on the last index.
        return scores.len().saturating_sub(1);
    }
    scores.iter().position(|&s| s == max).unwrap_or(0)
}

/// [`argmax`] as one scan: the first maximum, a NaN never kept once a number follows it.
#[cfg(test)]
fn argmax_scan(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Draws an index from `softmax(scores)` with one uniform number.
pub fn sample_index(scores: &[f32], rng: &mut Rng) -> usize {
    let probs = softmax(scores);
    let u = rng.next_f64();
    let mut cum = 0.0;
    let mut last_nonzero = argmax(scores);
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            cum += p;
            last_nonzero = i;
            if u < cum {
                return i;
            }
        }
    }
    // Rounding left the total a hair below u.
    last_nonzero
}

/// Applies the processors `params` enables, in transformers' order, to `scores` in place.
pub fn process(scores: &mut [f32], context: &[u32], params: &SamplingParams) {
    apply_repetition_penalty(scores, context, params.repetition_penalty);
    if !params.do_sample {
        return;
    }
    if params.temperature != 1.0 {
        apply_temperature(scores, params.temperature);
    }
    if params.top_k != 0 {
        apply_top_k(scores, params.top_k);
    }
    if params.top_p < 1.0 {
        apply_top_p(scores, params.top_p);
    }
    if let Some(m) = params.min_p {
        apply_min_p(scores, m);
    }
}

/// Chooses next tokens: the processors, then argmax or a seeded draw.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// The settings.
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler with its random stream seeded by `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: Rng::new(seed),
        }
    }

    /// The next token for `logits` (the last position's, any precision already cast to f32, as
    /// transformers casts them) given the `context` so far (prompt and generated tokens).
    pub fn next_token(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        process(logits, context, &self.params);
        if self.params.do_sample {
            sample_index(logits, &mut self.rng) as u32
        } else {
            argmax(logits) as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once_per_token() {
        let mut s = vec![2.0, -1.0, 0.5, 3.0];
        // Token 0 twice: penalized once. Token 9 is outside the vocabulary: ignored.
        apply_repetition_penalty(&mut s, &[0, 1, 0, 9], 2.0);
        assert_eq!(s, vec![1.0, -2.0, 0.5, 3.0]);
        let mut s = vec![2.0, -1.0];
        apply_repetition_penalty(&mut s, &[0, 1], 1.0);
        assert_eq!(s, vec![2.0, -1.0]);
        // A penalty below 1 rewards repetition (transformers allows it).
        let mut s = vec![2.0, -1.0];
        apply_repetition_penalty(&mut s, &[0, 1], 0.5);
        assert_eq!(s, vec![4.0, -0.5]);
    }

    #[test]
    fn temperature_divides() {
        let mut s = vec![1.0, -2.0, 0.0];
        apply_temperature(&mut s, 0.5);
        assert_eq!(s, vec![2.0, -4.0, 0.0]);
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth_score() {
        let mut s = vec![1.0, 5.0, 3.0, 3.0, 2.0];
        apply_top_k(&mut s, 2);
        assert_eq!(s, vec![NEG, 5.0, 3.0, 3.0, NEG]);
        let mut s = vec![1.0, 5.0, 3.0];
        apply_top_k(&mut s, 1);
        assert_eq!(s, vec![NEG, 5.0, NEG]);
        let mut s = vec![1.0, 5.0, 3.0];
        apply_top_k(&mut s, 0);
        assert_eq!(s, vec![1.0, 5.0, 3.0]);
        apply_top_k(&mut s, 10);
        assert_eq!(s, vec![1.0, 5.0, 3.0]);
    }

    #[test]
    fn top_p_removes_the_low_tail_whose_mass_is_at_most_one_minus_p() {
        // Probabilities 0.1, 0.2, 0.3, 0.4 (logits are their logs).
        let p = [0.1f64, 0.2, 0.3, 0.4];
        let logits: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        // top_p 0.75: remove ascending-cumulative <= 0.25 -> 0.1 (cum 0.1) only; 0.2 has cum 0.3.
        let mut s = logits.clone();
        apply_top_p(&mut s, 0.75);
        assert_eq!(s[0], NEG);
        assert!(s[1..].iter().all(|x| x.is_finite()));
        // top_p 0.5: cum 0.1, 0.3 <= 0.5 removed; 0.6 kept.
        let mut s = logits.clone();
        apply_top_p(&mut s, 0.5);
        assert_eq!(&s[..2], &[NEG, NEG]);
        assert!(s[2..].iter().all(|x| x.is_finite()));
        // A tiny top_p keeps only the most likely token, never none.
        let mut s = logits.clone();
        apply_top_p(&mut s, 1e-6);
        assert_eq!(&s[..3], &[NEG, NEG, NEG]);
        assert!(s[3].is_finite());
        // Order in the vocabulary does not matter.
        let mut s: Vec<f32> = logits.iter().rev().copied().collect();
        apply_top_p(&mut s, 0.5);
        assert_eq!(&s[2..], &[NEG, NEG]);
        let mut s = logits.clone();
        apply_top_p(&mut s, 1.0);
        assert_eq!(s, logits);
    }

    #[test]
    fn min_p_scales_with_the_top_probability() {
        // Probabilities 0.5, 0.3, 0.15, 0.05; min_p 0.2 -> cut at 0.1: only 0.05 goes.
        let p = [0.5f64, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let mut s = logits.clone();
        apply_min_p(&mut s, 0.2);
        assert!(s[..3].iter().all(|x| x.is_finite()));
        assert_eq!(s[3], NEG);
        // min_p 0.7 -> cut at 0.35: only the top survives.
        let mut s = logits.clone();
        apply_min_p(&mut s, 0.7);
        assert!(s[0].is_finite());
        assert_eq!(&s[1..], &[NEG, NEG, NEG]);
        // min_p 1 keeps the top token even so.
        let mut s = logits.clone();
        apply_min_p(&mut s, 1.0);
        assert!(s[0].is_finite());
        // min_p 0 keeps everything.
        let mut s = logits.clone();
        apply_min_p(&mut s, 0.0);
        assert_eq!(s, logits);
    }

    #[test]
    fn processors_run_in_transformers_order() {
        // Penalty first (on raw logits), then temperature, then top-k.
        let params = SamplingParams {
            do_sample: true,
            temperature: 2.0,
            top_k: 2,
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 4.0,
        };
        let mut s = vec![8.0, 4.0, -2.0, 3.0];
        process(&mut s, &[0, 2], &params);
        // 8/4=2 -> /2 = 1 ; 4 -> 2 ; -2*4=-8 -> -4 ; 3 -> 1.5 ; top-2 of [1, 2, -4, 1.5] keeps 2 and 1.5.
        assert_eq!(s, vec![NEG, 2.0, NEG, 1.5]);
        // Greedy applies the penalty only.
        let mut s = vec![8.0, 4.0, -2.0, 3.0];
        process(
            &mut s,
            &[0, 2],
            &SamplingParams {
                do_sample: false,
                ..params
            },
        );
        assert_eq!(s, vec![2.0, 4.0, -8.0, 3.0]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
        assert_eq!(argmax(&[NEG, NEG, 0.0]), 2);
    }

    /// The two-pass argmax gives the one-pass scan's index: ties, NaN anywhere (or everywhere),
    /// signed zeros, infinities, empty input, lengths around the 16 lanes, and long random rows.
    #[test]
    fn argmax_is_the_scan() {
        let nan = f32::NAN;
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![nan],
            vec![nan, nan, nan],
            vec![-0.0, 0.0],
            vec![0.0, -0.0],
            vec![NEG, NEG],
            vec![f32::INFINITY, 1.0, f32::INFINITY],
            vec![nan, NEG, nan],
            vec![1.0, nan, 3.0, 3.0],
        ];
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for len in [1, 15, 16, 17, 33, 151_936] {
            for nans in [0, 1, 7] {
                let mut v: Vec<f32> = (0..len)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        // Few distinct values, so ties are common.
                        ((s >> 40) % 997) as f32 - 500.0
                    })
                    .collect();
                for k in 0..nans {
                    let i = (k * 7919) % len;
                    v[i] = nan;
                }
                cases.push(v);
            }
        }
        for c in &cases {
            assert_eq!(argmax(c), argmax_scan(c), "{:?}", &c[..c.len().min(20)]);
        }
    }

    #[test]
    fn rng_is_reproducible_and_seeds_differ() {
        let a: Vec<u32> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u32()).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u32()).collect()
        };
        let c: Vec<u32> = {
            let mut r = Rng::new(43);
            (0..8).map(|_| r.next_u32()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::new(7);
        let mean = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_never_picks_masked_tokens() {
        let logits: Vec<f32> = [0.1f64, 0.2, 0.7, 0.0]
            .iter()
            .map(|x| x.ln() as f32)
            .collect();
        let mut rng = Rng::new(1);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[sample_index(&logits, &mut rng)] += 1;
        }
        assert_eq!(counts[3], 0);
        for (c, p) in counts.iter().zip([0.1, 0.2, 0.7]) {
            assert!((*c as f64 / 20_000.0 - p).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn validation_names_the_bad_value() {
        let ok = SamplingParams {
            do_sample: true,
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        for (p, needle) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..ok.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..ok.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: Some(1.5),
                    ..ok.clone()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..ok.clone()
                },
                "repetition_penalty",
            ),
        ] {
            assert!(p.validate().unwrap_err().to_string().contains(needle));
        }
    }
}
