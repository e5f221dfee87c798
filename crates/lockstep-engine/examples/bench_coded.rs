//! Times one-token bf16 products (`linear` on this CPU's fastest kernel, whose decode reads
//! the coding: `vdpbf16ps` on AMD, the widening FMA kernel on Intel) on a BF16 matrix as
//! stored against the same matrix coded in 12 bits per value (`weights::bf16_coded`), on the
//! 0.5B shape's MLP and LM head and a matrix small enough for L2, alternating, 3 rounds. Each
//! figure is the fastest of its round's calls (the least disturbed by whatever else runs).
//!
//! `cargo run --release -p lockstep-engine --example bench_coded` (`BENCH_THREADS=1` for one
//! thread). The 4864×896 matrix shows the rebuild's cost per core best: the L2-sized one's
//! calls (10-20 µs) are mostly the call's fixed cost (packing, the pool), not the sums.
use lockstep_engine::kernels::matmul::{linear_with, Kernel, PassKind};
use lockstep_engine::weights::{StoredDtype, Tensor};
use lockstep_engine::Bf16;
use std::time::Instant;

/// `len` values uniform in ±0.02 (the activations).
fn pseudo(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 + 0.5) / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect()
}

/// `len` weights drawn as a matrix's are, normal with standard deviation 0.02 (Box-Muller):
/// their high bytes fall in the coding's table but for a few in 10,000, as in the fixtures and
/// trained models. (Uniform values put a tenth of them in the thin binades near zero, and
/// nearly every group then takes the side list's slow path.)
fn weights(len: usize, seed: u64) -> Vec<f32> {
    let u = pseudo(len + 1, seed);
    (0..len)
        .map(|i| {
            let (a, b) = (
                u[i] / 0.04 + 0.5,
                u[(i * 7919 + 1) % (len + 1)] / 0.04 + 0.5,
            );
            0.02 * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
        })
        .collect()
}

fn main() {
    if !lockstep_engine::kernels::matmul::reads_coded() {
        eprintln!("this CPU's kernels do not sum coded matrices (they need AVX-512F/BW/VL)");
        std::process::exit(1);
    }
    let kernel = Kernel::detect();
    for (m, k, reps) in [
        (256usize, 896usize, 2000usize),
        (4864, 896, 200),
        (151936, 896, 10),
    ] {
        let vals = weights(m * k, 3);
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let plain = Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes.clone());
        let coded = Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes);
        assert!(coded.code_bf16());
        let escapes = coded.coded().expect("coded").escapes();
        println!(
            "{m}x{k}: {:.2} escapes in 10,000 values",
            escapes as f64 * 1e4 / (m * k) as f64
        );
        let x: Vec<Bf16> = pseudo(k, 4)
            .iter()
            .map(|&v| Bf16(half::bf16::from_f32(v).to_f32()))
            .collect();
        let mut out = vec![Bf16(0.0); m];
        let threads = std::env::var("BENCH_THREADS").map_or(0, |v| v.parse().expect("a count"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        for round in 0..3 {
            for (name, w) in [("plain", &plain), ("coded", &coded)] {
                let s = (0..reps)
                    .map(|_| {
                        let t = Instant::now();
                        pool.install(|| {
                            linear_with(kernel, PassKind::Decode, &x, 1, w, None, &mut out)
                        });
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min);
                let b = if name == "plain" {
                    (m * k * 2) as f64
                } else {
                    coded.coded().unwrap().bytes() as f64
                };
                println!(
                    "{m}x{k} r{round} {name}: {:.1} us, {:.2} Gweights/s, {:.1} GB/s",
                    s * 1e6,
                    (m * k) as f64 / s / 1e9,
                    b / s / 1e9
                );
            }
        }
    }
}
