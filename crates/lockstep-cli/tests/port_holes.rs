//! Holes in judging other ports' traces (`lockstep verify --port-trace`), each closed by a test
//! that failed before its fix:
//!
//! - a port trace that omits a tensor fails, naming it as MISSING (docs/trace-format.md once said
//!   omitted tensors were skipped; the comparator always failed them, and now the docs say so);
//! - the weights phase judges the parameter arrays the port computes with (the writer records
//!   their checksums), not the fingerprint of the folder the writer was given: one perturbed
//!   value fails it, naming the tensor.
//!
//! The port traces are written through the Python writer (`lockstep_reference.writer`) from
//! lockstep's own f32 trace of the fixture model, so they pass when nothing is wrong.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

const IDS: &str = "5,17,300,2";

/// A Python "port": writes the tensors of `source` (a trace file) through `TraceWriter`, leaving
/// out `--omit NAME`; with `--weights f32|f64` it gives the writer the checkpoint's parameters
/// held in that dtype, one value of `--perturb NAME` moved to the next representable number.
const PORT_SCRIPT: &str = r#"
import argparse, json
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
from lockstep_reference.st_io import checkpoint_files
from lockstep_reference.writer import TraceWriter

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--source", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--omit", action="append", default=[])
ap.add_argument("--weights", choices=["none", "f32", "f64"], default="none")
ap.add_argument("--perturb")
a = ap.parse_args()
params = None
if a.weights != "none":
    params = {}
    for f in checkpoint_files(a.model):
        params.update(load_file(f))
    params = {k: v.astype(np.float32 if a.weights == "f32" else np.float64) for k, v in params.items()}
    if a.perturb:
        p = params[a.perturb].copy()
        flat = p.reshape(-1)
        flat[7] = np.nextafter(flat[7], np.inf)
        params[a.perturb] = p
w = TraceWriter(a.model)
with safe_open(a.source, "np") as f:
    meta = f.metadata()
    for name in w.names:
        if name != "tokens" and name not in a.omit:
            w.tap(name, f.get_tensor(name))
w.save(a.out, {"producer": "python-port", "dtype": meta["dtype"], "token_ids": json.loads(meta["token_ids"])},
       weights=params)
print(json.dumps({"missing": w.missing()}))
"#;

struct Setup {
    py: PathBuf,
    dir: Scratch,
    model: PathBuf,
    /// lockstep's own f32 trace of the model on [`IDS`].
    source: PathBuf,
}

