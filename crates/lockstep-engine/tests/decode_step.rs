//! `sequence::decode_step`: rows of different lengths, each with its own cache and position,
//! decoded together, give bit for bit the logits each row gives alone (f64, f32 and bf16), step
//! after step, also after a row leaves the batch; with four rows, and with twelve on bf16 weights
//! and experts (more than the eight tokens from which a bf16 product once switched to AMX tiles
//! on such CPUs, which the step then avoided by splitting its batch: a step is now a
//! `PassKind::Decode` pass at any size).

mod common;
use common::{bits, fixture_model, uneven_prompts};
use lockstep_engine::sequence::decode_step;
use lockstep_engine::{Bf16, Float, KvCache, Model};

fn check<T: Float>(m: &Model, copies: usize) {
    let vocab = m.config.vocab_size;
    // The uneven prompts `copies` times, with other ids each time.
    let prompts: Vec<Vec<u32>> = (0..copies)
        .flat_map(|c| {
            uneven_prompts(vocab).into_iter().map(move |p| {
                p.iter()
                    .map(|&t| ((t as usize + 7 * c) % vocab) as u32)
                    .collect()
            })
        })
        .collect();
    let next = |r: usize, step: usize| ((r * 53 + step * 301 + 11) % vocab) as u32;
    let layers = m.config.num_layers;
    // Together: each prompt prefilled alone, then decode steps over all rows; row 1 leaves
    // after step 2.
    let mut caches: Vec<KvCache<T>> = Vec::new();
    for p in &prompts {
        let mut c = KvCache::new(layers);
        m.forward_last::<T>(p, &mut c).unwrap();
        caches.push(c);
    }
    let mut rows: Vec<usize> = (0..prompts.len()).collect();
    let mut together: Vec<Vec<Vec<u64>>> = vec![vec![]; prompts.len()];
    for step in 0..5 {
        if step == 3 {
            rows.remove(1);
            caches.remove(1);
        }
        let toks: Vec<u32> = rows.iter().map(|&r| next(r, step)).collect();
        let logits = decode_step::<T>(m, &toks, &mut caches).unwrap();
        for (&r, l) in rows.iter().zip(logits.chunks(vocab)) {
            together[r].push(bits(l));
        }
    }
    // Alone.
    for (r, p) in prompts.iter().enumerate() {
        let mut c = KvCache::<T>::new(layers);
        m.forward_last::<T>(p, &mut c).unwrap();
        for (step, want) in together[r].iter().enumerate() {
            let l = m.forward_last::<T>(&[next(r, step)], &mut c).unwrap();
            assert!(
                bits(&l) == *want,
                "row {r}, step {step}: batched logits differ from alone"
            );
        }
        assert_eq!(together[r].len(), if r == 1 { 3 } else { 5 });
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn decode_step_rows_equal_each_row_alone() {
    let m = fixture_model("qwen2-gqa");
    check::<f64>(&m, 1);
    check::<f32>(&m, 1);
    check::<Bf16>(&m, 1);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn decode_step_of_many_rows_equals_each_row_alone() {
    for name in ["qwen2-gqa-bf16", "qwen3-moe-small"] {
        let m = fixture_model(name);
        check::<f32>(&m, 3);
        check::<Bf16>(&m, 3);
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn decode_step_refuses_mismatched_inputs() {
    let m = fixture_model("qwen2-gqa");
    let mut caches = vec![KvCache::<f32>::new(m.config.num_layers)];
    assert!(decode_step::<f32>(&m, &[1, 2], &mut caches).is_err());
    assert!(decode_step::<f32>(&m, &[], &mut []).is_err());
    let bad = m.config.vocab_size as u32;
    assert!(decode_step::<f32>(&m, &[bad], &mut caches).is_err());
}
