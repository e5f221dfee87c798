//! Weights copied into 2 MiB pages at load (`LOCKSTEP_HUGE_PAGES`) change no value: a traced
//! forward pass gives bit for bit the same tensors with the copy as with the file mapped, in f32
//! and bf16. `lockstep bench` says how many of the weights a decode step reads were copied, and
//! how much of the process the kernel holds in such pages; a bad value of the variable is a
//! one-line error.

mod support;

use lockstep_trace::Trace;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use support::*;

const MODEL: &str = "qwen2-default-bf16";

fn with_huge_pages(mode: &str, args: &[&str]) -> Output {
    lockstep_with_env(&[("LOCKSTEP_HUGE_PAGES", mode)], args)
}

fn ok(mode: &str, args: &[&str]) -> String {
    let o = with_huge_pages(mode, args);
    assert!(
        o.status.success(),
        "lockstep {args:?} ({mode}) failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn model() -> String {
    reference_python();
    let m = fixtures().join("models").join(MODEL);
    assert!(
        m.join("config.json").exists(),
        "fixture {MODEL} missing: run bash scripts/fixtures.sh"
    );
    m.to_str().unwrap().to_string()
}

/// Every tensor of `a` and `b`, bit for bit (the same names, shapes and values).
fn assert_same_bits(a: &Path, b: &Path) {
    let (a, b) = (Trace::read(a).unwrap(), Trace::read(b).unwrap());
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        assert_eq!(x.shape, y.shape, "{name}");
        let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
        assert!(
            bits(x.data.to_f64()) == bits(y.data.to_f64()),
            "{name} differs with the weights in huge pages"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn huge_pages_change_no_value() {
    let m = model();
    let dir = scratch("huge-pages-traces");
    for dtype in ["f32", "bf16"] {
        let out = |mode: &str| dir.join(format!("{dtype}-{mode}.safetensors"));
        for mode in ["on", "off"] {
            ok(
                mode,
                &[
                    "trace",
                    "--model",
                    &m,
                    "--tokens",
                    "9,1000,77,5,31000,2,640,11",
                    "--dtype",
                    dtype,
                    "--out",
                    out(mode).to_str().unwrap(),
                ],
            );
        }
        assert_same_bits(&out("on"), &out("off"));
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bench_reports_the_weights_in_huge_pages() {
    let m = model();
    let bench = |mode: &str| -> Value {
        let out = ok(
            mode,
            &[
                "bench",
                "--model",
                &m,
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
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let (on, off) = (bench("on"), bench("off"));
    let weights = on["decode_weight_bytes"].as_u64().unwrap();
    assert!(weights > 8 << 20, "{weights}");
    assert_eq!(on["huge_page_weight_bytes"].as_u64(), Some(weights));
    assert_eq!(off["huge_page_weight_bytes"].as_u64(), Some(0));
    // Where the kernel offers huge pages, it reports holding most of the copy in them.
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.contains("[always]") || thp.contains("[madvise]") {
        let held = on["anon_huge_page_bytes"].as_u64().unwrap();
        assert!(
            held >= weights / 2,
            "{held} of {weights} bytes in huge pages"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_bad_value_is_one_line() {
    let m = model();
    let o = with_huge_pages("sometimes", &["generate", "--model", &m, "--tokens", "1"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("LOCKSTEP_HUGE_PAGES") && err.trim().lines().count() == 1,
        "{err}"
    );
}
