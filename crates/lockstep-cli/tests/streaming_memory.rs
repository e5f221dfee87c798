//! Peak memory of `lockstep generate` streaming the layers through the page cache
//! (`LOCKSTEP_STREAM_LAYERS=1`) on the 0.5B-shape fixture (988 MB of bf16 safetensors, 24
//! layers): the process holds the embeddings (tied to the LM head), a few layers and the KV
//! cache, not the whole file; so does `lockstep trace` by default (`auto`, where it streams
//! whatever the model's size), whose model fingerprint reads every tensor. The same generation
//! without streaming holds the whole file, and generates the same tokens.
//!
//! The peak is the kernel's (`getrusage(RUSAGE_CHILDREN).ru_maxrss` of the child processes),
//! never a number lockstep prints; a running maximum, so the runs go from the smallest to the
//! largest. The bound: the same model's `lockstep tokenize` (the process without weights) plus
//! 1.15 × the engine's memory estimate with streamed weights (embeddings, final norm, three
//! layers at the file's bytes per parameter, the KV cache and the prefill's activations). Alone
//! in its test binary, so no other child counts.

mod support;

use lockstep_engine::resources::{streamed_weight_bytes, MemoryEstimate, RunShape};
use std::process::Output;
use support::*;

fn lockstep_streaming(mode: &str, args: &[&str]) -> Output {
    lockstep_with_env(&[("LOCKSTEP_STREAM_LAYERS", mode)], args)
}

/// The generated text (stdout) and the speed line (stderr's last line) of a run that succeeded.
fn generate(mode: &str, args: &[&str]) -> (String, String) {
    let o = lockstep_streaming(mode, args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "generate ({mode}) failed: {err}");
    let speed = err.lines().rfind(|l| l.contains("decode:")).unwrap_or("");
    (String::from_utf8(o.stdout).unwrap(), speed.to_string())
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn generate_streaming_the_layers_holds_a_few_layers_not_the_file() {
    let dir = fixtures().join("models/qwen2.5-0.5b-random");
    let file = dir.join("model.safetensors");
    assert!(
        file.exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh`",
        dir.display()
    );
    let m = dir.to_str().unwrap();
    assert_eq!(children_max_rss(), 0, "no child ran before");
    lockstep_ok(&["tokenize", "--model", m, "--text", "hello"]);
    let base = children_max_rss();
    assert!(base > 0);

    let (prompt, new) = (32usize, 16usize);
    let ids: Vec<String> = (0..prompt)
        .map(|i| ((i * 7919) % 150_000 + 100).to_string())
        .collect();
    let (ids, new_s) = (ids.join(","), new.to_string());
    let args = [
        "generate",
        "--model",
        m,
        "--tokens",
        &ids,
        "--max-new-tokens",
        &new_s,
        "--temperature",
        "0",
        "--dtype",
        "f32",
    ];
    let (text_on, speed_on) = generate("1", &args);
    let peak_on = children_max_rss();
    // A trace also hashes every tensor for the model fingerprint: one tensor resident at a time.
    let scratch_dir = scratch("streaming_memory");
    let out = scratch_dir.join("trace.safetensors");
    let short: Vec<&str> = ids.split(',').take(8).collect();
    // `trace` streams by default: one pass reads each layer once either way.
    let o = lockstep_streaming(
        "auto",
        &[
            "trace",
            "--model",
            m,
            "--tokens",
            &short.join(","),
            "--dtype",
            "f32",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "trace failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let peak_trace = children_max_rss();
    let trace_bytes = std::fs::metadata(&out).unwrap().len();
    let (text_off, speed_off) = generate("0", &args);
    let peak_off = children_max_rss();

    let bytes = std::fs::metadata(&file).unwrap().len();
    let source = lockstep_engine::source::ModelSource::resolve(&dir).unwrap();
    let c = lockstep_engine::resources::config_of(&source).unwrap();
    let run = RunShape {
        batch: 1,
        prompt_len: prompt,
        context: prompt + new,
        act_bytes: 4,
    };
    let est = MemoryEstimate::new(&c, streamed_weight_bytes(&c, bytes), run);
    let bound = base + (1.15 * est.total() as f64) as u64;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "qwen2.5-0.5b-random generate: peak RSS streaming {:.1} MiB ({speed_on}), trace streaming {:.1} MiB, not streaming {:.1} MiB ({speed_off}); file {:.1} MiB, tokenize {:.1} MiB, estimate {}; bound {:.1} MiB",
        mib(peak_on),
        mib(peak_trace),
        mib(peak_off),
        mib(bytes),
        mib(base),
        est.describe(),
        mib(bound)
    );
    assert_eq!(text_on, text_off, "streaming changed the generated text");
    assert!(
        peak_on <= bound,
        "peak RSS streaming {:.1} MiB exceeds {:.1} MiB (tokenize {:.1} + 1.15 x {})",
        mib(peak_on),
        mib(bound),
        mib(base),
        est.describe()
    );
    // The trace: the same bound plus the trace it holds (written out, counted twice).
    assert!(
        peak_trace <= bound + 2 * trace_bytes,
        "peak RSS of trace streaming {:.1} MiB exceeds {:.1} MiB + twice the {:.1} MiB trace",
        mib(peak_trace),
        mib(bound),
        mib(trace_bytes)
    );
    assert!(
        peak_on < bytes / 2,
        "peak RSS streaming {:.1} MiB is not well below the file's {:.1} MiB",
        mib(peak_on),
        mib(bytes)
    );
    // Without streaming the whole file is resident: the bound above is not trivially met.
    assert!(
        peak_off > base + bytes * 9 / 10,
        "peak RSS without streaming {:.1} MiB",
        mib(peak_off)
    );

    // A value other than auto / on / off is a one-line error.
    let o = lockstep_streaming("sometimes", &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("LOCKSTEP_STREAM_LAYERS") && err.trim().lines().count() == 1,
        "{err}"
    );
}
