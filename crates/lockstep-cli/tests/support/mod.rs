//! Shared helpers of the integration tests: locating the repo, the fixtures, the reference
//! environment, and running `lockstep` and the Python reference tracer.
#![allow(dead_code)]

pub mod gguf;
pub mod server;

#[allow(unused_imports)] // not every test binary starts a server
pub use server::Server;

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

/// The reference environment's python; a failure naming the fix when it or the fixtures are
/// missing. Every test that calls it is ignored under plain `cargo test` and runs under
/// `bash scripts/test.sh` (the `reference-tests` feature), so no test passes by skipping.
pub fn reference_python() -> PathBuf {
    let p = std::env::var_os("LOCKSTEP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        p.exists() && fixtures().join("models").is_dir(),
        "reference environment or fixtures missing ({}); run bash scripts/setup.sh",
        p.display()
    );
    p
}

/// Runs the `lockstep` binary.
pub fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env("LOCKSTEP_PYTHON", repo_root().join(".venv/bin/python"))
        .output()
        .expect("run lockstep")
}

/// Runs the `lockstep` binary with the environment variables `vars` set.
pub fn lockstep_with_env(vars: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .envs(vars.iter().copied())
        .output()
        .expect("run lockstep")
}

/// Runs `lockstep` with the environment variable `var` set to `value`; its stdout, or a panic
/// with its stderr unless it succeeds.
pub fn lockstep_ok_with(var: &str, value: &str, args: &[&str]) -> String {
    let o = lockstep_with_env(&[(var, value)], args);
    assert!(
        o.status.success(),
        "lockstep {args:?} ({var}={value}) failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The folder of fixture model `name` as a string; a failure naming the fix when the reference
/// environment or the fixture is missing.
pub fn fixture_folder(name: &str) -> String {
    reference_python();
    let m = fixtures().join("models").join(name);
    assert!(
        m.join("config.json").exists(),
        "fixture {name} missing: run bash scripts/fixtures.sh"
    );
    m.to_str().unwrap().to_string()
}

/// Every tensor of the traces `a` and `b`, bit for bit (the same names, shapes and values);
/// `what` names the change between them in a failure.
pub fn assert_same_bits(a: &Path, b: &Path, what: &str) {
    let (a, b) = (Trace::read(a).unwrap(), Trace::read(b).unwrap());
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        assert_eq!(x.shape, y.shape, "{name}");
        let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
        assert!(
            bits(x.data.to_f64()) == bits(y.data.to_f64()),
            "{name} differs {what}"
        );
    }
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

/// `lockstep trace --model MODEL --tokens IDS --dtype DTYPE --out OUT` (panics unless it succeeds).
pub fn trace_to(model: &Path, ids: &str, dtype: &str, out: &Path) {
    lockstep_ok(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        ids,
        "--dtype",
        dtype,
        "--out",
        out.to_str().unwrap(),
    ]);
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

/// A scratch directory for one test, emptied when made: removed when the guard drops after
/// the test passed, kept for inspection when it failed. The verifier's tests each leave
/// reference traces of hundreds of MB here; kept until the run's end they once filled CI's disk.
pub fn scratch(name: &str) -> Scratch {
    let d = repo_root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// The folder [`scratch`] made; derefs to its path. Hold it for as long as the test uses the
/// folder (`scratch(..).join(..)` would remove the folder at the end of that statement).
#[must_use = "the folder is removed when this guard drops"]
pub struct Scratch(PathBuf);

impl Scratch {
    /// The path, the folder kept after the test (for small folders a helper hands out).
    pub fn kept(self) -> PathBuf {
        let me = std::mem::ManuallyDrop::new(self);
        me.0.clone()
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The ids of a JSON array of token ids (panics on anything else).
pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// What one `lockstep verify` run left: its process output, stdout, and the JSON report.
pub struct VerifyRun {
    /// Exit status and streams.
    pub output: Output,
    /// stdout as text (the phase table).
    pub stdout: String,
    /// The JSON report (`Null` when none was written).
    pub json: serde_json::Value,
}

/// Runs `lockstep verify ARGS` with its reports (`r.md`, `r.json`, `r.svg`, `r.html`) and its cache (the
/// default model, cached reference traces) inside `dir`, so nothing is reused from other runs.
pub fn verify_in(dir: &Path, args: &[&str]) -> VerifyRun {
    verify_in_with_env(dir, args, &[])
}

/// [`verify_in`] with extra environment variables.
pub fn verify_in_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> VerifyRun {
    let s = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .envs(env.iter().copied())
        .arg("verify")
        .args(args)
        .args([
            "--report",
            &s("r.md"),
            "--json",
            &s("r.json"),
            "--plot",
            &s("r.svg"),
            "--html",
            &s("r.html"),
        ])
        .env("LOCKSTEP_CACHE", dir.join("cache"))
        .env("LOCKSTEP_PYTHON", repo_root().join(".venv/bin/python"))
        .output()
        .expect("run lockstep verify");
    let json = std::fs::read_to_string(dir.join("r.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    VerifyRun {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        output,
        json,
    }
}

impl VerifyRun {
    /// Asserts the exit code, showing both streams when it differs.
    pub fn assert_exit(&self, code: i32) {
        assert_eq!(
            self.output.status.code(),
            Some(code),
            "{}\n{}",
            self.stdout,
            String::from_utf8_lossy(&self.output.stderr)
        );
    }

    /// Asserts that each phase has a PASS line in the phase table.
    pub fn assert_pass(&self, phases: &[&str]) {
        for phase in phases {
            assert!(
                self.stdout
                    .lines()
                    .any(|l| l.contains("PASS") && l.contains(phase)),
                "{phase}: {}",
                self.stdout
            );
        }
    }
}

/// Debian's Chromium, the headless browser the HTML reports are checked in (installed by
/// `scripts/setup.sh`); a missing one fails the test.
pub fn chromium() -> PathBuf {
    let p = std::env::var_os("LOCKSTEP_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.exists(),
        "{} not found: the HTML report tests need Chromium (bash scripts/setup.sh installs it)",
        p.display()
    );
    p
}

/// Runs headless Chromium on `html` with `mode` (`--dump-dom`, `--screenshot=PATH`, ...) and
/// returns (stdout, the console lines it logged).
fn chromium_run(html: &Path, mode: &str) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().expect("temp profile");
    let url = format!(
        "file://{}",
        html.canonicalize().expect("html report").display()
    );
    let o = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1200,1400",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(mode)
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        o.status.success(),
        "chromium {mode} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let console = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&o.stdout).into_owned(), console)
}

/// Renders the HTML report `html` in headless Chromium and checks that it rendered: its script
/// ran to the end (the `data-lockstep-report="ok"` marker), nothing was logged on the console,
/// and each tier's chart holds `layers` layer groups after the scripts ran (`tiers` charts in
/// all). With `LOCKSTEP_SCREENSHOTS=DIR` it also saves a screenshot as `DIR/<name>.png`.
pub fn assert_html_renders(html: &Path, tiers: usize, layers: usize, name: &str) {
    let (dom, console) = chromium_run(html, "--dump-dom");
    assert!(console.is_empty(), "console output: {console:?}");
    assert!(
        dom.contains("data-lockstep-report=\"ok\""),
        "the report's script did not run to the end"
    );
    let drawn: Vec<&str> = dom
        .split("data-layers-drawn=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap_or(0)])
        .collect();
    assert_eq!(drawn.len(), tiers, "one chart per tier");
    for d in drawn {
        assert_eq!(d, layers.to_string(), "layer groups in a chart");
    }
    if let Some(dir) = std::env::var_os("LOCKSTEP_SCREENSHOTS") {
        let png = Path::new(&dir).join(format!("{name}.png"));
        let (_, console) = chromium_run(html, &format!("--screenshot={}", png.display()));
        assert!(console.is_empty(), "console output: {console:?}");
        assert!(png.exists());
    }
}

/// The largest peak RSS of any child process waited for so far, in bytes.
pub fn children_max_rss() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    ru.ru_maxrss as u64 * 1024
}
