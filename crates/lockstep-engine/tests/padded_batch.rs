//! `Model::forward_batch` on left-padded rows: asked for each row's last logits only, it skips
//! the padding (only the real tokens go through the matmuls; the padding's keys and values are
//! cached as zeros, hidden by the key mask). Bit for bit what the padded pass gives (f64, f32
//! and bf16, on f32 and bf16 weights, a sliding window, experts): the last position's logits,
//! and a decode step after.

mod common;
use common::{bits, fixture_model, uneven_prompts};
use lockstep_engine::{BatchKvCache, Bf16, Float, LogitsFor, Model, PaddedBatch};

fn check<T: Float>(m: &Model, what: &str) {
    let vocab = m.config.vocab_size;
    let layers = m.config.num_layers;
    let prompts = uneven_prompts(vocab);
    let batch = PaddedBatch::left_padded(&prompts, 0);
    let next: Vec<u32> = (0..prompts.len()).map(|r| (r * 53 + 11) as u32).collect();
    let decode = |cache: &mut BatchKvCache<T>| {
        let l = m.forward_batch::<T>(&next, &vec![true; next.len()], cache, LogitsFor::Last);
        bits(&l.unwrap())
    };

    // Every position computed (the logits of all of them asked for).
    let mut padded = BatchKvCache::<T>::new(layers, prompts.len());
    let all = m
        .forward_batch::<T>(&batch.tokens, &batch.mask, &mut padded, LogitsFor::All)
        .unwrap();
    let width = batch.len;
    let want: Vec<u64> = (0..prompts.len())
        .flat_map(|b| bits(&all[((b + 1) * width - 1) * vocab..(b + 1) * width * vocab]))
        .collect();
    let cached = padded.len();
    let want_next = decode(&mut padded);

    // Each row's last logits only: the padding skipped.
    let mut skipped = BatchKvCache::<T>::new(layers, prompts.len());
    let last = m
        .forward_batch::<T>(&batch.tokens, &batch.mask, &mut skipped, LogitsFor::Last)
        .unwrap();
    assert_eq!(last.len(), prompts.len() * vocab);
    assert!(bits(&last) == want, "{what}: last logits differ");
    assert_eq!(skipped.len(), cached, "{what}: cached positions");
    assert!(
        decode(&mut skipped) == want_next,
        "{what}: the decode step after differs"
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn skipped_padding_gives_the_padded_pass_bits() {
    for name in [
        "qwen2-gqa",
        "qwen2-gqa-bf16",
        "mistral-swa",
        "qwen3-moe-small",
    ] {
        let m = fixture_model(name);
        check::<f64>(&m, &format!("{name} f64"));
        check::<f32>(&m, &format!("{name} f32"));
        check::<Bf16>(&m, &format!("{name} bf16"));
    }
}
