//! Times `kernels::matmul::linear` against the previous implementation (copied below as
//! `linear_blockwise`) on the linear-layer shapes of Qwen2.5-0.5B and 7B.
//!
//! `cargo run --release -p lockstep-engine --example bench_linear [FILTER]`: one line per case
//! (those whose name contains FILTER), medians of several runs, and the speed-up measured in the
//! same run, and the ratio of the two fastest kernels this CPU has (Portable/Avx2 without
//! AVX-512, Avx512/Amx with AMX; AMX runs only for bf16 compute on BF16 weights with enough
//! tokens, elsewhere its column is the AVX-512 kernel again).

use lockstep_engine::kernels::line_aligned::LineAligned;
use lockstep_engine::kernels::matmul::{dot, linear, linear_with, Kernel, PassKind};
use lockstep_engine::weights::{StoredDtype, Tensor};
use lockstep_engine::{Bf16, Float};
use rayon::prelude::*;
use std::time::Instant;

/// The implementation before the direct-read kernels: every call decodes blocks of weight rows
/// into a fresh `Vec` and dots them with each token.
fn linear_blockwise<T: Float>(x: &[T], n: usize, w: &Tensor, bias: Option<&[T]>, out: &mut [T]) {
    let (m, k) = (w.shape[0], w.shape[1]);
    let block = (m / (4 * rayon::current_num_threads()).max(1)).clamp(1, 64);
    let blocks: Vec<(usize, Vec<T>)> = (0..m.div_ceil(block))
        .into_par_iter()
        .map(|bi| {
            let r0 = bi * block;
            let r1 = (r0 + block).min(m);
            let mut wrows = vec![T::ZERO; (r1 - r0) * k];
            let sz = w.dtype.size();
            T::decode(w.dtype, &w.bytes()[r0 * k * sz..r1 * k * sz], &mut wrows);
            let mut res = vec![T::ZERO; n * (r1 - r0)];
            for t in 0..n {
                let xt = &x[t * k..(t + 1) * k];
                for (j, wr) in wrows.chunks_exact(k).enumerate() {
                    let mut v = dot(xt, wr);
                    if let Some(b) = bias {
                        v += b[r0 + j];
                    }
                    res[t * (r1 - r0) + j] = v.to_act_dtype();
                }
            }
            (r0, res)
        })
        .collect();
    for (r0, res) in blocks {
        let w = res.len() / n;
        for t in 0..n {
            out[t * m + r0..t * m + r0 + w].copy_from_slice(&res[t * w..(t + 1) * w]);
        }
    }
}

fn pseudo(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 0.1
        })
        .collect()
}

fn weight(m: usize, k: usize, dtype: StoredDtype) -> Tensor {
    let vals = pseudo(m * k, 7);
    let bytes: Vec<u8> = match dtype {
        StoredDtype::BF16 => vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    Tensor::from_bytes(dtype, vec![m, k], bytes)
}

/// Median seconds of each function over `runs` rounds (after a warm-up round); the functions
/// take turns within a round, so a load elsewhere on the machine hits them alike.
fn medians(runs: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut t = vec![vec![]; fs.len()];
    for round in 0..=runs {
        for (f, t) in fs.iter_mut().zip(&mut t) {
            let s = Instant::now();
            f();
            if round > 0 {
                t.push(s.elapsed().as_secs_f64());
            }
        }
    }
    t.into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[runs / 2]
        })
        .collect()
}

fn case<T: Float>(name: &str, w: &Tensor, n: usize, runs: usize) {
    let (m, k) = (w.shape[0], w.shape[1]);
    let x: Vec<T> = pseudo(n * k, 3)
        .iter()
        .map(|&v| T::from_f64(v as f64).to_act_dtype())
        .collect();
    let x = &x;
    // The old implementation, every kernel, then `linear` itself (the kernel it picks).
    let mut out = LineAligned::new(n * m, T::ZERO);
    let mut fs: Vec<Box<dyn FnMut() + '_>> =
        vec![Box::new(move || linear_blockwise(x, n, w, None, &mut out))];
    for kernel in Kernel::available() {
        let mut out = LineAligned::new(n * m, T::ZERO);
        fs.push(Box::new(move || {
            linear_with(kernel, PassKind::of(n), x, n, w, None, &mut out)
        }));
    }
    let mut out = LineAligned::new(n * m, T::ZERO);
    fs.push(Box::new(move || {
        linear(PassKind::of(n), x, n, w, None, &mut out)
    }));
    let mut refs: Vec<&mut dyn FnMut()> = fs
        .iter_mut()
        .map(|f| &mut **f as &mut dyn FnMut())
        .collect();
    let t = medians(runs, &mut refs);
    let (old, new) = (t[0], t[t.len() - 1]);
    let kernels: Vec<String> = t[1..t.len() - 1]
        .iter()
        .map(|t| format!("{:8.3}", t * 1e3))
        .collect();
    let kt = &t[1..t.len() - 1];
    let ratio = match kt.len() {
        2.. => format!("{:5.2}x", kt[kt.len() - 2] / kt[kt.len() - 1]),
        _ => "-".into(),
    };
    let gb = (m * k * w.dtype.size()) as f64 / 1e9;
    let gflop = 2.0 * (n * m * k) as f64 / 1e9;
    println!(
        "| {name} | {:8.3} | {} | {ratio} | {:8.3} | {:5.1}x | {:5.1} | {:6.1} |",
        old * 1e3,
        kernels.join(" | "),
        new * 1e3,
        old / new,
        gb / new,
        gflop / new
    );
}

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!(
        "threads: {}, kernel: {:?}",
        rayon::current_num_threads(),
        Kernel::detect()
    );
    let kernels = Kernel::available();
    println!(
        "| case | old ms | {} | {} | linear ms | old/linear | weight GB/s | GFLOP/s |",
        kernels
            .iter()
            .map(|k| format!("{k:?} ms"))
            .collect::<Vec<_>>()
            .join(" | "),
        match &kernels[..] {
            [.., a, b] => format!("{a:?}/{b:?}"),
            _ => "-".into(),
        }
    );
    println!(
        "|---|---:|{}---:|---:|---:|",
        "---:|".repeat(kernels.len() + 2)
    );
    let shapes = [
        ("0.5B mlp k=896 m=4864", 896, 4864),
        ("0.5B down k=4864 m=896", 4864, 896),
        ("0.5B lm_head k=896 m=151936", 896, 151936),
        ("7B mlp k=3584 m=18944", 3584, 18944),
    ];
    for (shape, k, m) in shapes {
        for dtype in [StoredDtype::BF16, StoredDtype::F32] {
            let w = weight(m, k, dtype);
            for n in [1, 128, 512] {
                if n > 1 && m > 100_000 {
                    continue; // prefill computes the lm_head for the last token only
                }
                let runs = if n == 1 { 9 } else { 3 };
                for compute in ["f32", "bf16"] {
                    let name = format!("{shape} n={n} w={dtype:?} compute={compute}");
                    if !name.contains(&filter) {
                        continue;
                    }
                    match compute {
                        "f32" => case::<f32>(&name, &w, n, runs),
                        _ => case::<Bf16>(&name, &w, n, runs),
                    }
                }
            }
        }
    }
}
