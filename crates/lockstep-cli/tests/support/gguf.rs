//! Helpers of the GGUF tests: what `transformers` loads from GGUF files, checked against lockstep.

use super::reference;
use lockstep_engine::Model;
use serde_json::Value;
use std::path::Path;

/// A path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every JSON line of `gguf-weights` for these files.
pub fn transformers_weights(py: &Path, files: &[&Path], save: Option<&Path>) -> Vec<Value> {
    let mut args = vec!["gguf-weights", "--gguf"];
    args.extend(files.iter().map(|f| s(f)));
    if let Some(d) = save {
        args.extend(["--save", s(d)]);
    }
    reference(py, &args)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("gguf-weights JSON"))
        .collect()
}

/// Checks lockstep's GGUF load of `file` against what transformers loaded (`theirs`); returns
/// (tensors compared, parameters).
pub fn check_weights(file: &Path, theirs: &Value) -> (usize, u64) {
    let model = Model::load(file).unwrap_or_else(|e| panic!("load {}: {e}", file.display()));
    let c = &model.config;
    let sums = theirs["checksums"].as_object().unwrap();
    let tied = theirs["tied"].as_bool().unwrap();
    assert_eq!(c.tie_word_embeddings, tied, "{}: tied", file.display());
    let mut compared = 0;
    let mut params = 0u64;
    for (name, t) in &model.checkpoint.tensors {
        let want = sums
            .get(name)
            .unwrap_or_else(|| panic!("{}: transformers has no {name}", file.display()));
        assert_eq!(
            t.sha256_f32_hex(),
            want.as_str().unwrap(),
            "{}: {name} ({:?} {:?}) differs from what transformers loaded",
            file.display(),
            t.dtype,
            t.shape
        );
        compared += 1;
        params += t.numel() as u64;
    }
    for name in sums.keys() {
        let aliased = name == "lm_head.weight" && tied;
        assert!(
            model.checkpoint.contains(name) || aliased,
            "{}: transformers loaded {name}, lockstep did not",
            file.display()
        );
    }
    assert_eq!(params, theirs["parameter_count"].as_u64().unwrap());
    assert_eq!(params, c.parameter_count() as u64);
    assert_eq!(
        model.layers.iter().all(|l| l.qkv_bias.is_some()),
        theirs["qkv_bias"].as_bool().unwrap()
    );
    // The config lockstep derived from the metadata is the one transformers derived.
    let tc = &theirs["config"];
    let num = |k: &str| tc[k].as_u64().unwrap_or_else(|| panic!("config {k}: {tc}")) as usize;
    assert_eq!(c.hidden_size, num("hidden_size"));
    assert_eq!(c.intermediate_size, num("intermediate_size"));
    assert_eq!(c.num_layers, num("num_hidden_layers"));
    assert_eq!(c.num_heads, num("num_attention_heads"));
    assert_eq!(c.num_kv_heads, num("num_key_value_heads"));
    assert_eq!(c.vocab_size, num("vocab_size"));
    assert_eq!(c.max_position_embeddings, num("max_position_embeddings"));
    assert_eq!(c.rms_norm_eps, tc["rms_norm_eps"].as_f64().unwrap());
    let theta = tc["rope_parameters"]["rope_theta"]
        .as_f64()
        .or_else(|| tc["rope_theta"].as_f64())
        .unwrap();
    assert_eq!(c.rope_theta, theta);
    if let Some(d) = tc["head_dim"].as_u64() {
        assert_eq!(c.head_dim, d as usize);
    }
    (compared, params)
}
