//! The exact Qwen2.5-0.5B configuration (random bf16 weights, `fixtures/models/qwen2.5-0.5b-random`:
//! 24 layers, hidden 896, 14/2 heads, intermediate 4864, vocab 151936, tied embeddings, rope_theta
//! 1e6) loads and traces the prompt "Hello" ([9707]) in f32 with logits within 1e-4 of
//! `transformers` in f32 on the same weights.

mod support;

use lockstep_trace::Trace;
use std::time::Instant;
use support::*;

const MODEL: &str = "qwen2.5-0.5b-random";

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn qwen25_05b_hello_f32_matches_transformers() {
    let py = reference_python();
    let model = fixtures().join("models").join(MODEL);
    assert!(
        model.join("model.safetensors").exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh` (without --no-big)",
        model.display()
    );
    let m = model.to_str().unwrap();
    let dir = scratch("qwen05b");
    let ours_path = dir.join("ours-f32.safetensors");
    let ref_path = dir.join("ref-f32.safetensors");

    // Ours, from the prompt (the tokenizer must give [9707]).
    let t0 = Instant::now();
    let o = lockstep(&[
        "trace",
        "--model",
        m,
        "--prompt",
        "Hello",
        "--dtype",
        "f32",
        "--out",
        ours_path.to_str().unwrap(),
    ]);
    let wall = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "lockstep trace failed: {stderr}");
    eprintln!("lockstep trace on {MODEL} (\"Hello\", f32): {wall:.2}s wall; {stderr}");

    // In-process load + forward through the library, timed separately.
    let t1 = Instant::now();
    let loaded = lockstep_engine::Model::load(&model).expect("load");
    let load_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let mut cache = lockstep_engine::KvCache::<f32>::new(loaded.config.num_layers);
    let logits = loaded
        .forward(&[9707], &mut cache, &mut lockstep_engine::NoObserver)
        .expect("forward");
    let fwd_s = t2.elapsed().as_secs_f64();
    assert_eq!(logits.len(), loaded.config.vocab_size);
    let t3 = Instant::now();
    let fingerprint = loaded.checkpoint.fingerprint().expect("fingerprint");
    let fp_s = t3.elapsed().as_secs_f64();
    eprintln!(
        "library: load {load_s:.3}s (memory map), forward (1 token, f32, untraced) {fwd_s:.3}s, \
         load+forward {:.3}s; model fingerprint (sha256 of all weights, part of every trace) {fp_s:.3}s",
        load_s + fwd_s
    );

    reference(
        &py,
        &[
            "trace",
            "--model",
            m,
            "--tokens",
            "9707",
            "--dtype",
            "f32",
            "--out",
            ref_path.to_str().unwrap(),
        ],
    );

    let ours = Trace::read(&ours_path).unwrap();
    let theirs = Trace::read(&ref_path).unwrap();
    assert_eq!(
        ours.get("tokens").unwrap().data.to_f64(),
        vec![9707.0],
        "\"Hello\" must tokenize to [9707]"
    );
    assert_eq!(ours.get("tokens"), theirs.get("tokens"));
    assert_eq!(
        ours.metadata.get("model_fingerprint"),
        theirs.metadata.get("model_fingerprint"),
        "both sides must have read the same weights and config"
    );
    assert_eq!(ours.metadata.get("model_fingerprint"), Some(&fingerprint));
    assert_eq!(ours.names(), theirs.names(), "traced tensor names differ");
    let logits_shape = &ours.get("logits").unwrap().shape;
    assert_eq!(logits_shape, &[1, 1, 151936]);

    // The untraced library forward computes the same logits as the traced CLI run.
    let traced = ours.get("logits").unwrap().data.to_f64();
    let untraced_diff = traced
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0.0, f64::max);
    assert_eq!(untraced_diff, 0.0, "traced and untraced logits differ");

    let diff = max_abs_diff(&ours, &theirs, "logits");
    let scale = max_abs(&theirs, "logits");
    let top = |t: &Trace| {
        let l = t.get("logits").unwrap().data.to_f64();
        (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap()
    };
    eprintln!(
        "{MODEL} f32 logits: max |ours - transformers| = {diff:.3e} (max |logit| {scale:.3}); top-1 ours {} transformers {}",
        top(&ours),
        top(&theirs)
    );
    assert!(
        diff <= 1e-4,
        "f32 logits differ from transformers by {diff:e} > 1e-4"
    );
    assert_eq!(top(&ours), top(&theirs), "top-1 token differs");
}
