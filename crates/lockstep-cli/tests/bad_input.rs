//! Damaged checkpoints, configs and arguments: every one gives a one-line `error: ...` on stderr
//! naming the problem, a non-zero exit, no panic, and no output file.
//!
//! Each damaged model is a copy of the small `qwen2-gqa` fixture (config.json, model.safetensors,
//! tokenizer.json) in a scratch folder, damaged in one way. Safetensors files are rewritten by
//! hand (8-byte little-endian header length, JSON header, data) so the tests need no extra crate.

mod support;

use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use support::*;

const FIXTURE: &str = "qwen2-gqa";

/// A copy of the fixture model in `target/test-scratch/bad-<name>/model`.
fn model_copy(name: &str) -> PathBuf {
    let src = fixtures().join("models").join(FIXTURE);
    let dir = scratch(&format!("bad-{name}")).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    dir
}

/// Where a failing run was told to write its trace (never created).
fn out_of(model: &Path) -> PathBuf {
    model.parent().unwrap().join("out.safetensors")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `lockstep ARGS`, expects a clean failure whose message contains every needle
/// (case-insensitive), and returns the message.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = lockstep(args);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "lockstep {args:?} panicked:\n{stderr}"
    );
    assert!(
        !o.status.success(),
        "lockstep {args:?} succeeded but should fail; stderr:\n{stderr}"
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "lockstep {args:?}: exit status {:?}; stderr:\n{stderr}",
        o.status
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "lockstep {args:?}: expected exactly one error line, got:\n{stderr}"
    );
    let line = lines[0];
    assert!(line.starts_with("error: "), "not an error line: {line}");
    let lower = line.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "lockstep {args:?}: error does not mention {n:?}: {line}"
        );
    }
    eprintln!("{line}");
    line.to_string()
}

/// `lockstep trace` on `model` with `input` (e.g. `["--tokens", "1,2"]`) must fail naming
/// `needles`, and write no trace.
fn trace_fails(model: &Path, input: &[&str], needles: &[&str]) -> String {
    let out = out_of(model);
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["trace", "--model", s(model)];
    args.extend_from_slice(input);
    args.extend_from_slice(&["--dtype", "f32", "--out", s(&out)]);
    let msg = fails(&args, needles);
    assert!(!out.exists(), "a failed run wrote {}: {msg}", out.display());
    msg
}

/// `lockstep trace` on `model` with `input` succeeds (the undamaged control).
fn trace_ok(model: &Path, input: &[&str]) -> PathBuf {
    let out = out_of(model);
    let mut args = vec!["trace", "--model", s(model)];
    args.extend_from_slice(input);
    args.extend_from_slice(&["--dtype", "f32", "--out", s(&out)]);
    lockstep_ok(&args);
    assert!(out.exists());
    out
}

// ---- safetensors by hand -------------------------------------------------------------------

/// One tensor of a safetensors file.
#[derive(Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    bytes: Vec<u8>,
}

/// Reads a safetensors file: its `__metadata__` (if any) and its tensors in file order.
fn read_st(path: &Path) -> (Option<Value>, Vec<Entry>) {
    let buf = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&buf[8..8 + n]).unwrap();
    let data = &buf[8 + n..];
    let mut meta = None;
    let mut entries = vec![];
    for (name, v) in header {
        if name == "__metadata__" {
            meta = Some(v);
            continue;
        }
        let off: Vec<usize> = v["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        entries.push((
            off[0],
            Entry {
                name,
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect(),
                bytes: data[off[0]..off[1]].to_vec(),
            },
        ));
    }
    entries.sort_by_key(|(o, _)| *o);
    (meta, entries.into_iter().map(|(_, e)| e).collect())
}

