//! How much each injected fault changes the tensor where it enters, per compute precision.
//!
//! `cargo run --release -p lockstep-engine --example fault_effect -- MODEL [TEXT] [FAULT...]`
//!
//! Runs the careful engine and the engine with each fault (all, or those named) on TEXT (default
//! "The quick brown fox jumps over the lazy dog", tokenized with the model's tokenizer) in f64,
//! f32 and bf16, and prints, per fault and tier: the first tensor (forward order) the fault
//! changes, the max |difference| it makes at its entry tensor ([`Fault::enters_at`]) and the
//! fraction of elements it changes there, next to the max |value| of that tensor and the tier's
//! own error there (max |careful tier - careful f64|), so one sees whether the fault is larger
//! than the rounding the tier does anyway.
//!
//! With `FAULT_EFFECT_TRACES=DIR` set, every trace is also written to
//! `DIR/engine-{tier}-{fault or careful}.safetensors` (e.g. to compare with a port's traces).

use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{Fault, Float, Model, Precision, Tokenizer};
use lockstep_trace::{forward_rank, Trace};
use std::path::PathBuf;

fn trace<T: Float>(dir: &std::path::Path, fault: Option<Fault>, ids: &[u32]) -> Trace {
    let model = Model::load_with_fault(dir, fault).expect("model loads");
    trace_forward::<T>(&model, ids, None).expect("forward pass")
}

fn tier_trace(p: Precision, dir: &std::path::Path, fault: Option<Fault>, ids: &[u32]) -> Trace {
    lockstep_engine::with_float!(p, T => trace::<T>(dir, fault, ids))
}

/// Writes `t` under `FAULT_EFFECT_TRACES` when that is set.
fn keep(t: &Trace, p: Precision, fault: Option<Fault>) {
    if let Ok(dir) = std::env::var("FAULT_EFFECT_TRACES") {
        let tier = format!("{p:?}").to_lowercase();
        let name = fault.map_or("careful".to_string(), |f| f.name().to_string());
        let path = PathBuf::from(dir).join(format!("engine-{tier}-{name}.safetensors"));
        t.write(&path).expect("trace written");
    }
}

fn values(t: &Trace, name: &str) -> Vec<f64> {
    t.get(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .data
        .to_f64()
}

/// (max |a - b|, fraction of elements that differ).
fn diff(a: &[f64], b: &[f64]) -> (f64, f64) {
    let mut worst = 0f64;
    let mut n = 0usize;
    for (x, y) in a.iter().zip(b) {
        if x != y {
            n += 1;
            worst = worst.max((x - y).abs());
        }
    }
    (worst, n as f64 / a.len().max(1) as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: fault_effect MODEL [TEXT] [FAULT...]");
        std::process::exit(2);
    };
    let text = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "The quick brown fox jumps over the lazy dog".into());
    let faults: Vec<Fault> = if args.len() > 2 {
        args[2..]
            .iter()
            .map(|s| {
                s.parse().unwrap_or_else(|e| {
                    eprintln!("error: {e}");
                    std::process::exit(2)
                })
            })
            .collect()
    } else {
        Fault::ALL.to_vec()
    };
    let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
    let ids = tok.encode(&text).expect("tokenizes");
    println!("model {}, {} tokens: {text:?}", dir.display(), ids.len());
    let tiers = [Precision::F64, Precision::F32, Precision::BF16];
    let careful: Vec<Trace> = tiers
        .iter()
        .map(|&p| tier_trace(p, &dir, None, &ids))
        .collect();
    for (t, &p) in careful.iter().zip(&tiers) {
        keep(t, p, None);
    }
    println!("| fault | tier | first changed | entry tensor | max |Δ| at entry | elements changed | max |x| there | tier's own error there |");
    println!("|---|---|---|---|---|---|---|---|");
    for f in faults {
        let entry = f.enters_at();
        for (i, &p) in tiers.iter().enumerate() {
            let t = tier_trace(p, &dir, Some(f), &ids);
            keep(&t, p, Some(f));
            let mut names = careful[i].names();
            names.sort_by_key(|n| forward_rank(n));
            let first = names
                .into_iter()
                .find(|n| values(&careful[i], n) != values(&t, n))
                .unwrap_or("-");
            let (c, x) = (values(&careful[i], entry), values(&t, entry));
            let (d, frac) = diff(&c, &x);
            let scale = c.iter().fold(0f64, |m, v| m.max(v.abs()));
            let (own, _) = diff(&c, &values(&careful[0], entry));
            println!(
                "| {f} | {p:?} | {first} | {entry} | {d:.3e} | {:.1}% | {scale:.3e} | {own:.3e} |",
                100.0 * frac
            );
        }
    }
}
