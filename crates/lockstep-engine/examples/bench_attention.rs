//! Times `kernels::attention::attention` on the 0.5B shape's heads (14 query heads, 2 key/value
//! heads, head dimension 64), causal, for a prefill of N tokens (default 512) in bf16 compute:
//! the median of 9 calls, with and without the probabilities stored.
//!
//! With `decode`, a decode step's attention instead: one query after N tokens of context, in
//! each of 24 layers' caches in turn (48 MB at N = 2048, as the 0.5B shape's step reads them;
//! `LAYERS` for another count), the median of 9 steps, with the keys and values held by head
//! (`[kv_heads][S][D]`, as the KV cache holds them) as bf16 values in f32 and as bf16 (as the
//! bf16 tier's cache holds them, half the bytes), in turns; the outputs must agree bit for bit.
//!
//! `cargo run --release -p lockstep-engine --example bench_attention [N] [decode]`.

use lockstep_engine::kernels::attention::{
    attention, attention_in, AttentionSpec, KvElement, KvLayout,
};
use lockstep_engine::{Bf16, Float};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(512, |a| a.parse().expect("N"));
    let (h, kvh, d) = (14, 2, 64);
    let mut s = 7u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Bf16::from_f64(((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 4.0).to_act_dtype()
    };
    let q: Vec<Bf16> = (0..n * h * d).map(|_| next()).collect();
    let k: Vec<Bf16> = (0..n * kvh * d).map(|_| next()).collect();
    let v: Vec<Bf16> = (0..n * kvh * d).map(|_| next()).collect();
    if std::env::args().nth(2).as_deref() == Some("decode") {
        let layers: usize = std::env::var("LAYERS").map_or(24, |v| v.parse().expect("a count"));
        let mut next_layer = || -> Vec<Bf16> { (0..n * kvh * d).map(|_| next()).collect() };
        let caches: Vec<(Vec<Bf16>, Vec<Bf16>)> =
            (0..layers).map(|_| (next_layer(), next_layer())).collect();
        // The same keys and values held by head, as the KV cache holds them.
        let by_head = |x: &[Bf16]| -> Vec<Bf16> {
            (0..kvh)
                .flat_map(|kv| (0..n).flat_map(move |s| &x[(s * kvh + kv) * d..][..d]))
                .copied()
                .collect()
        };
        let cached: Vec<(Vec<Bf16>, Vec<Bf16>)> = caches
            .iter()
            .map(|(k, v)| (by_head(k), by_head(v)))
            .collect();
        drop(caches);
        let halved =
            |x: &[Bf16]| -> Vec<half::bf16> { x.iter().map(|&x| half::bf16::hold(x)).collect() };
        let cached_bf16: Vec<(Vec<half::bf16>, Vec<half::bf16>)> =
            cached.iter().map(|(k, v)| (halved(k), halved(v))).collect();
        let spec = AttentionSpec {
            q_start: n - 1,
            ..AttentionSpec::causal(h, kvh, d)
        };
        let q = &q[..h * d];
        let (mut out, mut out_bf16) = (vec![Bf16::ZERO; h * d], vec![Bf16::ZERO; h * d]);
        let (mut in_f32, mut in_bf16) = (vec![], vec![]);
        let layout = KvLayout::by_head(n, n, d);
        for _ in 0..10 {
            let s = Instant::now();
            for (k, v) in &cached {
                attention_in(&spec, q, k, v, layout, None, &mut out, None);
            }
            in_f32.push(s.elapsed().as_secs_f64());
            let s = Instant::now();
            for (k, v) in &cached_bf16 {
                attention_in(&spec, q, k, v, layout, None, &mut out_bf16, None);
            }
            in_bf16.push(s.elapsed().as_secs_f64());
        }
        let bits = |x: &[Bf16]| x.iter().map(|x| x.0.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&out),
            bits(&out_bf16),
            "the same bits from either holding"
        );
        for (name, mut t) in [("f32", in_f32), ("bf16", in_bf16)] {
            t.remove(0);
            t.sort_by(f64::total_cmp);
            println!(
                "decode after {n} tokens, {layers} layers, keys held as {name}: {:.3} ms a step (median of 9)",
                t[4] * 1e3
            );
        }
        let sum: f64 = out.iter().map(|x| x.to_f64()).sum();
        println!("checksum {sum:.6e}");
        return;
    }
    let spec = AttentionSpec::causal(h, kvh, d);
    let mut out = vec![Bf16::ZERO; n * h * d];
    let mut probs = vec![Bf16::ZERO; h * n * n];
    for with_probs in [false, true] {
        let mut t = vec![];
        for _ in 0..10 {
            let s = Instant::now();
            let p = with_probs.then_some(&mut probs[..]);
            attention(&spec, &q, &k, &v, None, &mut out, p);
            t.push(s.elapsed().as_secs_f64());
        }
        t.remove(0);
        t.sort_by(f64::total_cmp);
        println!(
            "{n} tokens, probabilities {}: {:.3} ms (median of 9)",
            if with_probs { "stored" } else { "not stored" },
            t[4] * 1e3
        );
    }
    // A checksum of the outputs, to compare builds.
    let sum: f64 = out.iter().map(|x| x.to_f64()).sum();
    println!("checksum {sum:.6e}");
}