fn setup(name: &str) -> Setup {
    let py = reference_python();
    let dir = scratch(name);
    let model = fixtures().join("models/qwen2-gqa");
    assert!(
        model.join("config.json").exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh`",
        model.display()
    );
    let source = dir.join("lockstep-f32.safetensors");
    lockstep_ok(&[
        "trace",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        IDS,
        "--dtype",
        "f32",
        "--out",
        source.to_str().unwrap(),
    ]);
    std::fs::write(dir.join("port.py"), PORT_SCRIPT).unwrap();
    Setup {
        py,
        dir,
        model,
        source,
    }
}

impl Setup {
    /// Runs the Python port script with `args`, writing `out`; returns its stdout.
    fn port(&self, out: &Path, args: &[&str]) -> String {
        let o = Command::new(&self.py)
            .arg(self.dir.join("port.py"))
            .args(["--model", self.model.to_str().unwrap()])
            .args(["--source", self.source.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(args)
            .env("PYTHONPATH", repo_root().join("reference"))
            .output()
            .expect("run python");
        assert!(
            o.status.success(),
            "port script {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// `lockstep verify --model M --port-trace TRACE` (its cache in the scratch folder, shared by
    /// the runs of one test); returns the exit code, the JSON report and stdout + stderr.
    fn verify(&self, trace: &Path) -> (Option<i32>, Value, String) {
        let js = self.dir.join("verify.json");
        let _ = std::fs::remove_file(&js);
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let o: Output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args([
                "verify",
                "--model",
                &s(&self.model),
                "--port-trace",
                &s(trace),
            ])
            .args(["--report", &s(&self.dir.join("verify.md"))])
            .args(["--json", &s(&js)])
            .args(["--plot", &s(&self.dir.join("verify.svg"))])
            .args(["--html", &s(&self.dir.join("verify.html"))])
            .env("LOCKSTEP_PYTHON", repo_root().join(".venv/bin/python"))
            .env("LOCKSTEP_CACHE", self.dir.join("cache"))
            .output()
            .expect("run lockstep verify");
        let json = std::fs::read_to_string(&js)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        (
            o.status.code(),
            json,
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }
}

/// The phase named `name` of a verify JSON report.
fn phase<'a>(js: &'a Value, name: &str) -> &'a Value {
    js["phases"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no phase {name} in {js}"))
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_port_trace_missing_one_tensor_fails_naming_it() {
    let s = setup("port-holes-missing");
    // Every tensor: the port trace passes.
    let full = s.dir.join("full.safetensors");
    let out = s.port(&full, &[]);
    assert!(out.contains(r#""missing": []"#), "{out}");
    let (code, js, text) = s.verify(&full);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(phase(&js, "layer-by-layer [f32]")["status"], "pass");

    // Without layers.1.k: the writer says it is missing, and verify fails naming it.
    let holed = s.dir.join("no-layers.1.k.safetensors");
    let out = s.port(&holed, &["--omit", "layers.1.k"]);
    assert!(out.contains(r#""missing": ["layers.1.k"]"#), "{out}");
    let (code, js, text) = s.verify(&holed);
    assert_eq!(code, Some(1), "{text}");
    let p = phase(&js, "layer-by-layer [f32]");
    assert_eq!(p["status"], "fail", "{text}");
    let cmp = &p["comparisons"];
    assert_eq!(cmp["first_divergence"], "layers.1.k", "{text}");
    let k = cmp["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "layers.1.k")
        .unwrap_or_else(|| panic!("layers.1.k not reported: {text}"));
    assert_eq!(k["status"], "missing", "{k}");
    assert!(text.contains("layers.1.k"), "{text}");
    assert_eq!(js["passed"], false);
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn the_weights_phase_judges_the_ports_own_parameters() {
    let s = setup("port-holes-weights");
    let weights = |js: &Value| phase(js, "weights").clone();
    // No parameters given: only the folder's fingerprint is known, so the phase is skipped, not
    // passed.
    let plain = s.dir.join("plain.safetensors");
    s.port(&plain, &[]);
    let (code, js, text) = s.verify(&plain);
    assert_eq!(code, Some(0), "{text}");
    let w = weights(&js);
    assert_eq!(w["status"], "skip", "{w}");
    assert!(
        w["summary"].as_str().unwrap().contains("not recorded"),
        "{w}"
    );

    // The checkpoint's parameters as stored (f32), and widened to f64: they pass.
    for (dtype, how) in [("f32", "27 bit-identical"), ("f64", "27 widened exactly")] {
        let t = s.dir.join(format!("params-{dtype}.safetensors"));
        s.port(&t, &["--weights", dtype]);
        let (code, js, text) = s.verify(&t);
        assert_eq!(code, Some(0), "{text}");
        let w = weights(&js);
        assert_eq!(w["status"], "pass", "{w}");
        assert!(w["summary"].as_str().unwrap().contains(how), "{w}");
    }

    // One value of one parameter moved by one ulp (the tensors in the trace unchanged): the
    // weights phase fails naming it, and so does the verdict.
    for dtype in ["f32", "f64"] {
        let t = s.dir.join(format!("perturbed-{dtype}.safetensors"));
        let name = "model.layers.1.mlp.down_proj.weight";
        s.port(&t, &["--weights", dtype, "--perturb", name]);
        let (code, js, text) = s.verify(&t);
        assert_eq!(code, Some(1), "{text}");
        let w = weights(&js);
        assert_eq!(w["status"], "fail", "{w}");
        let summary = w["summary"].as_str().unwrap();
        assert!(summary.contains(&format!("{name}: ")), "{summary}");
        assert!(summary.contains("26/27"), "{summary}");
        assert!(!summary.contains("model.layers.0."), "{summary}");
    }
}
