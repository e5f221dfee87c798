//! Streaming the layers through the page cache (`Model::stream_layers`: read the next layer
//! ahead, drop the one behind) never changes a value: a traced prefill and KV-cache decode steps
//! give bit for bit the same tensors and logits with streaming on as off, on safetensors fixtures
//! (dense, GQA, MoE) and a quantized GGUF whose layers are large enough for pages to be dropped.

use lockstep_engine::{Bf16, Float, KvCache, Model, TraceRecorder};
use std::path::PathBuf;

/// A fixture by path under `fixtures/`, its weights left memory-mapped (not copied into huge
/// pages, where there are no pages to drop). Missing fixtures fail the test.
fn load(rel: &str) -> Model {
    // Every test of this file sets the same value.
    std::env::set_var(lockstep_engine::weights::huge_pages::ENV, "off");
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel);
    assert!(
        p.exists(),
        "fixture {} is missing: run scripts/fixtures.sh",
        p.display()
    );
    let m = Model::load(&p).unwrap();
    assert!(
        m.layers
            .iter()
            .flat_map(|l| l.tensors())
            .all(|t| !t.in_huge_pages()),
        "{rel}"
    );
    m
}

/// Every traced tensor of a prefill, then the logits of three decode steps, as bits.
fn run<T: Float>(m: &Model) -> Vec<(String, Vec<u64>)> {
    let vocab = m.config.vocab_size;
    let prompt: Vec<u32> = (0..9).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let mut rec = TraceRecorder::default();
    let mut cache = KvCache::<T>::new(m.config.num_layers);
    m.forward(&prompt, &mut cache, &mut rec).unwrap();
    let mut out: Vec<(String, Vec<u64>)> = rec
        .trace
        .names()
        .into_iter()
        .map(|n| {
            let t = rec.trace.get(n).unwrap();
            let bits = t.data.to_f64().iter().map(|v| v.to_bits()).collect();
            (n.to_string(), bits)
        })
        .collect();
    assert!(out.len() > 10, "{} taps", out.len());
    for step in 0..3 {
        let l = m
            .forward_last::<T>(&[((step * 301 + 11) % vocab) as u32], &mut cache)
            .unwrap();
        out.push((
            format!("decode step {step}"),
            l.iter().map(|v| v.to_f64().to_bits()).collect(),
        ));
    }
    out
}

fn same_with_and_without_streaming<T: Float>(m: &mut Model, what: &str) {
    m.stream_layers = false;
    let off = run::<T>(m);
    m.stream_layers = true;
    // Twice: the second pass reads back pages the first one dropped.
    for pass in 0..2 {
        let on = run::<T>(m);
        assert_eq!(on.len(), off.len());
        for ((name, a), (_, b)) in on.iter().zip(&off) {
            assert!(
                a == b,
                "{what} {}: {name} differs with streaming on (pass {pass})",
                T::PRECISION.as_str()
            );
        }
    }
    m.stream_layers = false;
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the fixtures: bash scripts/test.sh"
)]
fn streaming_the_layers_changes_no_value() {
    let mut m = load("models/qwen2-gqa");
    same_with_and_without_streaming::<f64>(&mut m, "qwen2-gqa");
    same_with_and_without_streaming::<f32>(&mut m, "qwen2-gqa");
    same_with_and_without_streaming::<Bf16>(&mut m, "qwen2-gqa");
    let mut m = load("models/qwen3-moe-small");
    same_with_and_without_streaming::<f32>(&mut m, "qwen3-moe-small");
    let mut m = load("gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    // Its layer matrices span many 64 KiB blocks, so pages really are dropped and read back.
    let big = m.layers[0]
        .tensors()
        .iter()
        .filter(|t| t.mapped_bytes() >= 4 << 16)
        .count();
    assert!(big >= 3, "{big} mapped matrices of 256 KiB or more");
    same_with_and_without_streaming::<f32>(&mut m, "SmolLM2 Q4_1 GGUF");
}
