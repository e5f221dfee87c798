//! How close a decode step comes to the memory's speed, measured at the same moments: in turns,
//! round after round, the whole step (`forward_last`), its coded products alone (each of the
//! step's matrices through `linear`, on a team as the step runs them), a plain sum of the same
//! coded bytes in loops like the step's (two tasks a thread for each matrix, on the team), the
//! same bytes summed as two contiguous halves (one thread each), and the 512 MiB buffer
//! `lockstep bench` measures the read bandwidth with, summed as its prefetched passes are (the
//! test's own pieces, `lockstep_engine::bandwidth`). Each figure is bytes read per second;
//! every round's are printed, then their medians and the medians of the rounds' ratios ("step /
//! 512 MiB buffer" is the figure `lockstep bench` judges, but against a mean of four passes of
//! the buffer where the bench takes the best of fifteen, plain and prefetched).
//!
//! The memory of a shared machine changes speed within seconds, so only figures taken in turns
//! compare: "products" against "plain loops" is the kernels' efficiency, "step" against
//! "products" the cost of the work between them.
//!
//! `cargo run --release -p lockstep-engine --example stream_check MODEL_DIR [ROUNDS]`
//! (a BF16 model; its matrices are coded as a bf16 decode codes them).

use lockstep_engine::bandwidth::{sum_in_parts, sum_words, Read, TestBuffer};
use lockstep_engine::kernels::matmul::{linear, PassKind};
use lockstep_engine::{Bf16, Float, KvCache, Model};
use std::path::Path;
use std::time::Instant;

/// How the buffer is read: as the test's passes that prefetch 8 KiB ahead, the kind that reads
/// fastest at this machine's fast memory level (`lockstep_engine::bandwidth`'s docs).
const BUFFER_READ: Read = Read::Prefetched { ahead: 8 << 10 };

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("MODEL_DIR");
    let rounds: usize = args.next().map_or(12, |r| r.parse().expect("ROUNDS"));
    let m = Model::load(Path::new(&dir)).expect("model");
    m.code_bf16_matrices();
    let mut mats: Vec<_> = m.layers.iter().flat_map(|l| l.linears()).collect();
    mats.push(&m.lm_head);
    // Each matrix's coded groups, as words (the coding starts each matrix on 64 bytes).
    let coded: Vec<&[u64]> = mats
        .iter()
        .map(|w| {
            let c = w.coded().expect("a BF16 matrix the decode step codes");
            // SAFETY: the groups are `bytes()` bytes from the first group, 64-byte aligned,
            // and live as long as the model.
            unsafe { std::slice::from_raw_parts(c.group_ptr(0, 0).cast::<u64>(), c.bytes() / 8) }
        })
        .collect();
    let total: usize = coded.iter().map(|s| s.len() * 8).sum();
    // The matrices lie one after another in one region: its span, summed in halves.
    let lo = coded.iter().map(|s| s.as_ptr() as usize).min().unwrap();
    let hi = coded
        .iter()
        .map(|s| s.as_ptr() as usize + s.len() * 8)
        .max()
        .unwrap();
    // The matrices are coded together, one after another 64 bytes apart at most.
    assert!(
        hi - lo < total + 64 * coded.len(),
        "the codings lie in one region"
    );
    // SAFETY: the span lies inside the coding's one region (`code_bf16_matrices`, checked above).
    let region: &[u64] = unsafe { std::slice::from_raw_parts(lo as *const u64, (hi - lo) / 8) };
    // `lockstep bench`'s test buffer.
    let test = TestBuffer::new().expect("the read test's buffer");
    let buffer = test.words();
    let threads = lockstep_engine::bandwidth::threads();
    println!(
        "{} matrices, {:.3} GB coded ({:.3} GB span); {threads} threads",
        mats.len(),
        total as f64 / 1e9,
        (hi - lo) as f64 / 1e9
    );

    let widest = m.config.intermediate_size.max(m.config.hidden_size);
    let x: Vec<Bf16> = (0..widest)
        .map(|i| Bf16::from_f64(((i * 7919) % 1000) as f64 / 1000.0 - 0.5).to_act_dtype())
        .collect();
    let mut out = vec![Bf16::ZERO; m.config.vocab_size.max(widest)];
    let mut cache = KvCache::<Bf16>::new(m.config.num_layers);
    m.forward_last::<Bf16>(&[1, 2, 3, 4], &mut cache)
        .expect("prompt");

    let names = [
        "step",
        "products",
        "plain loops",
        "plain halves",
        "512 MiB buffer",
    ];
    let mut rates: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let reps = 4;
    for round in 0..=rounds {
        let mut line = vec![];
        for (v, rate) in rates.iter_mut().enumerate() {
            let bytes = match v {
                3 => region.len() * 8,
                4 => buffer.len() * 8,
                _ => total,
            };
            let t = Instant::now();
            for r in 0..reps {
                match v {
                    0 => {
                        let token = (r as u32 * 13 + round as u32) % 1000;
                        m.forward_last::<Bf16>(&[token], &mut cache).expect("step");
                    }
                    1 => lockstep_engine::team::lead(|| {
                        for w in &mats {
                            let (rows, k) = (w.shape[0], w.shape[1]);
                            linear(PassKind::Decode, &x[..k], 1, w, None, &mut out[..rows]);
                        }
                    }),
                    2 => lockstep_engine::team::lead(|| {
                        for s in &coded {
                            let per = s.len().div_ceil(2 * threads).next_multiple_of(8);
                            lockstep_engine::team::for_each(s.len().div_ceil(per), |t| {
                                let part = &s[t * per..((t + 1) * per).min(s.len())];
                                std::hint::black_box(sum_words(part));
                            });
                        }
                    }),
                    3 => {
                        std::hint::black_box(sum_in_parts(region, threads, Read::Plain));
                    }
                    _ => {
                        std::hint::black_box(sum_in_parts(buffer, threads, BUFFER_READ));
                    }
                }
            }
            let gbs = (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
            line.push(format!("{} {gbs:.1}", names[v]));
            // Round 0 warms up (faults the buffer in, fills the cache).
            if round > 0 {
                rate.push(gbs);
            }
        }
        if round > 0 {
            println!("round {round}: {} GB/s", line.join(", "));
        }
    }
    let med: Vec<f64> = rates.iter().map(|r| median(r.clone())).collect();
    let ratio =
        |a: usize, b: usize| median(rates[a].iter().zip(&rates[b]).map(|(x, y)| x / y).collect());
    let line: Vec<String> = names
        .iter()
        .zip(&med)
        .map(|(n, r)| format!("{n} {r:.1}"))
        .collect();
    println!("medians: {} GB/s", line.join(", "));
    println!(
        "round by round (medians): products / plain loops {:.0}%, step / products {:.0}%, step / plain halves {:.0}%, plain loops / plain halves {:.0}%, step / 512 MiB buffer {:.0}%",
        100.0 * ratio(1, 2),
        100.0 * ratio(0, 1),
        100.0 * ratio(0, 3),
        100.0 * ratio(2, 3),
        100.0 * ratio(0, 4)
    );
}
