//! Llama 3 GGUF files as llama.cpp's converter writes them, against `transformers` on the
//! original safetensors checkpoints.

mod support;

use lockstep_engine::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};
use support::gguf::*;
use support::*;

/// Llama 3 checkpoints (`rope_scaling` of type `llama3`; untied float32 with Llama 3.1's factor 8,
/// tied bfloat16 with Llama 3.2's factor 32; 2048-token vocabularies) written as GGUF the way llama.cpp's converter writes
/// them: no scaling metadata, a `rope_freqs.weight` of per-frequency divisors. lockstep rebuilds
/// the `llama3` parameters from it; `transformers` 5.24's GGUF loader drops the tensor and runs
/// plain RoPE, so the parity reference is the original safetensors checkpoint in `transformers`:
/// the weights are bit-identical to what transformers loads from the GGUF, the RoPE scaling is the
/// safetensors config's, and lockstep's run of the GGUF equals its run of the safetensors bit for
/// bit in the f32 and bf16 tiers on 300 tokens (f64: within 1e-9 of pure-f64 transformers on the safetensors;
/// the GGUF stores `rms_norm_eps` as float32, so f64 is not bit-identical).
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn llama3_rope_scaling_loads_from_gguf() {
    let py = reference_python();
    let dir = scratch("gguf-llama3");
    // (fixture, the 2-D weight type, the tiers)
    let cases = [
        ("llama3-rope-small", "f32", &["f32", "f64"][..]),
        (
            "llama3-rope-tied-bf16-small",
            "bf16",
            &["bf16", "f32", "f64"][..],
        ),
    ];
    let mut files = vec![];
    let mut jobs = vec![];
    for (name, ty, _) in cases {
        let st = fixtures().join("models").join(name);
        assert!(
            st.join("model.safetensors").exists(),
            "fixture {name} missing: bash scripts/fixtures.sh"
        );
        let gguf = dir.join(format!("{name}.gguf"));
        let types = reference(
            &py,
            &[
                "gguf-make",
                "--model",
                s(&st),
                "--out",
                s(&gguf),
                "--types",
                ty,
            ],
        );
        let types: Value = serde_json::from_str(types.lines().last().unwrap()).unwrap();
        assert_eq!(types["rope_freqs.weight"], "F32", "{name}: {types}");
        files.push(gguf);
        let vocab = Model::load(&st).unwrap().config.vocab_size;
        for dt in ["f64", "f32"] {
            jobs.push(
                serde_json::json!({"model": st, "tokens": token_ids(300, vocab, 11),
                "dtype": dt, "out": dir.join(format!("{name}-ref-{dt}.safetensors"))}),
            );
        }
    }
    // transformers: its GGUF load of both files, and its runs of the safetensors checkpoints.
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let theirs = transformers_weights(&py, &refs, None);
    let spec = dir.join("jobs.json");
    std::fs::write(&spec, Value::Array(jobs).to_string()).unwrap();
    reference(&py, &["trace-batch", s(&spec)]);
    for (((name, _, tiers), gguf), theirs) in cases.iter().zip(&files).zip(&theirs) {
        let st = fixtures().join("models").join(name);
        // Weights: bit-identical to what transformers loads from the file; its config has no
        // RoPE scaling (it ignores rope_freqs.weight), ours has the safetensors config's.
        let (n, params) = check_weights(gguf, theirs);
        let their_rope = &theirs["config"]["rope_parameters"];
        assert_eq!(their_rope["rope_type"], "default", "{name}: {their_rope}");
        let from_gguf = Model::load(gguf).unwrap();
        let from_st = Model::load(&st).unwrap();
        assert_eq!(
            from_gguf.config.rope_scaling, from_st.config.rope_scaling,
            "{name}"
        );
        assert_eq!(
            from_gguf.config.rope_theta, from_st.config.rope_theta,
            "{name}"
        );
        assert!(matches!(
            from_gguf.config.rope_scaling,
            lockstep_engine::kernels::rope::RopeScaling::Llama3 { .. }
        ));
        assert_eq!(
            from_gguf.config.tie_word_embeddings,
            from_st.config.tie_word_embeddings
        );
        eprintln!(
            "{name}: {n} tensors bit-identical to transformers' GGUF load, {params} parameters, rope {:?}",
            from_gguf.config.rope_scaling
        );
        let ids = ids_arg(&token_ids(300, from_st.config.vocab_size, 11));
        let read = |f: String| lockstep_trace::Trace::read(&dir.join(f)).unwrap();
        for &dtype in *tiers {
            let ours_of = |model: &Path, who: &str| {
                let f = format!("{name}-{who}-{dtype}.safetensors");
                trace_to(model, &ids, dtype, &dir.join(&f));
                read(f)
            };
            let ours = ours_of(gguf, "gguf");
            let same = ours_of(&st, "st");
            let logits = max_abs_diff(&ours, &same, "logits");
            if dtype == "f64" {
                let oracle = read(format!("{name}-ref-f64.safetensors"));
                let d = max_abs_diff(&ours, &oracle, "logits");
                eprintln!("{name} f64, 300 tokens: GGUF vs pure-f64 transformers on the safetensors {d:.2e}, vs lockstep on the safetensors {logits:.2e}");
                assert!(
                    d <= 1e-9,
                    "{name}: f64 logits differ from the reference by {d:e}"
                );
                continue;
            }
            for t in same.names() {
                assert_eq!(
                    max_abs_diff(&ours, &same, t),
                    0.0,
                    "{name} {dtype}: {t} differs between the GGUF and the safetensors run"
                );
            }
            if dtype == "f32" {
                let r = read(format!("{name}-ref-f32.safetensors"));
                let d = max_abs_diff(&ours, &r, "logits");
                eprintln!("{name} f32, 300 tokens: GGUF bit-identical to the safetensors run; vs transformers f32 on the safetensors {d:.2e}");
                assert!(
                    d <= 1e-4,
                    "{name}: f32 logits differ from transformers by {d:e}"
                );
            } else {
                eprintln!("{name} {dtype}, 300 tokens: GGUF bit-identical to the safetensors run");
            }
        }
    }
}
