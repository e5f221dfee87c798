//! Every injected fault first changes the tensor it says it enters at, in every compute precision,
//! and the upcast faults change it by bf16-rounding amounts (visible above f32 noise in f32/f64).

use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{Fault, Float, Model, Precision};
use lockstep_trace::{forward_rank, Trace};
use std::path::PathBuf;

/// The bf16-stored default model (weights exact in every tier). Missing fixtures fail the test.
fn model_dir() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/qwen2-default-bf16");
    assert!(
        dir.join("config.json").is_file(),
        "fixture {} is missing: run scripts/fixtures.sh",
        dir.display()
    );
    dir
}

/// "The quick brown fox jumps over the lazy dog" in the Qwen tokenizer (9 tokens).
const IDS: [u32; 9] = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562];

fn trace<T: Float>(fault: Option<Fault>) -> Trace {
    let model = Model::load_with_fault(&model_dir(), fault).expect("model loads");
    trace_forward::<T>(&model, &IDS, None).expect("forward pass")
}

fn tier(p: Precision, fault: Option<Fault>) -> Trace {
    lockstep_engine::with_float!(p, T => trace::<T>(fault))
}

fn values(t: &Trace, name: &str) -> Vec<f64> {
    t.get(name).expect("tensor traced").data.to_f64()
}

/// The first tensor in forward order where the traces differ, and max |difference| there.
fn first_change(a: &Trace, b: &Trace) -> Option<(String, f64)> {
    let mut names = a.names();
    names.sort_by_key(|n| forward_rank(n));
    names.into_iter().find_map(|n| {
        let (x, y) = (values(a, n), values(b, n));
        let d = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        (x != y).then(|| (n.to_string(), d))
    })
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn every_fault_enters_where_it_says_in_every_tier() {
    let config = Model::load(&model_dir()).expect("model loads").config;
    for p in [Precision::F64, Precision::F32, Precision::BF16] {
        let careful = tier(p, None);
        for f in Fault::ALL {
            let change = first_change(&careful, &tier(p, Some(f)));
            if !f.applies_to(&config) {
                // A fault this model cannot show (no window, no RoPE scaling, no q/k norm)
                // changes nothing; selftest lists it as not applicable.
                assert_eq!(change, None, "{f} does not apply to this model");
                continue;
            }
            // Positions are exact in bf16 up to 256; eps outside the sqrt is below bf16's
            // rounding on this model (a ~5e-6 relative change): both change nothing there.
            let silent = f == Fault::Bf16Positions
                || (f == Fault::NormEpsOutsideSqrt && p == Precision::BF16);
            match change {
                None => assert!(silent, "{f} changes nothing in {p:?}"),
                Some((name, d)) => {
                    assert!(!silent, "{f} in {p:?} changes {name}");
                    assert_eq!(name, f.enters_at(), "{f} in {p:?} (by {d:e})");
                }
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn upcast_faults_are_bf16_sized_at_their_entry() {
    let upcast = [
        Fault::SoftmaxBf16,
        Fault::NormVarianceBf16,
        Fault::RopeBf16InvFreq,
        Fault::ResidualBf16,
    ];
    for p in [Precision::F64, Precision::F32, Precision::BF16] {
        let careful = tier(p, None);
        for f in upcast {
            let (name, d) = first_change(&careful, &tier(p, Some(f))).expect("a change");
            assert_eq!(name, f.enters_at());
            // Entry tensors here are at most ~4.6 in size: a bf16 ulp there is at most 2^-5.
            // In f32/f64 the change is far above f32 rounding (1e-6 at this size), at most a
            // few bf16 ulps; in bf16 it is one or two ulps of the tensor.
            let lo = if p == Precision::BF16 {
                2f64.powi(-10)
            } else {
                1e-4
            };
            assert!(d > lo && d <= 2.0 * 2f64.powi(-5), "{f} in {p:?}: {d:e}");
        }
    }
}
