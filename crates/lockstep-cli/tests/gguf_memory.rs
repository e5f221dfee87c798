//! Peak memory of `lockstep generate` on a quantized GGUF (the SmolLM2-135M Q4_1 file of the
//! fixtures): its blocks stay memory-mapped as stored, so the run holds about the file plus the KV
//! cache, not a float32 copy of the weights (5.3x the file, as it did when GGUF tensors were
//! dequantized at load).
//!
//! The peak is the kernel's (`getrusage(RUSAGE_CHILDREN).ru_maxrss` of the child processes),
//! never a number lockstep prints. The bound: the same file's `lockstep tokenize` (the process
//! without any weights: binary, GGUF metadata, tokenizer) plus 1.15 × (file size + the KV cache
//! the config implies for the requested context in float32). Alone in its test binary, so no
//! other child counts.

mod support;

use support::*;

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn generate_on_a_q4_gguf_holds_about_the_file_plus_kv_cache() {
    let gguf = fixtures().join("gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh`",
        gguf.display()
    );
    let g = gguf.to_str().unwrap();
    assert_eq!(children_max_rss(), 0, "no child ran before");
    lockstep_ok(&["tokenize", "--model", g, "--text", "hello"]);
    let base = children_max_rss();
    assert!(base > 0);

    let (prompt, new) = (64usize, 64usize);
    let ids: Vec<String> = (0..prompt)
        .map(|i| ((i * 7919) % 49000 + 100).to_string())
        .collect();
    lockstep_ok(&[
        "generate",
        "--model",
        g,
        "--tokens",
        &ids.join(","),
        "--max-new-tokens",
        &new.to_string(),
        "--temperature",
        "0",
        "--dtype",
        "f32",
    ]);
    let peak = children_max_rss();

    let file = std::fs::metadata(&gguf).unwrap().len();
    let source = lockstep_engine::source::ModelSource::resolve(&gguf).unwrap();
    let c = lockstep_engine::resources::config_of(&source).unwrap();
    // Keys and values, every layer, f32, the whole requested context.
    let kv = (2 * c.num_layers * c.num_kv_heads * c.head_dim * (prompt + new) * 4) as u64;
    let bound = base + (1.15 * (file + kv) as f64) as u64;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "SmolLM2 Q4_1 generate: peak RSS {:.1} MiB; file {:.1} MiB, KV cache {:.1} MiB, the process without weights (tokenize) {:.1} MiB; bound {:.1} MiB",
        mib(peak),
        mib(file),
        mib(kv),
        mib(base),
        mib(bound)
    );
    assert!(
        peak <= bound,
        "peak RSS {:.1} MiB exceeds {:.1} MiB (tokenize {:.1} + 1.15 x (file {:.1} + KV {:.1}))",
        mib(peak),
        mib(bound),
        mib(base),
        mib(file),
        mib(kv)
    );
    // And the weights are really read: more than the file's worth above the weightless process.
    assert!(peak > base + file / 2, "peak {:.1} MiB", mib(peak));
}
