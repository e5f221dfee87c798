//! Times one-token bf16 products (`linear` on the AVX512_BF16 kernel) on a BF16 matrix as
//! stored against the same matrix coded in 12 bits per value (`weights::bf16_coded`), on the
//! 0.5B shape's MLP and LM head and a matrix small enough for L2, alternating, 3 rounds.
//!
//! `cargo run --release -p lockstep-engine --example bench_coded`
use lockstep_engine::kernels::matmul::{linear_with, Kernel};
use lockstep_engine::weights::{StoredDtype, Tensor};
use lockstep_engine::Bf16;
use std::time::Instant;

fn pseudo(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Uniform in ±0.02: a few binades, as a weight matrix's values.
            (((s >> 40) as f32 + 0.5) / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect()
}

fn main() {
    if !lockstep_engine::kernels::matmul::decodes_coded() {
        eprintln!("this CPU does not sum coded matrices (AVX512_BF16 + AVX512_VBMI on AMD)");
        std::process::exit(1);
    }
    for (m, k, reps) in [
        (256usize, 896usize, 2000usize),
        (4864, 896, 200),
        (151936, 896, 10),
    ] {
        let vals = pseudo(m * k, 3);
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let plain = Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes.clone());
        let coded = Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes);
        assert!(coded.code_bf16());
        let x: Vec<Bf16> = pseudo(k, 4)
            .iter()
            .map(|&v| Bf16(half::bf16::from_f32(v).to_f32()))
            .collect();
        let mut out = vec![Bf16(0.0); m];
        for round in 0..3 {
            for (name, w) in [("plain", &plain), ("coded", &coded)] {
                let t = Instant::now();
                for _ in 0..reps {
                    linear_with(Kernel::Avx512Bf16, &x, 1, w, None, &mut out);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
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