/// Writes a safetensors file (header padded with spaces to a multiple of 8, as the
/// `safetensors` library does).
fn write_st(path: &Path, meta: Option<&Value>, entries: &[Entry]) {
    let mut header = Map::new();
    if let Some(m) = meta {
        header.insert("__metadata__".into(), m.clone());
    }
    let mut data = vec![];
    for e in entries {
        let start = data.len();
        data.extend_from_slice(&e.bytes);
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut buf = (h.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(&h);
    buf.extend_from_slice(&data);
    std::fs::write(path, buf).unwrap();
}

/// Rewrites `model.safetensors` of `model` through `f`.
fn edit_weights(model: &Path, f: impl FnOnce(&mut Vec<Entry>)) {
    let p = model.join("model.safetensors");
    let (meta, mut entries) = read_st(&p);
    f(&mut entries);
    write_st(&p, meta.as_ref(), &entries);
}

/// Rewrites `config.json` of `model` through `f`.
fn edit_config(model: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let p = model.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Splits `model.safetensors` into two shards plus `model.safetensors.index.json`; returns the
/// shard names and which shard each tensor went to.
fn shard(model: &Path) -> (Vec<String>, Map<String, Value>) {
    let single = model.join("model.safetensors");
    let (meta, entries) = read_st(&single);
    std::fs::remove_file(&single).unwrap();
    let names = vec![
        "model-00001-of-00002.safetensors".to_string(),
        "model-00002-of-00002.safetensors".to_string(),
    ];
    let half = entries.len() / 2;
    let mut map = Map::new();
    for (i, part) in [&entries[..half], &entries[half..]].into_iter().enumerate() {
        write_st(&model.join(&names[i]), meta.as_ref(), part);
        for e in part {
            map.insert(e.name.clone(), Value::String(names[i].clone()));
        }
    }
    write_index(model, &map);
    (names, map)
}

fn write_index(model: &Path, map: &Map<String, Value>) {
    std::fs::write(
        model.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
}

const TOKENS: [&str; 2] = ["--tokens", "1,2,3"];

/// A change to config.json.
type ConfigEdit = dyn Fn(&mut Map<String, Value>);

// ---- the undamaged control -----------------------------------------------------------------

#[test]
fn undamaged_copy_and_hand_rewritten_weights_work() {
    if reference_python().is_none() {
        return;
    }
    let m = model_copy("control");
    let a = lockstep_trace::Trace::read(&trace_ok(&m, &TOKENS)).unwrap();
    // Reading and rewriting the file by hand changes nothing the model sees.
    edit_weights(&m, |_| {});
    let b = lockstep_trace::Trace::read(&trace_ok(&m, &TOKENS)).unwrap();
    assert_eq!(max_abs_diff(&a, &b, "logits"), 0.0);
    // A prompt goes through the tokenizer (the fixture's vocab is the first 2048 Qwen ids, so
    // the prompt must tokenize below that: "a b" is [64, 293]).
    trace_ok(&m, &["--prompt", "a b"]);
}

// ---- damaged safetensors -------------------------------------------------------------------

#[test]
fn truncated_weights() {
    if reference_python().is_none() {
        return;
    }
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
fn corrupt_header() {
    if reference_python().is_none() {
        return;
    }
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
fn missing_tensor() {
    if reference_python().is_none() {
        return;
    }
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
fn unsupported_tensor_dtype() {
    if reference_python().is_none() {
        return;
    }
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
fn tensor_shape_disagrees_with_config() {
    if reference_python().is_none() {
        return;
    }
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

// ---- config.json ---------------------------------------------------------------------------

#[test]
fn invalid_config() {
    if reference_python().is_none() {
        return;
    }
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
fn absurd_config_sizes_do_not_panic() {
    if reference_python().is_none() {
        return;
    }
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
fn huge_layer_count_does_not_abort() {
    if reference_python().is_none() {
        return;
    }
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
fn missing_files() {
    if reference_python().is_none() {
        return;
    }
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

    let gone = scratch("bad-no-dir").join("does-not-exist");
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
    let f = scratch("bad-file-as-dir").join("model");
    std::fs::write(&f, "not a folder").unwrap();
    trace_fails(&f, &TOKENS, &["not found"]);
}

#[test]
fn unwritable_output() {
    if reference_python().is_none() {
        return;
    }
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

// ---- bad token input -----------------------------------------------------------------------

#[test]
fn token_ids_out_of_range() {
    if reference_python().is_none() {
        return;
    }
    let m = model_copy("token-range");
    // vocab_size is 2048: the last id is fine, 2048 is not.
    trace_ok(&m, &["--tokens", "2047"]);
    trace_fails(&m, &["--tokens", "1,2048,3"], &["2048", "vocab"]);
    trace_fails(&m, &["--tokens", "4294967295"], &["4294967295", "vocab"]);
}

#[test]
fn prompt_longer_than_context() {
    if reference_python().is_none() {
        return;
    }
    let m = model_copy("context");
    edit_config(&m, |c| {
        c.insert("max_position_embeddings".into(), json!(8));
    });
    trace_ok(&m, &["--tokens", "1,2,3,4,5,6,7,8"]);
    trace_fails(
        &m,
        &["--tokens", "1,2,3,4,5,6,7,8,9"],
        &["9", "max_position_embeddings", "8"],
    );
    // A prompt that tokenizes to more than 8 tokens (all below the fixture's vocab of 2048).
    trace_fails(
        &m,
        &["--prompt", "a b c d e f g h i j"],
        &["10", "max_position_embeddings"],
    );
    // A prompt whose ids exceed the (small) vocabulary.
    trace_fails(&m, &["--prompt", "Hello"], &["9707", "vocab"]);
}

#[test]
fn garbled_tokens() {
    if reference_python().is_none() {
        return;
    }
    let m = model_copy("garbled");
    trace_fails(&m, &["--tokens", ""], &["--tokens", "empty"]);
    trace_fails(&m, &["--tokens", " , ,"], &["--tokens", "empty"]);
    trace_fails(&m, &["--tokens", "1,x,3"], &["--tokens", "1,x,3"]);
    trace_fails(&m, &["--tokens", "1;2;3"], &["--tokens"]);
    trace_fails(&m, &["--tokens=-1"], &["--tokens", "-1"]);
    trace_fails(&m, &["--tokens", "1.5"], &["--tokens"]);
    trace_fails(&m, &["--tokens", "4294967296"], &["--tokens", "4294967296"]);
    trace_fails(&m, &["--tokens", "[1,2]"], &["--tokens"]);
    // A prompt that tokenizes to nothing.
    trace_fails(&m, &["--prompt", ""], &["prompt", "no tokens"]);
}

// ---- sharded checkpoints -------------------------------------------------------------------

#[test]
fn sharded_checkpoint() {
    if reference_python().is_none() {
        return;
    }
    // Intact shards give the single-file result exactly.
    let single = model_copy("sharded-control-single");
    let want = lockstep_trace::Trace::read(&trace_ok(&single, &TOKENS)).unwrap();
    let m = model_copy("sharded-control");
    shard(&m);
    let got = lockstep_trace::Trace::read(&trace_ok(&m, &TOKENS)).unwrap();
    assert_eq!(max_abs_diff(&want, &got, "logits"), 0.0);

    // A shard missing.
    let m = model_copy("sharded-missing-shard");
    let (names, _) = shard(&m);
    std::fs::remove_file(m.join(&names[1])).unwrap();
    trace_fails(&m, &TOKENS, &[&names[1], "not found"]);

    // A shard truncated.
    let m = model_copy("sharded-truncated");
    let (names, _) = shard(&m);
    let p = m.join(&names[0]);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 10]).unwrap();
    trace_fails(&m, &TOKENS, &[&names[0], "truncated"]);

    // The index promises a tensor no shard holds.
    let m = model_copy("sharded-promised");
    let (names, mut map) = shard(&m);
    map.insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        Value::String(names[0].clone()),
    );
    write_index(&m, &map);
    trace_fails(
        &m,
        &TOKENS,
        &["model.layers.9.mlp.up_proj.weight", "missing"],
    );

    // A tensor the model needs is in neither shard nor the index.
    let m = model_copy("sharded-dropped");
    let (names, mut map) = shard(&m);
    let victim = "model.layers.1.self_attn.k_proj.bias";
    let holder = map.remove(victim).unwrap();
    write_index(&m, &map);
    let p = m.join(holder.as_str().unwrap());
    let (meta, mut entries) = read_st(&p);
    entries.retain(|e| e.name != victim);
    write_st(&p, meta.as_ref(), &entries);
    assert!(names.iter().any(|n| n == holder.as_str().unwrap()));
    trace_fails(&m, &TOKENS, &[victim, "missing"]);

    // The same tensor in two shards.
    let m = model_copy("sharded-duplicate");
    let (names, _) = shard(&m);
    let (_, first) = read_st(&m.join(&names[0]));
    let p = m.join(&names[1]);
    let (meta, mut entries) = read_st(&p);
    entries.push(first[0].clone());
    write_st(&p, meta.as_ref(), &entries);
    trace_fails(&m, &TOKENS, &[&first[0].name, "more than one shard"]);

    // An index that is not JSON, or has no weight_map.
    let m = model_copy("sharded-bad-index");
    shard(&m);
    let idx = m.join("model.safetensors.index.json");
    std::fs::write(&idx, "{ nope").unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors.index.json", "JSON"]);
    std::fs::write(&idx, "{\"metadata\": {}}").unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors.index.json", "weight_map"]);
    // A shard name that escapes the folder.
    std::fs::write(
        &idx,
        r#"{"weight_map": {"model.norm.weight": "../model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    trace_fails(&m, &TOKENS, &["model.safetensors.index.json", "shard"]);
}
