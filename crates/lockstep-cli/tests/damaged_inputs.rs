//! The damaged-input table: hostile or broken files of every kind lockstep reads, and bad
//! arguments, each run through the real `lockstep` binary. Every case must be refused with its
//! expected exit code (2 for bad input) and message class (a substring of the one error line),
//! without a panic, without leaving an output or `*.partial` file, within [`TIME_LIMIT`] and with
//! a peak resident set under [`RSS_LIMIT_KB`] (measured by `/usr/bin/time`), even for sparse
//! files that claim terabytes.
//!
//! Cases: GGUF header and tensor table, safetensors and their index, config.json, tokenizer.json,
//! chat templates, generation_config.json, traces, command-line arguments, and the memory
//! estimate (a KV cache that cannot fit). Each builds its own folder under
//! `target/test-scratch/damaged/<case>`; the small `qwen2-gqa` fixture's files are linked, not
//! copied, unless the case damages them.

mod damaged;
mod support;

use damaged::*;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

// ---- the table -----------------------------------------------------------------------------

fn cases() -> Vec<Case> {
    let c = |name, build, needle| Case {
        name,
        build,
        needle,
        code: 2,
    };
    vec![
        // GGUF header and tensor table.
        c(
            "gguf-bad-magic",
            |d| {
                let m = gguf(d, &tiny_llama_kvs(), &tiny_llama_tensors());
                patch(&m, 0, b"GGUX");
                generate(&m.join("model.gguf"), &[])
            },
            "not a GGUF file",
        ),
        c(
            "gguf-truncated",
            |d| {
                let m = gguf(d, &tiny_llama_kvs(), &tiny_llama_tensors());
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(m.join("model.gguf"))
                    .unwrap();
                f.set_len(300).unwrap();
                generate(&m, &[])
            },
            "truncated",
        ),
        c(
            "gguf-big-endian",
            |d| {
                let m = gguf(d, &tiny_llama_kvs(), &tiny_llama_tensors());
                patch(&m, 4, &3u32.to_be_bytes());
                generate(&m, &[])
            },
            "big-endian",
        ),
        c(
            "gguf-tensor-count-huge",
            |d| {
                let m = gguf(d, &tiny_llama_kvs(), &tiny_llama_tensors());
                patch(&m, 8, &(1u64 << 50).to_le_bytes());
                generate(&m, &[])
            },
            "tensor count",
        ),
        c(
            "gguf-array-count-beyond-file",
            |d| {
                let mut payload = 10u32.to_le_bytes().to_vec(); // u64 elements
                payload.extend((1u64 << 40).to_le_bytes());
                generate(&gguf_with(d, "x.array", kv("x.array", 9, payload)), &[])
            },
            "cannot fit",
        ),
        c(
            "gguf-array-memory-bomb",
            |d| {
                // 17M one-byte elements fit the file but would take >512 MiB parsed.
                let n = 17u64 << 20;
                let mut payload = 0u32.to_le_bytes().to_vec();
                payload.extend(n.to_le_bytes());
                payload.resize(payload.len() + n as usize, 0);
                generate(&gguf_with(d, "x.bytes", kv("x.bytes", 9, payload)), &[])
            },
            "MiB of memory",
        ),
        c(
            "gguf-string-length-huge",
            |d| {
                let mut payload = (1u64 << 40).to_le_bytes().to_vec();
                payload.extend(b"abc");
                generate(&gguf_with(d, "x.s", kv("x.s", 8, payload)), &[])
            },
            "longer than",
        ),
        c(
            "gguf-duplicate-key",
            |d| {
                let mut kvs = tiny_llama_kvs();
                kvs.push(kv_u32("llama.block_count", 1));
                generate(&gguf(d, &kvs, &tiny_llama_tensors()), &[])
            },
            "appears twice",
        ),
        c(
            "gguf-nan-rope-freq-base",
            |d| {
                let e = kv("llama.rope.freq_base", 6, f32::NAN.to_le_bytes().to_vec());
                generate(&gguf_with(d, "llama.rope.freq_base", e), &[])
            },
            "finite",
        ),
        c(
            "gguf-inf-rms-epsilon",
            |d| {
                let key = "llama.attention.layer_norm_rms_epsilon";
                let e = kv(key, 12, f64::INFINITY.to_le_bytes().to_vec());
                generate(&gguf_with(d, key, e), &[])
            },
            "finite",
        ),
        c(
            "gguf-unsupported-architecture",
            |d| {
                generate(
                    &gguf_with(
                        d,
                        "general.architecture",
                        kv("general.architecture", 8, gstr("gemma")),
                    ),
                    &[],
                )
            },
            "'gemma' is not supported",
        ),
        c(
            "gguf-unknown-tensor-type",
            |d| generate(&gguf_big_q(d, vec![64, 64], 99, 4096), &[]),
            "which lockstep does not read",
        ),
        c(
            "gguf-sparse-4tib-tensor-memory",
            |d| generate(&gguf_big_q(d, vec![1 << 20, 1 << 20], 0, SPARSE), &[]),
            "MemAvailable",
        ),
        c(
            "gguf-sparse-4tib-q8-shape-before-dequant",
            |d| {
                // 2^40 Q8_0 values (1.06 bytes each): refused by shape before any dequantization.
                let m = gguf_big_q(d, vec![1 << 20, 1 << 20], 8, (1u64 << 35) * 34);
                generate(&m, &["--force"])
            },
            "but the metadata implies [64, 64]",
        ),
        c(
            "gguf-extra-layer",
            |d| {
                let mut ts = tiny_llama_tensors();
                ts.push(("blk.7.attn_norm.weight", vec![64], 0, 256));
                generate(&gguf(d, &tiny_llama_kvs(), &ts), &[])
            },
            "not part of a model of 1 layers",
        ),
        // safetensors and the shard index.
        c(
            "st-truncated",
            |d| {
                let m = model(d, &["model.safetensors"]);
                let src = fixtures()
                    .join("models")
                    .join(FIXTURE)
                    .join("model.safetensors");
                let b = std::fs::read(src).unwrap();
                std::fs::write(m.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
                trace(d, &m)
            },
            "safetensors",
        ),
        c(
            "st-header-length-huge",
            |d| {
                let m = model(d, &["model.safetensors"]);
                std::fs::write(m.join("model.safetensors"), (1u64 << 60).to_le_bytes()).unwrap();
                trace(d, &m)
            },
            "safetensors",
        ),
        c(
            "st-header-not-json",
            |d| {
                let m = model(d, &["model.safetensors"]);
                let mut b = 8u64.to_le_bytes().to_vec();
                b.extend(b"{{{{{{{{");
                std::fs::write(m.join("model.safetensors"), b).unwrap();
                trace(d, &m)
            },
            "safetensors",
        ),
        c(
            "st-sparse-4tib-memory",
            |d| {
                let m = model(d, &["model.safetensors"]);
                let h = json!({"model.embed_tokens.weight": tensor("F32", &[1 << 20, 1 << 20], 0, SPARSE)});
                safetensors(&m.join("model.safetensors"), &h, SPARSE);
                generate(&m, &[])
            },
            "MemAvailable",
        ),
        c(
            "st-sparse-4tib-shape",
            |d| {
                let m = model(d, &["model.safetensors"]);
                let h = json!({"model.embed_tokens.weight": tensor("F32", &[1 << 20, 1 << 20], 0, SPARSE)});
                safetensors(&m.join("model.safetensors"), &h, SPARSE);
                trace(d, &m)
            },
            "shape",
        ),
        c(
            "index-missing-shard",
            |d| {
                let m = model(d, &["model.safetensors"]);
                let idx = json!({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}});
                std::fs::write(m.join("model.safetensors.index.json"), idx.to_string()).unwrap();
                trace(d, &m)
            },
            "not found",
        ),
        c(
            "index-path-escape",
            |d| {
                let m = model(d, &["model.safetensors"]);
                let idx = json!({"weight_map": {"model.norm.weight": "../../etc/passwd"}});
                std::fs::write(m.join("model.safetensors.index.json"), idx.to_string()).unwrap();
                trace(d, &m)
            },
            "plain file name",
        ),
        c(
            "index-not-json",
            |d| {
                let m = model(d, &["model.safetensors"]);
                std::fs::write(m.join("model.safetensors.index.json"), "{\"weight_map\": ")
                    .unwrap();
                trace(d, &m)
            },
            "not valid JSON",
        ),
        // config.json
        c(
            "config-rms-norm-eps-zero",
            |d| generate(&with_config(d, "rms_norm_eps", json!(0.0)), &[]),
            "rms_norm_eps",
        ),
        c(
            "config-rope-theta-tiny",
            |d| {
                let m = model(d, &["config.json"]);
                let mut c = config();
                c["rope_theta"] = json!(1e-300);
                c["rope_parameters"]["rope_theta"] = json!(1e-300);
                std::fs::write(m.join("config.json"), c.to_string()).unwrap();
                generate(&m, &[])
            },
            "rope_theta",
        ),
        c(
            "config-eos-beyond-u32",
            |d| generate(&with_config(d, "eos_token_id", json!(4294967298u64)), &[]),
            "not a token id",
        ),
        c(
            "config-not-json",
            |d| {
                let m = model(d, &["config.json"]);
                std::fs::write(m.join("config.json"), "{\"hidden_size\": 64,").unwrap();
                generate(&m, &[])
            },
            "not valid JSON",
        ),
        c(
            "config-sizes-overflow",
            |d| generate(&with_config(d, "hidden_size", json!(1u64 << 40)), &[]),
            "impossibly large",
        ),
        c(
            "config-kv-cache-cannot-fit",
            |d| {
                let m = with_config(d, "max_position_embeddings", json!(1_000_000_000_000u64));
                let m = p(&m);
                let a = ["generate", "--model", &m, "--tokens", "1,2"];
                args(&[&a[..], &["--max-new-tokens", "100000000000"]].concat())
            },
            "KV cache",
        ),
        c(
            "verify-kv-cache-cannot-fit",
            |d| {
                let m = with_config(d, "max_position_embeddings", json!(1_000_000_000_000u64));
                let m = p(&m);
                args(&[
                    "verify",
                    "--model",
                    &m,
                    "--dtype",
                    "f32",
                    "--generate-tokens",
                    "100000000000",
                ])
            },
            "KV cache",
        ),
        c(
            "config-billion-layers",
            |d| {
                generate(
                    &with_config(d, "num_hidden_layers", json!(1_000_000_000)),
                    &[],
                )
            },
            "num_hidden_layers",
        ),
        // tokenizer.json
        c(
            "tokenizer-not-json",
            |d| {
                let m = model(d, &["tokenizer.json"]);
                std::fs::write(m.join("tokenizer.json"), "{\"model\": [").unwrap();
                generate(&m, &[])
            },
            "tokenizer",
        ),
        c(
            "tokenizer-unknown-model",
            |d| {
                let m = model(d, &["tokenizer.json"]);
                std::fs::write(
                    m.join("tokenizer.json"),
                    json!({"model": {"type": "Nope"}}).to_string(),
                )
                .unwrap();
                generate(&m, &[])
            },
            "tokenizer",
        ),
        c(
            "tokenizer-missing",
            |d| generate(&model(d, &["tokenizer.json"]), &[]),
            "tokenizer",
        ),
        // chat templates
        c(
            "template-nested-loops",
            |d| {
                chat_with(d, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
            },
            "steps",
        ),
        c(
            "template-output-bomb",
            |d| {
                chat_with(
                    d,
                    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
                )
            },
            "MiB",
        ),
        c(
            "template-deep-nesting",
            |d| {
                chat_with(
                    d,
                    &format!("{{{{ {}1{} }}}}", "[".repeat(20000), "]".repeat(20000)),
                )
            },
            "chat template",
        ),
        c(
            "template-infinite-recursion",
            |d| chat_with(d, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
            "chat template",
        ),
        c(
            "template-syntax-error",
            |d| chat_with(d, "{% for m in messages %}{{ m.content }"),
            "chat template",
        ),
        c(
            "template-raises",
            |d| chat_with(d, "{{ raise_exception('no system prompt allowed') }}"),
            "no system prompt allowed",
        ),
        // generation_config.json
        c(
            "genconfig-eos-beyond-u32",
            |d| gen_config(d, r#"{"eos_token_id": [2, 4294967298]}"#),
            "not a token id",
        ),
        c(
            "genconfig-not-json",
            |d| gen_config(d, "{\"max_new_tokens\": "),
            "not valid JSON",
        ),
        c(
            "genconfig-max-new-tokens-string",
            |d| gen_config(d, r#"{"max_new_tokens": "lots"}"#),
            "max_new_tokens",
        ),
        c(
            "genconfig-huge-max-new-tokens-huge-context",
            |d| {
                let m = with_config(d, "max_position_embeddings", json!(1u64 << 50));
                std::fs::write(
                    m.join("generation_config.json"),
                    r#"{"max_new_tokens": 1000000000000000}"#,
                )
                .unwrap();
                args(&[
                    "generate",
                    "--model",
                    &p(&m),
                    "--tokens",
                    "1,2",
                    "--ignore-eos",
                ])
            },
            "KV cache",
        ),
        // traces
        c(
            "trace-zero-position-logits",
            |d| compare_one(d, &json!({"logits": tensor("F32", &[0, 1 << 60], 0, 0)}), 0),
            "holds no values",
        ),
        c(
            "trace-header-beyond-file",
            |d| {
                let t = d.join("bad.safetensors");
                std::fs::write(&t, (1u64 << 40).to_le_bytes()).unwrap();
                args(&["compare", &p(&t), &p(&t), "--json", &p(&d.join("r.json"))])
            },
            "header claims",
        ),
        c(
            "trace-data-beyond-file",
            |d| {
                compare_one(
                    d,
                    &json!({"logits": tensor("F32", &[1 << 20, 1 << 20], 0, SPARSE)}),
                    1024,
                )
            },
            "truncated",
        ),
        c(
            "trace-not-json",
            |d| {
                let t = d.join("bad.safetensors");
                let mut b = 4u64.to_le_bytes().to_vec();
                b.extend(b"nope");
                std::fs::write(&t, b).unwrap();
                args(&["compare", &p(&t), &p(&t)])
            },
            "not JSON",
        ),
        // command-line arguments
        c(
            "args-bad-token-list",
            |d| {
                generate(&model(d, &[]), &[])
                    .into_iter()
                    .map(|a| if a == "1,2" { "1,x".into() } else { a })
                    .collect()
            },
            "token",
        ),
        c(
            "args-token-beyond-vocab",
            |d| {
                let m = model(d, &[]);
                args(&[
                    "generate",
                    "--model",
                    &p(&m),
                    "--tokens",
                    "1,99999999",
                    "--max-new-tokens",
                    "1",
                ])
            },
            "vocab",
        ),
        c(
            "args-no-model",
            |d| generate(&d.join("nowhere"), &[]),
            "not found",
        ),
        c(
            "args-negative-max-new-tokens",
            |d| generate(&model(d, &[]), &["--max-new-tokens", "-5"]),
            "'-5'",
        ),
        c(
            "args-unknown-dtype",
            |d| generate(&model(d, &[]), &["--dtype", "f128"]),
            "invalid value",
        ),
    ]
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn damaged_inputs_are_refused_cleanly() {
    assert!(
        fixtures().join("models").join(FIXTURE).is_dir(),
        "fixture {FIXTURE} missing; run bash scripts/fixtures.sh"
    );
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let root = scratch("damaged");
    let mut failures = vec![];
    for case in &cases {
        let dir = root.join(case.name);
        std::fs::create_dir_all(&dir).unwrap();
        let a = (case.build)(&dir);
        let before = files_under(&dir);
        let r = run(&dir, &a);
        // The error is the last line (a --force run warns first).
        let line = r
            .stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("");
        eprintln!(
            "{:<44} exit {:?} {:>6.2} s {:>7} KiB  {}",
            case.name, r.code, r.secs, r.rss_kb, line
        );
        let mut bad = |what: String| {
            failures.push(format!(
                "{}: {what}\n  stderr: {}",
                case.name,
                r.stderr.trim()
            ))
        };
        if r.stderr.contains("panicked")
            || r.stderr.contains("RUST_BACKTRACE")
            || r.stderr.contains("signal")
        {
            bad("panicked or died on a signal".into());
        }
        if r.code != Some(case.code) {
            bad(format!("exit {:?}, expected {}", r.code, case.code));
        }
        if !r
            .stderr
            .to_lowercase()
            .contains(&case.needle.to_lowercase())
        {
            bad(format!("message lacks {:?}", case.needle));
        }
        if !line.starts_with("error") {
            bad("the last line is not an error line".into());
        }
        if r.rss_kb > RSS_LIMIT_KB {
            bad(format!("peak RSS {} KiB over the limit", r.rss_kb));
        }
        let left: Vec<PathBuf> = files_under(&dir)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !left.is_empty() {
            bad(format!("left files behind: {left:?}"));
        }
    }
    // Remove the sparse giants so they do not linger in target/.
    std::fs::remove_dir_all(&root).ok();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn the_undamaged_inputs_run() {
    // Controls: the fixture folder and the tiny GGUF the damaged cases start from both generate.
    let root = scratch("damaged-controls");
    let m = model(&root.join("st"), &[]);
    lockstep_ok(
        &generate(&m, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let g = gguf(&root.join("gguf"), &tiny_llama_kvs(), &tiny_llama_tensors());
    lockstep_ok(
        &generate(&g, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn ctrl_c_during_a_trace_leaves_no_file() {
    // SIGINT while the forward runs (the trace is written by temp file + rename at the end):
    // neither the trace nor a temporary file may remain.
    let root = scratch("damaged-sigint");
    let m = fixtures().join("models/smollm2-135m-instruct");
    assert!(m.is_dir(), "fixture {} missing", m.display());
    let out = root.join("out.safetensors");
    // 512 tokens in f64 take seconds even with the SIMD kernels; the signal comes at 400 ms,
    // while the model loads or the forward runs.
    let ids: Vec<String> = (0..512).map(|i| (i % 2000).to_string()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    // A test run started in the background (`cmd &`, nohup) ignores SIGINT, and the child would
    // inherit that: give it the default disposition, as a terminal's Ctrl-C finds it.
    // SAFETY: `signal` is async-signal-safe, the only call between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd
        .args([
            "trace",
            "--model",
            &p(&m),
            "--dtype",
            "f64",
            "--out",
            &p(&out),
        ])
        .args(["--tokens", &ids.join(",")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before the signal; make it longer"
    );
    let left = files_under(&root);
    assert!(left.is_empty(), "left behind: {left:?}");
}
