//! Whether two greedy generations that part at a step parted on a near-tie (rounding decides) or
//! on a real difference, judged from **both** sides' logits at that step.
//!
//! At the parting step our argmax is `ours`, the reference's is `theirs`. It is a near-tie only
//! when the two tokens are within the tolerance in the reference's own logits *and* in ours: a tie
//! only one side sees is a real difference (e.g. our logits flat where the reference's are not,
//! which is what a bug that flattens logits looks like).
//!
//! The reference reports, per generated step, its best tokens and their scores (`top_ids` /
//! `top_logits` of `generate-batch`): its best two and every other token within the tolerance of
//! its best (at most 256). When `ours` is among them its gap is exact; when it is not, the
//! reference's gap is at least the spread of those it listed and, when the list holds every token
//! within the tolerance (`listed_within`), more than the tolerance: a real difference. With
//! nothing reported the parting is not shown to be a tie, and is a failure. Our logits are the
//! ones the run that picked our token computed (the verifier replays that run to the step).

/// One greedy generation by the reference: its new ids and, per generated step, its best tokens
/// with their scores, best first (`None`: not finite).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneratedRow {
    /// The new ids (a batch row that ended keeps being padded after its EOS).
    pub ids: Vec<u32>,
    /// Per step, `(token, score)` best first; may be empty when the reference did not report it.
    pub top: Vec<Vec<(u32, Option<f32>)>>,
}

/// The decision on one parting.
#[derive(Debug, Clone, PartialEq)]
pub struct Parting {
    /// True when both sides see the two tokens within the tolerance.
    pub near_tie: bool,
    /// The reference's score of its token minus its score of ours: exact (`Some`, `exact`), a
    /// lower bound when ours is not among the tokens it listed (`exact == false`), or unknown.
    pub ref_gap: Option<f64>,
    /// Whether `ref_gap` is exact (false: a lower bound).
    pub exact: bool,
    /// Our logit of our token minus ours of theirs (NaN when not finite).
    pub our_gap: f64,
}

impl Parting {
    /// The gaps in words, for the report.
    pub fn describe(&self) -> String {
        let reference = match (self.ref_gap, self.exact) {
            (Some(g), true) => format!("{g:.1e} apart in the reference's logits"),
            (Some(g), false) => format!(
                "≥ {g:.1e} apart in the reference's logits (ours is not among its best tokens)"
            ),
            (None, _) => "the reference's logits at that step unknown".into(),
        };
        format!("{reference}, {:.1e} in ours", self.our_gap)
    }
}

