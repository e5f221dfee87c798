//! Non-finite values never pass (issue 10): a checkpoint with one NaN weight in
//! `model.layers.1.mlp.down_proj.weight` fails `verify` (exit 1) in every phase that sees the NaN,
//! with the weight and the tensor where the NaN enters named; `generate` stops with one line;
//! `trace` says where the NaN first appears; `compare` fails two traces that are NaN at the same
//! places.

mod support;

use std::path::{Path, PathBuf};
use support::*;

/// The weight that gets the NaN, and where.
const WEIGHT: &str = "model.layers.1.mlp.down_proj.weight";
const AT: [usize; 2] = [5, 7];

/// A copy of fixture model `fixture` in `dir/model` with `WEIGHT[AT]` set to NaN.
fn nan_checkpoint(dir: &Path, fixture: &str) -> PathBuf {
    let src = fixtures().join("models").join(fixture);
    assert!(
        src.join("model.safetensors").is_file(),
        "fixture {} missing: run bash scripts/fixtures.sh",
        src.display()
    );
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let path = dst.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let (offset, cols) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(WEIGHT).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let cols = view.shape()[1];
        (
            view.data().as_ptr() as usize - bytes.as_ptr() as usize,
            cols,
        )
    };
    let at = offset + (AT[0] * cols + AT[1]) * 4;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    dst
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn verify_fails_a_nan_weight_and_names_it_and_where_it_enters() {
    reference_python();
    let dir = scratch("nonfinite-verify");
    // The full Qwen2 vocabulary (the default prompts' ids fit), two layers.
    let model = nan_checkpoint(&dir, "qwen2-default");
    let run = verify_in(
        &dir,
        &[
            "--model",
            model.to_str().unwrap(),
            "--dtype",
            "f32",
            "--single-only",
            "--generate-tokens",
            "0",
        ],
    );
    run.assert_exit(1);
    let js = &run.json;
    assert_eq!(js["passed"], false, "{js}");
    assert_eq!(js["first_divergence"], "layers.1.mlp_out", "{js}");
    let phases = js["phases"].as_array().unwrap();
    let status = |name: &str| {
        phases
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no phase {name}: {js}"))["status"]
            .clone()
    };
    // Every phase that sees the NaN fails: the weights and both forward phases. Tokenization
    // never sees it, nor do the attention weights (both layers' attention come before
    // layers.1.mlp_out, the last layer's MLP).
    for p in [
        "weights",
        "non-finite values",
        "single-token forward [f32]",
        "layer-by-layer [f32]",
    ] {
        assert_eq!(status(p), "fail", "{p}: {}", run.stdout);
    }
    for p in phases {
        if p["status"] == "pass" {
            assert!(
                p["name"] == "tokenization" || p["name"] == "attention weights [f32]",
                "{p}"
            );
        }
    }
    let weights = phases.iter().find(|p| p["name"] == "weights").unwrap();
    let summary = weights["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("`{WEIGHT}`: 1 NaN, first at [5, 7]")),
        "{summary}"
    );
    let sentence = phases
        .iter()
        .find(|p| p["name"] == "non-finite values")
        .unwrap()["summary"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sentence,
        format!("NaN in {WEIGHT}[5, 7] reaches layers.1.mlp_out on both sides")
    );
    // The layer-by-layer comparison: where it first appears on each side, and the cause.
    let lbl = phases
        .iter()
        .find(|p| p["name"] == "layer-by-layer [f32]")
        .unwrap();
    let input = &lbl["comparisons"]["inputs"][0];
    for side in ["first_nonfinite_reference", "first_nonfinite_test"] {
        assert_eq!(input[side]["tensor"], "layers.1.mlp_out", "{side}: {input}");
        assert_eq!(input[side]["index"][2], 5, "{side}: {input}");
    }
    let verdict = input["verdict"].as_str().unwrap();
    assert!(
        verdict.contains("layers.1.mlp_out") && verdict.contains("non-finite"),
        "{verdict}"
    );
    assert!(!verdict.contains("causal mask"), "{verdict}");
    // The single-token phase (logits only) blames upstream, not lm_head.
    let single = phases
        .iter()
        .find(|p| p["name"] == "single-token forward [f32]")
        .unwrap();
    assert!(
        single["summary"]
            .as_str()
            .unwrap()
            .contains("carried from `layers.1.mlp_out`"),
        "{single}"
    );
    let md = std::fs::read_to_string(dir.join("r.md")).unwrap();
    assert!(md.contains(WEIGHT), "{md}");
    assert!(
        md.contains("Non-finite values (NaN/inf) first appear"),
        "{md}"
    );
    assert!(md.contains("reference: NaN at `layers.1.mlp_out`"), "{md}");
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn generate_stops_with_one_line_naming_the_first_nonfinite_tensor() {
    let dir = scratch("nonfinite-generate");
    let model = nan_checkpoint(&dir, "qwen2-tied-3layer");
    let o = lockstep(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "5,17,300,2",
        "--max-new-tokens",
        "8",
    ]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    let line = errors[0];
    assert!(line.contains("generation step 0 are NaN"), "{line}");
    assert!(
        line.contains("first non-finite tensor: NaN at layers.1.mlp_out[0, 0, 5]"),
        "{line}"
    );
    assert!(
        line.contains(&format!("{WEIGHT} (1 NaN, first at [5, 7])")),
        "{line}"
    );
    // No token was chosen from the garbage.
    assert!(String::from_utf8_lossy(&o.stdout).trim().is_empty());

    // A batch stops the same way.
    let o = lockstep(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "5,17",
        "--tokens",
        "300,2,9",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("layers.1.mlp_out"));
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn trace_says_where_and_compare_fails_nan_at_the_same_places() {
    let dir = scratch("nonfinite-compare");
    let model = nan_checkpoint(&dir, "qwen2-tied-3layer");
    let mut traces = vec![];
    for name in ["a", "b"] {
        let out = dir.join(format!("{name}.safetensors"));
        let o = lockstep(&[
            "trace",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "5,17,300,2",
            "--dtype",
            "f64",
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = stderr_of(&o);
        assert!(o.status.success(), "{err}");
        assert!(out.is_file());
        assert!(
            err.contains(
                "the forward pass is not finite: first NaN at `layers.1.mlp_out`[0, 0, 5]"
            ),
            "{err}"
        );
        traces.push(out);
    }
    let js = dir.join("cmp.json");
    let o = lockstep(&[
        "compare",
        traces[0].to_str().unwrap(),
        traces[1].to_str().unwrap(),
        "--json",
        js.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{stdout}{}", stderr_of(&o));
    assert!(
        stdout.contains("first_divergence: layers.1.mlp_out"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&js).unwrap()).unwrap();
    assert_eq!(v["passed"], false);
    assert_eq!(
        v["first_nonfinite"]["reference"]["tensor"],
        "layers.1.mlp_out"
    );
    assert_eq!(v["first_nonfinite"]["test"]["tensor"], "layers.1.mlp_out");
    // The clean fixture still traces without a warning and compares equal to itself.
    let clean = fixtures().join("models/qwen2-tied-3layer");
    let c = dir.join("clean.safetensors");
    let o = lockstep(&[
        "trace",
        "--model",
        clean.to_str().unwrap(),
        "--tokens",
        "5,17,300,2",
        "--dtype",
        "f64",
        "--out",
        c.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(!stderr_of(&o).contains("not finite"), "{}", stderr_of(&o));
    let o = lockstep(&["compare", c.to_str().unwrap(), c.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn chat_stops_with_one_line_naming_the_first_nonfinite_tensor() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = scratch("nonfinite-chat");
    // A fixture with the full Qwen2 vocabulary: the chat template's special tokens fit.
    let model = nan_checkpoint(&dir, "qwen2-default");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["chat", "--model", model.to_str().unwrap()])
        .args(["--max-new-tokens", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello\nAnd again\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("first non-finite tensor: NaN at layers.1.mlp_out"),
        "{err}"
    );
    assert!(errors[0].contains(WEIGHT), "{err}");
}
