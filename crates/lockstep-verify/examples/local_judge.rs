//! Judge a test trace op by op from the op-level reference traces:
//! `cargo run --release -p lockstep-verify --example local_judge -- TEST EXACT TIER [REFERENCE]`
//! (make EXACT and REFERENCE with `python -m lockstep_reference ops-batch`).
use lockstep_trace::TraceStore;
use lockstep_verify::{judge_local_stored, Tier};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        return Err("usage: local_judge TEST EXACT TIER [REFERENCE]".into());
    }
    let test = TraceStore::open(a[0].as_ref())?;
    let exact = TraceStore::open(a[1].as_ref())?;
    let tier = Tier::from_dtype(&a[2]).ok_or("tier must be f64, f32 or bf16")?;
    let reference = a.get(3).map(|p| TraceStore::open(p.as_ref())).transpose()?;
    let local = judge_local_stored(&test, reference.as_ref(), &exact, tier)
        .map_err(|(side, e)| format!("{side:?}: {e}"))?;
    for o in &local.ops {
        let t = o.test.as_ref();
        let r = o.reference.as_ref();
        println!(
            "{:24} {:10} ratio {:8.3}  rms {:8.3}/{:8.3}  max {:8.3}/{:8.3}  bias {:8.4}/{:8.4}",
            o.name,
            o.status.label(),
            o.ratio,
            t.map_or(0.0, |s| s.rms_ulps),
            r.map_or(0.0, |s| s.rms_ulps),
            t.map_or(0.0, |s| s.max_ulps),
            r.map_or(0.0, |s| s.max_ulps),
            t.map_or(0.0, |s| s.bias_ulps),
            r.map_or(0.0, |s| s.bias_ulps),
        );
    }
    println!("{}", local.verdict());
    Ok(())
}
