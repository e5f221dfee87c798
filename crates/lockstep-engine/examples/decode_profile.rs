//! Where a one-token decode step's time goes: the whole step (`forward_last`) against the same
//! step's linear layers alone (every layer's seven projections and the head, on the same
//! weights), on rayon's pool and on one thread, and the whole step run from inside the pool
//! (`rayon::scope`: the caller is a worker, so the matmuls need no wake-up of the caller),
//! medians of several rounds taken in turns.
//!
//! `cargo run --release -p lockstep-engine --example decode_profile MODEL_DIR [f32|bf16] [CONTEXT]`

use lockstep_engine::kernels::matmul::{linear, PassKind};
use lockstep_engine::{Bf16, Float, KvCache, Model};
use std::path::Path;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every linear layer of one decode step, in the model's order.
fn linears<T: Float>(m: &Model, x: &[T], out: &mut [T]) {
    let h = m.config.hidden_size;
    for l in &m.layers {
        for w in l.linears() {
            let (rows, k) = (w.shape[0], w.shape[1]);
            linear(PassKind::Decode, &x[..k], 1, w, None, &mut out[..rows]);
        }
    }
    let v = m.lm_head.shape[0];
    linear(
        PassKind::Decode,
        &x[..h],
        1,
        &m.lm_head,
        None,
        &mut out[..v],
    );
}

fn run<T: Float>(m: &Model, context: usize) {
    let widest = m.config.intermediate_size.max(m.config.hidden_size);
    let x: Vec<T> = (0..widest)
        .map(|i| T::from_f64(((i * 7919) % 1000) as f64 / 1000.0 - 0.5).to_act_dtype())
        .collect();
    let mut out = vec![T::ZERO; m.config.vocab_size.max(widest)];
    let prompt: Vec<u32> = (0..context as u32).map(|i| (i * 31 + 7) % 1000).collect();
    let mut cache = KvCache::<T>::new(m.config.num_layers);
    m.forward_last(&prompt, &mut cache).unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (mut step, mut lin, mut lin1, mut inpool) = (vec![], vec![], vec![], vec![]);
    let steps = 8;
    for round in 0..6 {
        let t = Instant::now();
        for s in 0..steps {
            m.forward_last(&[(s as u32 * 13) % 1000], &mut cache)
                .unwrap();
        }
        let a = t.elapsed().as_secs_f64() / steps as f64;
        let t = Instant::now();
        for _ in 0..steps {
            linears(m, &x, &mut out);
        }
        let b = t.elapsed().as_secs_f64() / steps as f64;
        let t = Instant::now();
        one.install(|| {
            for _ in 0..steps {
                linears(m, &x, &mut out);
            }
        });
        let c = t.elapsed().as_secs_f64() / steps as f64;
        let t = Instant::now();
        rayon::scope(|_| {
            for s in 0..steps {
                m.forward_last(&[(s as u32 * 17) % 1000], &mut cache)
                    .unwrap();
            }
        });
        let d = t.elapsed().as_secs_f64() / steps as f64;
        if round > 0 {
            inpool.push(d);
            step.push(a);
            lin.push(b);
            lin1.push(c);
        }
    }
    let (a, b, c, d) = (median(step), median(lin), median(lin1), median(inpool));
    println!(
        "{:?}, {} threads, context {}..{}: step {:.2} ms ({:.1} tok/s); its linears alone {:.2} ms ({:.0}%), on one thread {:.2} ms; the rest {:.2} ms; the step inside the pool {:.2} ms ({:.2}x)",
        T::PRECISION,
        rayon::current_num_threads(),
        context,
        cache.len(),
        a * 1e3,
        1.0 / a,
        b * 1e3,
        100.0 * b / a,
        c * 1e3,
        (a - b) * 1e3,
        d * 1e3,
        a / d
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("MODEL_DIR");
    let dtype = args.next().unwrap_or_else(|| "f32".into());
    let context: usize = args.next().map_or(16, |c| c.parse().unwrap());
    let m = Model::load(Path::new(&dir)).unwrap();
    match dtype.as_str() {
        "bf16" => run::<Bf16>(&m, context),
        _ => run::<f32>(&m, context),
    }
}
