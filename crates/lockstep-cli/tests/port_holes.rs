//! Holes in judging other ports' traces (`lockstep verify --port-trace`), each closed by a test
//! that failed before its fix:
//!
//! - a port trace that omits a tensor fails, naming it as MISSING (docs/trace-format.md once said
//!   omitted tensors were skipped; the comparator always failed them, and now the docs say so).
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
/// out `--omit NAME`.
const PORT_SCRIPT: &str = r#"
import argparse, json
from safetensors import safe_open
from lockstep_reference.writer import TraceWriter

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--source", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--omit", action="append", default=[])
a = ap.parse_args()
w = TraceWriter(a.model)
with safe_open(a.source, "np") as f:
    meta = f.metadata()
    for name in w.names:
        if name != "tokens" and name not in a.omit:
            w.tap(name, f.get_tensor(name))
w.save(a.out, {"producer": "python-port", "dtype": meta["dtype"], "token_ids": json.loads(meta["token_ids"])})
print(json.dumps({"missing": w.missing()}))
"#;

struct Setup {
    py: PathBuf,
    dir: PathBuf,
    model: PathBuf,
    /// lockstep's own f32 trace of the model on [`IDS`].
    source: PathBuf,
}

fn setup(name: &str) -> Option<Setup> {
    let py = reference_python()?;
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
    Some(Setup {
        py,
        dir,
        model,
        source,
    })
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
fn a_port_trace_missing_one_tensor_fails_naming_it() {
    let Some(s) = setup("port-holes-missing") else {
        return;
    };
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
