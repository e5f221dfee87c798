//! Shared helpers of the integration tests: locating the repo, the fixtures, the reference
//! environment, and running `lockstep` and the Python reference tracer.
#![allow(dead_code)]

use lockstep_trace::Trace;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The fixtures folder (made by `scripts/fixtures.sh`).
pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}

/// The reference environment's python, or `None` when it is not set up. With
/// `LOCKSTEP_REQUIRE_REFERENCE=1` (as `scripts/test.sh` sets) a missing reference is a failure,
/// so CI can never pass by skipping the parity tests.
pub fn reference_python() -> Option<PathBuf> {
    let p = std::env::var_os("LOCKSTEP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let ok = p.exists() && fixtures().join("models").is_dir();
    if !ok {
        if std::env::var("LOCKSTEP_REQUIRE_REFERENCE").as_deref() == Ok("1") {
            panic!(
                "reference environment or fixtures missing ({}); run bash scripts/setup.sh",
                p.display()
            );
        }
        eprintln!("SKIPPED: reference environment not set up (run bash scripts/setup.sh)");
        return None;
    }
    Some(p)
}

/// Runs the `lockstep` binary.
pub fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env("LOCKSTEP_PYTHON", repo_root().join(".venv/bin/python"))
        .output()
        .expect("run lockstep")
}

/// Runs `lockstep` and panics with its stderr unless it succeeds.
pub fn lockstep_ok(args: &[&str]) -> String {
    let o = lockstep(args);
    assert!(
        o.status.success(),
        "lockstep {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs `python -m lockstep_reference ARGS` in the reference environment.
pub fn reference(py: &Path, args: &[&str]) -> String {
    let o = Command::new(py)
        .arg("-m")
        .arg("lockstep_reference")
        .args(args)
        .current_dir(repo_root().join("reference"))
        .output()
        .expect("run the reference");
    assert!(
        o.status.success(),
        "reference {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Deterministic pseudo-random token ids below `vocab`.
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Comma-joined ids for `--tokens`.
pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Max |a - b| over a tensor present in both traces (panics on shape mismatch).
pub fn max_abs_diff(a: &Trace, b: &Trace, name: &str) -> f64 {
    let ta = a
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing in first trace"));
    let tb = b
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing in second trace"));
    assert_eq!(ta.shape, tb.shape, "shape of {name}");
    ta.data
        .to_f64()
        .iter()
        .zip(tb.data.to_f64())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Max |x| of a tensor.
pub fn max_abs(t: &Trace, name: &str) -> f64 {
    t.get(name)
        .unwrap()
        .data
        .to_f64()
        .iter()
        .fold(0.0, |m, x| m.max(x.abs()))
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = repo_root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The ids of a JSON array of token ids (panics on anything else).
pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}
