//! Where a prefill's time goes: one forward pass over a prompt of random ids, timed between the
//! observer's taps, so each tap's line is the time of the ops that produced it (`mlp_act`: the
//! gate/up products and SwiGLU; `attn_out`: attention; `q`: the q/k/v products; ...), summed
//! over the layers, per pass (after one uncounted warm-up pass), medians of the passes' totals first.
//!
//! `cargo run --release -p lockstep-engine --example prefill_profile MODEL_DIR [bf16|f32] [TOKENS]`

use lockstep_engine::{Bf16, Dtype, Float, KvCache, LogitsFor, Model, Observer, TapView};
use lockstep_trace::names::TapName;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Seconds since the previous tap, summed per tap name (layers merged).
struct Timer {
    last: Instant,
    acc: BTreeMap<String, f64>,
}

impl<T: Float> Observer<T> for Timer {
    fn tap(&mut self, name: TapName, _: TapView<'_, T>) {
        let key = match name {
            TapName::Layer(_, t) => format!("layers.*.{}", t.suffix()),
            other => other.to_string(),
        };
        *self.acc.entry(key).or_default() += self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
    }
}

fn run<T: Float>(m: &Model, n: usize) {
    let prompt: Vec<u32> = (0..n as u32).map(|i| (i * 31 + 7) % 1000).collect();
    let mut t = Timer {
        last: Instant::now(),
        acc: BTreeMap::new(),
    };
    let passes = 5;
    let mut totals = vec![];
    // One pass first, not counted: it faults the weights in and grows the allocations.
    for pass in 0..=passes {
        if pass == 1 {
            t.acc.clear();
        }
        let mut cache = KvCache::<T>::new(m.config.num_layers);
        let start = Instant::now();
        t.last = start;
        m.forward_logits(&prompt, &mut cache, &mut t, LogitsFor::Last)
            .unwrap();
        if pass > 0 {
            totals.push(start.elapsed().as_secs_f64());
        }
    }
    totals.sort_by(f64::total_cmp);
    let total = totals[passes / 2];
    println!(
        "{n} tokens: {:.1} ms per pass (median of {passes}), {:.1} tok/s",
        total * 1e3,
        n as f64 / total
    );
    let mut v: Vec<_> = t.acc.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (tap, s) in v {
        let per = s / passes as f64;
        println!(
            "{tap:>24}: {:7.1} ms ({:4.1}%)",
            per * 1e3,
            100.0 * per / total
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("MODEL_DIR");
    let dtype = args.next().unwrap_or_else(|| "bf16".into());
    let n: usize = args.next().map_or(512, |c| c.parse().unwrap());
    let mut m = Model::load(Path::new(&dir)).unwrap();
    match dtype.as_str() {
        "bf16" => {
            m.use_dtype(Dtype::Bf16).unwrap();
            run::<Bf16>(&m, n)
        }
        _ => {
            m.use_dtype(Dtype::F32).unwrap();
            run::<f32>(&m, n)
        }
    }
}
