//! Damaged or absurd config.json, missing files and an unwritable output.

use super::*;

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn invalid_config() {
    reference_python();
    let m = model_copy("config");
    let cfg = m.join("config.json");
    let good = std::fs::read_to_string(&cfg).unwrap();

    std::fs::write(&cfg, "this is { not json").unwrap();
    trace_fails(&m, &TOKENS, &["config.json", "JSON"]);
    std::fs::write(&cfg, "").unwrap();
    trace_fails(&m, &TOKENS, &["config.json", "JSON"]);
    std::fs::write(&cfg, "[1, 2]").unwrap();
    trace_fails(&m, &TOKENS, &["config.json", "object"]);

    let cases: Vec<(&str, Box<ConfigEdit>, &[&str])> = vec![
        (
            "missing hidden_size",
            Box::new(|c| {
                c.remove("hidden_size");
            }),
            &["config.json", "hidden_size"],
        ),
        (
            "hidden_size is a string",
            Box::new(|c| {
                c.insert("hidden_size".into(), json!("128"));
            }),
            &["hidden_size"],
        ),
        (
            "hidden_size zero",
            Box::new(|c| {
                c.insert("hidden_size".into(), json!(0));
            }),
            &["hidden_size"],
        ),
        (
            "unsupported architecture",
            Box::new(|c| {
                c.insert("architectures".into(), json!(["GemmaForCausalLM"]));
                c.insert("model_type".into(), json!("gemma"));
            }),
            &["config.json", "architecture", "GemmaForCausalLM"],
        ),
        (
            "rope_parameters longrope",
            Box::new(|c| {
                c.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}),
                );
            }),
            &["config.json", "longrope"],
        ),
        (
            "v4 rope_scaling llama3 without high_freq_factor",
            Box::new(|c| {
                c.remove("rope_parameters");
                c.insert("rope_theta".into(), json!(10000.0));
                c.insert(
                    "rope_scaling".into(),
                    json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 32768}),
                );
            }),
            &["config.json", "llama3", "high_freq_factor"],
        ),
        (
            "sliding layers with the window off (transformers fails building their mask)",
            Box::new(|c| {
                c.insert("use_sliding_window".into(), json!(false));
                c.insert(
                    "layer_types".into(),
                    json!(["sliding_attention", "full_attention"]),
                );
            }),
            &["config.json", "sliding"],
        ),
        (
            "heads not a multiple of kv heads",
            Box::new(|c| {
                c.insert("num_key_value_heads".into(), json!(3));
            }),
            &["num_key_value_heads"],
        ),
        (
            "gelu",
            Box::new(|c| {
                c.insert("hidden_act".into(), json!("gelu"));
            }),
            &["hidden_act", "gelu"],
        ),
    ];
    for (what, edit, needles) in cases {
        std::fs::write(&cfg, &good).unwrap();
        edit_config(&m, edit);
        let msg = trace_fails(&m, &TOKENS, needles);
        eprintln!("{what}: {msg}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn absurd_config_sizes_do_not_panic() {
    reference_python();
    let m = model_copy("config-absurd");
    let cfg = m.join("config.json");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let big = json!(u64::MAX / 2);
    for key in [
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "num_attention_heads",
        "head_dim",
    ] {
        std::fs::write(&cfg, &good).unwrap();
        edit_config(&m, |c| {
            c.insert(key.into(), big.clone());
        });
        let msg = trace_fails(&m, &TOKENS, &[]);
        eprintln!("{key} huge: {msg}");
    }
}

/// A layer count that is large but whose parameter count does not overflow: `Model::load`
/// reserves `Vec::with_capacity(num_hidden_layers)` before looking at the checkpoint, so this
/// aborts with "memory allocation of 67200000000 bytes failed" instead of naming the missing
/// layer. Needs `model.rs` to grow the layer list as it finds layers (e.g. `Vec::new()`).
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn huge_layer_count_does_not_abort() {
    reference_python();
    let m = model_copy("config-many-layers");
    edit_config(&m, |c| {
        c.insert("num_hidden_layers".into(), json!(40_000u64));
        // Without layer_types (v4 configs): a per-layer list would be refused for its length.
        c.remove("layer_types");
    });
    trace_fails(&m, &TOKENS, &["model.layers.2.", "missing"]);
    // Beyond any real model: refused by the config itself.
    edit_config(&m, |c| {
        c.insert("num_hidden_layers".into(), json!(100_000_000u64));
    });
    trace_fails(&m, &TOKENS, &["num_hidden_layers", "beyond"]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn missing_files() {
    reference_python();
    let m = model_copy("missing-config");
    std::fs::remove_file(m.join("config.json")).unwrap();
    trace_fails(&m, &TOKENS, &["config.json", "not found"]);

    let m = model_copy("missing-weights");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", "not found"]);

    let m = model_copy("missing-tokenizer");
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    trace_fails(&m, &["--prompt", "Hello"], &["tokenizer.json", "not found"]);
    fails(
        &["tokenize", "--model", s(&m), "--text", "Hello"],
        &["tokenizer.json", "not found"],
    );
    // Token ids need no tokenizer.
    trace_ok(&m, &TOKENS);

    let m = model_copy("corrupt-tokenizer");
    std::fs::write(m.join("tokenizer.json"), "{\"model\": 17}").unwrap();
    trace_fails(&m, &["--prompt", "Hello"], &["tokenizer"]);

    let gone = scratch("bad-no-dir").kept().join("does-not-exist");
    trace_fails(&gone, &TOKENS, &["does-not-exist", "not found"]);
    trace_fails(
        &gone,
        &["--prompt", "Hello"],
        &["does-not-exist", "not found"],
    );
    fails(
        &["tokenize", "--model", s(&gone), "--text", "Hello"],
        &["does-not-exist", "not found", "model folder"],
    );

    // A file where the model folder should be.
    let f = scratch("bad-file-as-dir").kept().join("model");
    std::fs::write(&f, "not a folder").unwrap();
    trace_fails(&f, &TOKENS, &["not found"]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn unwritable_output() {
    reference_python();
    let m = model_copy("unwritable-out");
    let out = m.parent().unwrap().join("no-such-dir/out.safetensors");
    fails(
        &[
            "trace",
            "--model",
            s(&m),
            "--tokens",
            "1,2",
            "--out",
            s(&out),
        ],
        &["no-such-dir"],
    );
    assert!(!out.exists());
}
