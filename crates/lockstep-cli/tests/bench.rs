//! `lockstep bench` on a small fixture: every JSON field is present and positive (numbers that
//! depend on the machine are not asserted beyond that), the bandwidth is measured beside each
//! repeat without its buffer counted in the peak memory, and bad arguments exit 2.

mod support;

use serde_json::Value;
use support::*;

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bench_json_fields_are_present_and_positive() {
    let model = fixtures().join("models/qwen2-tied-bf16");
    assert!(
        model.join("config.json").is_file(),
        "fixture {} missing; run bash scripts/fixtures.sh",
        model.display()
    );
    for dtype in ["bf16", "f32"] {
        let out = lockstep_ok(&[
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--dtype",
            dtype,
            "--prompt-tokens",
            "16",
            "--new-tokens",
            "4",
            "--batch",
            "2",
            "--repeat",
            "2",
            "--json",
        ]);
        let v: Value = serde_json::from_str(out.lines().last().expect("a JSON line")).unwrap();
        assert_eq!(v["dtype"], dtype);
        assert_eq!(v["batch"], 2);
        for field in [
            "threads",
            "load_s",
            "prefill_tok_s",
            "decode_tok_s",
            "peak_rss_bytes",
            "decode_weight_bytes",
            "achieved_weight_bytes_per_s",
            "read_bandwidth_bytes_per_s",
            "bandwidth_fraction",
        ] {
            let x = v[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} missing or not a number in {v}"));
            assert!(x > 0.0 && x.is_finite(), "{field} = {x} in {v}");
        }
        // The bandwidth was measured before the first repeat and after each (Linux resets the
        // peak-memory mark around the tests), and the tests' 512 MiB buffer is not in the peak:
        // this small model's run stays far below it.
        let tests = v["read_bandwidth_tests_bytes_per_s"]
            .as_array()
            .unwrap_or_else(|| panic!("read_bandwidth_tests_bytes_per_s missing in {v}"));
        assert_eq!(tests.len(), 3, "{v}");
        assert!(
            tests.iter().all(|t| t.as_f64().is_some_and(|t| t > 0.0)),
            "{v}"
        );
        let peak = v["peak_rss_bytes"].as_u64().unwrap();
        assert!(
            peak < 512 << 20,
            "peak RSS {peak} counts the bandwidth test's buffer"
        );
        // The fixture's linear layers and head, as stored: bf16, 2 bytes per parameter.
        let c: Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        let (h, i, l, vocab) = (
            c["hidden_size"].as_u64().unwrap(),
            c["intermediate_size"].as_u64().unwrap(),
            c["num_hidden_layers"].as_u64().unwrap(),
            c["vocab_size"].as_u64().unwrap(),
        );
        let hd = c["head_dim"]
            .as_u64()
            .unwrap_or(h / c["num_attention_heads"].as_u64().unwrap());
        let (q, kv) = (
            c["num_attention_heads"].as_u64().unwrap() * hd,
            c["num_key_value_heads"].as_u64().unwrap() * hd,
        );
        let params = l * (h * q + 2 * h * kv + q * h + 3 * h * i) + vocab * h;
        assert_eq!(v["decode_weight_bytes"].as_u64(), Some(2 * params), "{v}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bench_rejects_bad_arguments() {
    let model = fixtures().join("models/qwen2-tied-bf16");
    for bad in [["--new-tokens", "1"], ["--repeat", "0"], ["--batch", "0"]] {
        let o = lockstep(&["bench", "--model", model.to_str().unwrap(), bad[0], bad[1]]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error:"), "{err}");
    }
}

/// `bench --bandwidth-only` measures the read bandwidth alone (no model), and refuses a model
/// beside it, or no model without it, with exit 2 and one line that names the arguments.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bench_measures_the_bandwidth_alone() {
    let out = lockstep_ok(&["bench", "--bandwidth-only", "--json"]);
    let v: Value = serde_json::from_str(out.lines().last().expect("a JSON line")).unwrap();
    let bw = v["read_bandwidth_bytes_per_s"].as_f64().unwrap_or(0.0);
    assert!(bw > 0.0 && bw.is_finite(), "{v}");
    assert!(v["threads"].as_u64().is_some_and(|t| t > 0), "{v}");
    let model = fixtures().join("models/qwen2-tied-bf16");
    for (args, names) in [
        (
            &[
                "bench",
                "--bandwidth-only",
                "--model",
                model.to_str().unwrap(),
            ][..],
            "'--bandwidth-only' cannot be used with '--model <MODEL>'",
        ),
        (&["bench"][..], "not provided: --model <MODEL>"),
    ] {
        let o = lockstep(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("error:") && err.contains(names), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// In bf16 a decode step reads the matrices coded in 12 bits per value where this CPU sums
/// them (`LOCKSTEP_CODED_BF16` auto): `bench` reports 0.75 of the stored bytes read (the groups
/// of 64 values, 96 bytes), and every stored byte read with the coding off (or on a CPU that
/// does not read it, even forced on). The speed itself is a benchmark's business (README,
/// "Speed").
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bench_reports_the_coded_bytes_a_bf16_step_reads() {
    let model = fixtures().join("models/qwen2-tied-bf16");
    let run = |mode: &str| -> Value {
        let out = lockstep_ok_with(
            "LOCKSTEP_CODED_BF16",
            mode,
            &[
                "bench",
                "--model",
                model.to_str().unwrap(),
                "--dtype",
                "bf16",
                "--prompt-tokens",
                "4",
                "--new-tokens",
                "3",
                "--repeat",
                "1",
                "--json",
            ],
        );
        serde_json::from_str(out.lines().last().expect("a JSON line")).unwrap()
    };
    let (auto, off) = (run("auto"), run("off"));
    let stored = off["decode_weight_bytes"].as_u64().unwrap();
    assert_eq!(off["decode_read_bytes"].as_u64(), Some(stored), "{off}");
    assert_eq!(off["coded_weight_bytes"].as_u64(), Some(0), "{off}");
    assert_eq!(auto["decode_weight_bytes"].as_u64(), Some(stored), "{auto}");
    let read = auto["decode_read_bytes"].as_u64().unwrap();
    // Every row rounds up to whole groups: at least 0.75 of the stored bytes, not much more.
    let coded_read = |v: &Value| {
        assert_eq!(v["coded_weight_bytes"].as_u64(), Some(stored), "{v}");
        let read = v["decode_read_bytes"].as_u64().unwrap();
        assert!(
            read >= stored / 4 * 3 && (read as f64) < 0.8 * stored as f64,
            "{read} of {stored}"
        );
        assert!(
            v["kernels"].as_str().unwrap().contains("coded decode"),
            "{v}"
        );
    };
    use lockstep_engine::kernels::matmul::{codes_by_default, reads_coded};
    if codes_by_default() {
        coded_read(&auto);
    } else {
        assert_eq!(read, stored, "{auto}");
    }
    // Forced on: coded wherever the kernels read the coding (AVX-512), else still no copy.
    let on = run("on");
    if reads_coded() {
        coded_read(&on);
    } else {
        assert_eq!(on["coded_weight_bytes"].as_u64(), Some(0), "{on}");
        assert_eq!(on["decode_read_bytes"].as_u64(), Some(stored), "{on}");
    }
}
