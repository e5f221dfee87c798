//! Damaged safetensors: truncated, corrupt header, missing tensor, unsupported dtype, wrong shape.

use super::*;

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn truncated_weights() {
    reference_python();
    let m = model_copy("truncated");
    let p = m.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    for keep in [bytes.len() - 100, bytes.len() / 2] {
        std::fs::write(&p, &bytes[..keep]).unwrap();
        trace_fails(&m, &TOKENS, &["model.safetensors", "truncated"]);
    }
    std::fs::write(&p, &bytes[..100]).unwrap();
    trace_fails(
        &m,
        &TOKENS,
        &["model.safetensors", "header length", "truncated"],
    );
    std::fs::write(&p, &bytes[..7]).unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", "7 bytes", "truncated"]);
    std::fs::write(&p, b"").unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", "0 bytes"]);
    // Extra bytes after the data.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 16]);
    std::fs::write(&p, &longer).unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", "trailing bytes"]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn corrupt_header() {
    reference_python();
    let m = model_copy("corrupt-header");
    let p = m.join("model.safetensors");
    let good = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    // Garbage where the JSON header should be.
    let mut bad = good.clone();
    for b in &mut bad[8..8 + n] {
        *b = b'!';
    }
    std::fs::write(&p, &bad).unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", "invalid safetensors"]);

    // Valid JSON of the wrong form.
    let mut bad = good.clone();
    let text = format!("{:<width$}", "[1, 2, 3]", width = n);
    bad[8..8 + n].copy_from_slice(text.as_bytes());
    std::fs::write(&p, &bad).unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", "invalid safetensors"]);

    // Absurd header lengths: beyond any limit, and beyond the file.
    for len in [u64::MAX, 1 << 40, good.len() as u64] {
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        trace_fails(
            &m,
            &TOKENS,
            &["model.safetensors", "invalid safetensors", &len.to_string()],
        );
    }

    // Offsets that point past the data.
    let raw = good;
    let mut header: Map<String, Value> = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let (victim, first) = header
        .iter_mut()
        .find(|(k, _)| *k != "__metadata__")
        .unwrap();
    let victim = victim.clone();
    first["data_offsets"][1] = json!(1u64 << 50);
    let text = serde_json::to_string(&header).unwrap();
    let mut bad = (text.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(text.as_bytes());
    bad.extend_from_slice(&raw[8 + n..]);
    std::fs::write(&p, &bad).unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors", &victim, "data_offsets"]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn missing_tensor() {
    reference_python();
    let m = model_copy("missing-tensor");
    for name in [
        "model.layers.1.self_attn.k_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
    ] {
        std::fs::copy(
            fixtures()
                .join("models")
                .join(FIXTURE)
                .join("model.safetensors"),
            m.join("model.safetensors"),
        )
        .unwrap();
        edit_weights(&m, |e| {
            let before = e.len();
            e.retain(|t| t.name != name);
            assert_eq!(e.len(), before - 1, "{name} not in the fixture");
        });
        trace_fails(&m, &TOKENS, &[name, "missing"]);
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn unsupported_tensor_dtype() {
    reference_python();
    let m = model_copy("dtype");
    edit_weights(&m, |e| {
        let t = e
            .iter_mut()
            .find(|t| t.name == "model.norm.weight")
            .unwrap();
        assert_eq!(t.dtype, "F32");
        t.dtype = "I32".into();
    });
    trace_fails(&m, &TOKENS, &["model.norm.weight", "dtype", "I32"]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn tensor_shape_disagrees_with_config() {
    reference_python();
    let m = model_copy("shape");
    edit_config(&m, |c| {
        c.insert("intermediate_size".into(), json!(320));
    });
    trace_fails(
        &m,
        &TOKENS,
        &["model.layers.0.mlp.gate_proj.weight", "shape", "320"],
    );

    let m = model_copy("shape-vocab");
    edit_config(&m, |c| {
        c.insert("vocab_size".into(), json!(4096));
    });
    trace_fails(&m, &TOKENS, &["model.embed_tokens.weight", "shape", "4096"]);

    // A stored tensor of the wrong shape (the config untouched).
    let m = model_copy("shape-tensor");
    edit_weights(&m, |e| {
        let t = e
            .iter_mut()
            .find(|t| t.name == "model.layers.1.self_attn.v_proj.bias")
            .unwrap();
        let n = t.shape[0];
        t.shape = vec![n / 2, 2];
    });
    trace_fails(
        &m,
        &TOKENS,
        &["model.layers.1.self_attn.v_proj.bias", "shape"],
    );

    // More layers in the config than in the file.
    let m = model_copy("shape-layers");
    edit_config(&m, |c| {
        c.insert("num_hidden_layers".into(), json!(3));
        // transformers' config requires one layer type per layer.
        c.insert("layer_types".into(), json!(vec!["full_attention"; 3]));
    });
    trace_fails(&m, &TOKENS, &["model.layers.2.", "missing"]);
}
