//! Writes the engine's trace with each fault, per tier (calibration of the op-level judgement).
//! `cargo run --release -p lockstep-engine --example fault_traces -- MODEL OUT_DIR TIER IDS`
use lockstep_engine::trace_capture::trace_forward;
use lockstep_engine::{Bf16, Fault, Model};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::Path::new(&a[0]);
    let out = std::path::Path::new(&a[1]);
    let ids: Vec<u32> = a[3].split(',').map(|s| s.parse().unwrap()).collect();
    let mut faults: Vec<Option<Fault>> = vec![None];
    faults.extend(Fault::ALL.iter().map(|f| Some(*f)));
    for f in faults {
        let model = Model::load_with_fault(dir, f).unwrap();
        let t = match a[2].as_str() {
            "f64" => trace_forward::<f64>(&model, &ids, None),
            "f32" => trace_forward::<f32>(&model, &ids, None),
            _ => trace_forward::<Bf16>(&model, &ids, None),
        }
        .unwrap();
        let name = f.map_or("none".to_string(), |f| f.to_string());
        let p = out.join(format!("{}-{name}.st", a[2]));
        t.write(&p).unwrap();
        println!("{} {}", p.display(), f.map_or("-", |f| f.enters_at()));
    }
}
