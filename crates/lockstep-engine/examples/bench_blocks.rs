//! Times one-token `kernels::matmul::linear` (exact f32 decode) on ggml block weights of every
//! type, on the 0.5B shapes that GGUF files use them for, against Q8_0 of the same shape in the
//! same run: the per-type cost of decoding blocks inside the kernel.
//!
//! `cargo run --release -p lockstep-engine --example bench_blocks [FILTER]`: one line per type
//! (those whose name contains FILTER), medians of 7 passes over ~400 MB of copies, the stored bytes read per second, the
//! nanoseconds per 1000 weights, and the time relative to Q8_0 of the same shape per weight.

use lockstep_engine::kernels::matmul::{linear, PassKind};
use lockstep_engine::weights::{StoredDtype, Tensor};
use std::time::Instant;

/// Elements and bytes per block, and the offsets of the block's f16 scales.
fn layout(dtype: StoredDtype) -> (usize, usize, &'static [usize]) {
    match dtype {
        StoredDtype::Q8_0 => (32, 34, &[0]),
        StoredDtype::Q4_0 => (32, 18, &[0]),
        StoredDtype::Q4_1 => (32, 20, &[0, 2]),
        StoredDtype::Q5_0 => (32, 22, &[0]),
        StoredDtype::Q5_1 => (32, 24, &[0, 2]),
        StoredDtype::Q4_K => (256, 144, &[0, 2]),
        StoredDtype::Q5_K => (256, 176, &[0, 2]),
        StoredDtype::Q6_K => (256, 210, &[208]),
        _ => unreachable!("block dtypes only"),
    }
}

/// An `[m, k]` tensor of random blocks with small finite f16 scales.
fn weight(dtype: StoredDtype, m: usize, k: usize) -> Tensor {
    let (per, bb, halves) = layout(dtype);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let blocks = m * k / per;
    let mut bytes = Vec::with_capacity(blocks * bb);
    for _ in 0..blocks {
        let mut b: Vec<u8> = (0..bb).map(|_| next() as u8).collect();
        for &h in halves {
            let v = ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.01;
            b[h..h + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        bytes.extend(b);
    }
    Tensor::from_bytes(dtype, vec![m, k], bytes)
}

/// Copies of `dtype` weights of shape `[m, k]` to make ~400 MB, more than this machine's
/// last-level cache, so the weights stream from memory as a model's do in decode.
fn copies(dtype: StoredDtype, m: usize, k: usize) -> Vec<Tensor> {
    let one = weight(dtype, m, k);
    let n = (400_000_000 / one.bytes().len()).max(1);
    (0..n)
        .map(|_| Tensor::from_bytes(dtype, vec![m, k], one.bytes().to_vec()))
        .collect()
}

/// Seconds per matrix of one-token `linear` over each of `ws` in turn.
fn pass(ws: &[Tensor]) -> f64 {
    let (m, k) = (ws[0].shape[0], ws[0].shape[1]);
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect();
    let mut out = vec![0f32; m];
    let s = Instant::now();
    for w in ws {
        linear(PassKind::Decode, &x, 1, w, None, &mut out);
    }
    s.elapsed().as_secs_f64() / ws.len() as f64
}

/// Median seconds per matrix of `a` and of `b`, passes taking turns (after a warm-up pass).
fn medians(a: &[Tensor], b: &[Tensor]) -> (f64, f64) {
    let (mut ta, mut tb) = (vec![], vec![]);
    for round in 0..8 {
        let (x, y) = (pass(a), pass(b));
        if round > 0 {
            ta.push(x);
            tb.push(y);
        }
    }
    ta.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    (ta[ta.len() / 2], tb[tb.len() / 2])
}

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("threads: {}", rayon::current_num_threads());
    println!("| type | shape | ms | GB/s | ns per 1000 weights | per weight vs Q8_0 |");
    println!("|---|---|---:|---:|---:|---:|");
    use StoredDtype as D;
    let cases = [
        ((4864, 896), [D::Q8_0, D::Q4_0, D::Q4_1, D::Q5_0, D::Q5_1]),
        ((896, 4864), [D::Q8_0, D::Q4_K, D::Q5_K, D::Q6_K, D::Q4_0]),
    ];
    for ((m, k), types) in cases {
        let q8 = copies(D::Q8_0, m, k);
        for dtype in types {
            let name = format!("{dtype:?}");
            if !name.contains(&filter) && dtype != D::Q8_0 {
                continue;
            }
            let w = copies(dtype, m, k);
            // Q8_0 measured next to each type, so a load elsewhere hits both alike.
            let (base, s) = medians(&q8, &w);
            println!(
                "| {name} | {m}x{k} | {:.3} | {:.1} | {:.1} | {:.2} |",
                s * 1e3,
                w[0].bytes().len() as f64 / s / 1e9,
                s * 1e12 / (m * k) as f64,
                s / base
            );
        }
    }
}