/// Judges the parting at one step: `ours` / `theirs` the two sides' tokens, `reference_top` the
/// reference's best tokens with their scores at that step (best first), `our_logits` our logits at
/// that step, `tolerance` the largest gap rounding can close (the f32 logits tolerance).
/// `listed_within`: the reference listed every token within this of its best, so ours, when not
/// listed, is further than that (the lower bound on its gap is at least this).
pub fn judge_parting(
    ours: u32,
    theirs: u32,
    reference_top: &[(u32, Option<f32>)],
    our_logits: &[f32],
    tolerance: f64,
    listed_within: Option<f64>,
) -> Parting {
    let logit = |t: u32| our_logits.get(t as usize).map_or(f64::NAN, |&v| v as f64);
    let our_gap = logit(ours) - logit(theirs);
    let score = |t: u32| {
        reference_top
            .iter()
            .find(|(id, _)| *id == t)
            .map(|(_, v)| v.map_or(f64::NAN, |v| v as f64))
    };
    let (ref_gap, exact) = match (score(theirs), score(ours)) {
        (Some(a), Some(b)) => (Some(a - b), true),
        // Ours ranks below every token listed: at least the spread of the list.
        (Some(a), None) => match reference_top.last().and_then(|(_, v)| *v) {
            Some(last) => (
                Some((a - last as f64).max(listed_within.unwrap_or(f64::NEG_INFINITY))),
                false,
            ),
            None => (None, false),
        },
        _ => (None, false),
    };
    // NaN never compares as within the tolerance.
    let ref_tie = exact && ref_gap.is_some_and(|g| g.abs() <= tolerance);
    let our_tie = our_gap.abs() <= tolerance;
    Parting {
        near_tie: ref_tie && our_tie,
        ref_gap,
        exact,
        our_gap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-4;

    fn logits(pairs: &[(usize, f32)]) -> Vec<f32> {
        let mut v = vec![-10.0f32; 8];
        for &(i, x) in pairs {
            v[i] = x;
        }
        v
    }

    #[test]
    fn a_tie_both_sides_see_is_a_near_tie() {
        let top = [(3, Some(5.00003f32)), (4, Some(5.0))];
        let ours = logits(&[(4, 5.00002), (3, 5.0)]);
        let p = judge_parting(4, 3, &top, &ours, TOL, None);
        assert!(p.near_tie, "{p:?}");
        assert!(p.exact);
        assert!((p.ref_gap.unwrap() - 3e-5).abs() < 1e-6);
        assert!(p.describe().contains("apart in the reference's logits"));
    }

    #[test]
    fn a_tie_only_we_see_is_a_real_difference() {
        // Our logits flat (e.g. a bug that flattens them); the reference clearly prefers 3.
        let top = [(3, Some(7.0f32)), (4, Some(5.0))];
        let ours = logits(&[(4, 1.0), (3, 1.0)]);
        let p = judge_parting(4, 3, &top, &ours, TOL, None);
        assert!(!p.near_tie, "{p:?}");
        assert_eq!(p.ref_gap, Some(2.0));
        // This was a near-tie when judged from our logits alone.
        assert!(p.our_gap.abs() <= TOL);
    }

    #[test]
    fn a_tie_only_the_reference_sees_is_a_real_difference() {
        let top = [(3, Some(5.00001f32)), (4, Some(5.0))];
        let ours = logits(&[(4, 6.0), (3, 5.0)]);
        assert!(!judge_parting(4, 3, &top, &ours, TOL, None).near_tie);
    }

    #[test]
    fn ours_not_among_the_references_best_tokens() {
        // The reference's list spans 0.5: ours is at least that far below its token.
        let top = [(3, Some(5.5f32)), (6, Some(5.0))];
        let ours = logits(&[(4, 5.0), (3, 5.0)]);
        let p = judge_parting(4, 3, &top, &ours, TOL, None);
        assert!(!p.near_tie);
        assert!(!p.exact);
        assert_eq!(p.ref_gap, Some(0.5));
        assert!(p.describe().contains("≥ 5.0e-1"), "{}", p.describe());
        // A list within the tolerance proves nothing about ours: not shown to be a tie.
        let top = [(3, Some(5.00001f32)), (6, Some(5.0))];
        assert!(!judge_parting(4, 3, &top, &ours, TOL, None).near_tie);
    }

    #[test]
    fn nothing_reported_or_not_finite_is_no_tie() {
        let ours = logits(&[(4, 5.0), (3, 5.0)]);
        let p = judge_parting(4, 3, &[], &ours, TOL, None);
        assert!(!p.near_tie);
        assert_eq!(p.ref_gap, None);
        assert!(p.describe().contains("unknown"));
        let top = [(3, None), (4, None)];
        assert!(!judge_parting(4, 3, &top, &ours, TOL, None).near_tie);
        let top = [(3, Some(5.0f32)), (4, Some(5.0))];
        let nan = logits(&[(4, f32::NAN), (3, f32::NAN)]);
        assert!(!judge_parting(4, 3, &top, &nan, TOL, None).near_tie);
        // A token id beyond our logits.
        assert!(!judge_parting(40, 3, &top, &ours, TOL, None).near_tie);
    }

    #[test]
    fn ours_missing_from_a_list_of_every_close_token_is_further_than_it() {
        // The reference listed every token within 0.2 of its best; ours (4) is not among them.
        let top = [(3, Some(5.0f32)), (5, Some(4.97))];
        let ours = logits(&[(4, 5.0), (3, 4.99)]);
        let p = judge_parting(4, 3, &top, &ours, 0.2, Some(0.2));
        assert!(!p.near_tie && !p.exact, "{p:?}");
        assert_eq!(p.ref_gap, Some(0.2));
        // Without that promise only the list's spread bounds it.
        let p = judge_parting(4, 3, &top, &ours, 0.2, None);
        assert!((p.ref_gap.unwrap() - 0.03).abs() < 1e-5, "{p:?}");
    }
}
