//! Damaged checkpoints, configs and arguments: every one gives a one-line `error: ...` on stderr
//! naming the problem, a non-zero exit, no panic, and no output file.
//!
//! Each damaged model is a copy of the small `qwen2-gqa` fixture (config.json, model.safetensors,
//! tokenizer.json) in a scratch folder, damaged in one way. Safetensors files are rewritten by
//! hand (8-byte little-endian header length, JSON header, data) so the tests need no extra crate.

#[path = "bad_input/damaged_config.rs"]
mod damaged_config;
#[path = "bad_input/damaged_weights.rs"]
mod damaged_weights;
#[path = "bad_input/safetensors_by_hand.rs"]
mod safetensors_by_hand;
mod support;

use safetensors_by_hand::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use support::*;

const FIXTURE: &str = "qwen2-gqa";

/// A copy of the fixture model in `target/test-scratch/bad-<name>/model`.
fn model_copy(name: &str) -> PathBuf {
    let src = fixtures().join("models").join(FIXTURE);
    let dir = scratch(&format!("bad-{name}")).kept().join("model");
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

const TOKENS: [&str; 2] = ["--tokens", "1,2,3"];

/// A change to config.json.
type ConfigEdit = dyn Fn(&mut Map<String, Value>);

// ---- the undamaged control -----------------------------------------------------------------

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn undamaged_copy_and_hand_rewritten_weights_work() {
    reference_python();
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

// ---- bad token input -----------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn token_ids_out_of_range() {
    reference_python();
    let m = model_copy("token-range");
    // vocab_size is 2048: the last id is fine, 2048 is not.
    trace_ok(&m, &["--tokens", "2047"]);
    trace_fails(&m, &["--tokens", "1,2048,3"], &["2048", "vocab"]);
    trace_fails(&m, &["--tokens", "4294967295"], &["4294967295", "vocab"]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn prompt_longer_than_context() {
    reference_python();
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
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn garbled_tokens() {
    reference_python();
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
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn sharded_checkpoint() {
    reference_python();
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
