//! Traces from other ports: the Python trace writer's own checks, the JAX example port
//! (examples/jax_qwen2) passing the f64, f32 and bf16 tiers through `lockstep verify --port-trace`,
//! each of its porting mistakes failing at the tensor where it enters, and bad port traces refused
//! with one-line errors.

mod support;

use lockstep_trace::{TensorData, Trace};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

/// The reference python, which must also have JAX (the example's dependency; a failure naming
/// the fix when it does not).
fn jax_python() -> PathBuf {
    let py = reference_python();
    let ok = Command::new(&py)
        .args(["-c", "import jax"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "JAX missing from the reference environment; run bash scripts/setup.sh"
    );
    py
}

/// Runs a Python script of the repo with JAX's compilation cache shared between runs (the example
/// runs op by op; compiling each op again in every process would dominate the test's time).
fn python(py: &Path, args: &[&str]) -> Output {
    let o = Command::new(py)
        .args(args)
        .current_dir(repo_root())
        .env(
            "JAX_COMPILATION_CACHE_DIR",
            repo_root().join("target/jax-compile-cache"),
        )
        .env("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        .env("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        .output()
        .expect("run python");
    assert!(
        o.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The JAX port on `ids`, writing `out`.
fn port(py: &Path, model: &Path, ids: &str, dtype: &str, mistake: Option<&str>, out: &Path) {
    let mut args = vec![
        "examples/jax_qwen2/port.py",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        ids,
        "--dtype",
        dtype,
        "--out",
        out.to_str().unwrap(),
    ];
    if let Some(m) = mistake {
        args.extend(["--mistake", m]);
    }
    python(py, &args);
}

/// `lockstep verify --model MODEL --port-trace TRACES...` with its own cache folder (reference
/// traces are reused within one test); returns the exit code, the JSON report and stdout.
fn verify_port(dir: &Path, model: &Path, traces: &[&Path]) -> (Option<i32>, Value, String) {
    let js = dir.join("verify.json");
    let _ = std::fs::remove_file(&js);
    let mut args: Vec<String> = vec!["verify".into(), "--model".into(), path_str(model)];
    args.push("--port-trace".into());
    args.extend(traces.iter().map(|t| path_str(t)));
    for (flag, name) in [
        ("--report", "verify.md"),
        ("--json", "verify.json"),
        ("--plot", "verify.svg"),
        ("--html", "verify.html"),
    ] {
        args.push(flag.into());
        args.push(path_str(&dir.join(name)));
    }
    let o = lockstep_in(dir, &args);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let json = std::fs::read_to_string(&js)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    (
        o.status.code(),
        json,
        format!("{stdout}{}", String::from_utf8_lossy(&o.stderr)),
    )
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `lockstep ARGS` with `LOCKSTEP_CACHE` inside the test's scratch folder.
fn lockstep_in(dir: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .env("LOCKSTEP_PYTHON", repo_root().join(".venv/bin/python"))
        .env("LOCKSTEP_CACHE", dir.join("cache"))
        .output()
        .expect("run lockstep")
}

/// The phase named `name` of a verify JSON report.
fn phase<'a>(js: &'a Value, name: &str) -> &'a Value {
    js["phases"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no phase {name} in {js}"))
}

/// max |port − reference| on logits of the single input of a phase.
fn logits_max_abs(js: &Value, phase_name: &str) -> f64 {
    phase(js, phase_name)["comparisons"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "logits")
        .and_then(|t| t["stats"]["max_abs"].as_f64())
        .unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn writer_self_checks() {
    let py = jax_python();
    let o = Command::new(py)
        .arg(repo_root().join("reference/tests/test_writer.py"))
        .env("LOCKSTEP_BIN", env!("CARGO_BIN_EXE_lockstep"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(" 0 failed"), "{out}");
}

/// The example as written passes every tier: f64 (1e-9 on logits against the pure-f64
/// reference) and f32 on llama-gqa (qwen2-gqa: in `each_mistake_fails_where_it_enters`), and bf16
/// judged against the oracle on the bf16-stored fixtures.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn jax_port_passes_f64_f32_and_bf16_tiers() {
    let py = jax_python();
    let dir = scratch("port-tiers");
    let ids = ids_arg(&token_ids(16, 2048, 11));
    let model = fixtures().join("models/llama-gqa");
    let f64_trace = dir.join("llama-f64.safetensors");
    let f32_trace = dir.join("llama-f32.safetensors");
    port(&py, &model, &ids, "f64", None, &f64_trace);
    port(&py, &model, &ids, "f32", None, &f32_trace);
    let (code, js, out) = verify_port(&dir, &model, &[&f64_trace, &f32_trace]);
    assert_eq!(code, Some(0), "{out}");
    for p in [
        "forward logits [f64]",
        "layer-by-layer [f64]",
        "attention weights [f64]",
        "forward logits [f32]",
        "layer-by-layer [f32]",
    ] {
        assert_eq!(phase(&js, p)["status"], "pass", "{p}: {out}");
    }
    assert_eq!(phase(&js, "weights")["status"], "pass", "{out}");
    assert_eq!(phase(&js, "tokenization")["status"], "skip", "{out}");
    assert!(out.contains("jax_qwen2"), "the producer is named: {out}");
    let d64 = logits_max_abs(&js, "forward logits [f64]");
    let d32 = logits_max_abs(&js, "forward logits [f32]");
    assert!(d64 <= 1e-9, "f64 logits differ by {d64:e}");
    assert!(d32 <= 1e-4, "f32 logits differ by {d32:e}");
    eprintln!("llama-gqa: JAX port vs transformers, max |Δlogits|: f64 {d64:.2e}, f32 {d32:.2e}");
    // The port's HTML report renders: one chart per tier (f64, f32), one group per layer.
    let layers: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let layers = layers["num_hidden_layers"].as_u64().unwrap() as usize;
    assert_html_renders(&dir.join("verify.html"), 2, layers, "port-pass");
    // The same f32 trace as a trace folder (one part file per layer, as a port of a model bigger
    // than memory would write it): the same verdict, every op judged from the folder too.
    let folder = dir.join("llama-f32.trace");
    lockstep_trace::write_parts(&Trace::read(&f32_trace).unwrap(), &folder).unwrap();
    let (code, js_folder, out) = verify_port(&dir, &model, &[&folder]);
    assert_eq!(code, Some(0), "{out}");
    for p in ["forward logits [f32]", "layer-by-layer [f32]"] {
        assert_eq!(phase(&js_folder, p)["status"], "pass", "{p}: {out}");
    }
    let ops = phase(&js_folder, "op-level (each op on its own inputs) [f32]");
    assert_eq!(ops["status"], "pass", "{out}");
    assert_eq!(
        logits_max_abs(&js_folder, "forward logits [f32]"),
        d32,
        "the folder is the file's trace"
    );

    for name in ["qwen2-gqa-bf16", "llama-gqa-bf16"] {
        let model = fixtures().join("models").join(name);
        let trace = dir.join(format!("{name}.safetensors"));
        port(&py, &model, &ids, "bf16", None, &trace);
        let (code, js, out) = verify_port(&dir, &model, &[&trace]);
        assert_eq!(code, Some(0), "{name}: {out}");
        assert_eq!(phase(&js, "layer-by-layer [bf16]")["status"], "pass");
        eprintln!(
            "{name}: JAX port bf16 vs transformers bf16, max |Δlogits| {:.2e}",
            logits_max_abs(&js, "forward logits [bf16]")
        );
    }
}

/// The example as written passes the f64 and f32 tiers on qwen2-gqa; each porting mistake makes
/// `verify --port-trace` fail, with the first divergence at the tensor where the mistake enters,
/// in the tier where it shows (eps placement moves RMSNorm by ~1e-6 relative, about f32's own
/// noise: the f64 tier is the one that reliably pins it to `input_norm`). The
/// `default-precision` switch is a no-op on CPU (XLA:CPU computes f32 dots in full f32 whatever
/// the precision): its trace is bit-identical to the careful port's and passes; its TPU
/// behaviour (`default-precision-tpu`) is caught in f32.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn each_mistake_fails_where_it_enters() {
    let py = jax_python();
    let dir = scratch("port-mistakes");
    let model = fixtures().join("models/qwen2-gqa");
    let ids = ids_arg(&token_ids(8, 2048, 21));
    let cases: [(&str, &str, Option<&str>); 8] = [
        ("f32", "as-written", None),
        ("f64", "as-written", None),
        ("f32", "default-precision", None),
        ("f32", "default-precision-tpu", Some("layers.0.q")),
        ("f64", "no-qkv-bias", Some("layers.0.q")),
        ("f64", "interleaved-rope", Some("layers.0.q_rope")),
        ("f64", "rope-bf16-inv-freq", Some("layers.0.q_rope")),
        ("f64", "eps-outside-sqrt", Some("layers.0.input_norm")),
    ];
    let mut traces = vec![];
    for (dtype, mistake, _) in &cases {
        let out = dir.join(format!("{mistake}-{dtype}.safetensors"));
        let m = (*mistake != "as-written").then_some(*mistake);
        port(&py, &model, &ids, dtype, m, &out);
        traces.push(out);
    }
    let careful = Trace::read(&traces[0]).unwrap();
    let default = Trace::read(&traces[2]).unwrap();
    for name in careful.names() {
        assert_eq!(
            careful.get(name).unwrap().data.to_f64(),
            default.get(name).unwrap().data.to_f64(),
            "default-precision changed {name} on CPU"
        );
    }

    let refs: Vec<&Path> = traces.iter().map(PathBuf::as_path).collect();
    let (code, js, out) = verify_port(&dir, &model, &refs);
    assert_eq!(code, Some(1), "{out}");
    let mut seen = 0;
    for tier in ["f32", "f64"] {
        let inputs = phase(&js, &format!("layer-by-layer [{tier}]"))["comparisons"]["inputs"]
            .as_array()
            .unwrap()
            .clone();
        for c in inputs {
            let producer = c["test_producer"].as_str().unwrap();
            let mistake = producer
                .strip_prefix("jax_qwen2[")
                .and_then(|m| m.strip_suffix(']'))
                .unwrap_or("as-written");
            let (_, _, expected) = cases
                .iter()
                .find(|(d, m, _)| *d == tier && *m == mistake)
                .unwrap_or_else(|| panic!("unexpected input {producer} in {tier}"));
            match expected {
                None => assert_eq!(c["passed"], true, "{producer} should pass: {c}"),
                Some(t) => {
                    assert_eq!(c["passed"], false, "{producer} should fail: {c}");
                    assert_eq!(c["first_divergence"], *t, "{producer}: {}", c["verdict"]);
                }
            }
            seen += 1;
        }
    }
    assert_eq!(seen, cases.len(), "{out}");
}

/// Port traces the verifier cannot use are refused with one line naming the file and the fix.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bad_port_traces_are_refused() {
    reference_python();
    let dir = scratch("port-bad");
    let model = fixtures().join("models/qwen2-gqa");
    let good = dir.join("good.safetensors");
    trace_to(&model, "5,17,300", "f32", &good);
    let edit = |name: &str, f: &dyn Fn(&mut Trace)| {
        let mut t = Trace::read(&good).unwrap();
        f(&mut t);
        let p = dir.join(name);
        t.write(&p).unwrap();
        p
    };
    let no_dtype = edit("no-dtype.safetensors", &|t| {
        t.metadata.remove("dtype");
    });
    // A bf16 trace (its values rounded to bf16, so the claim holds) on an f32-stored checkpoint.
    let bf16 = edit("bf16.safetensors", &|t| {
        t.metadata.insert("dtype".into(), "bf16".into());
        for name in t
            .names()
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
        {
            if let TensorData::F32(v) = &mut t.get_mut(&name).unwrap().data {
                for x in v.iter_mut() {
                    // Round to nearest even at bf16's 8 mantissa bits (the values are finite).
                    let b = x.to_bits();
                    *x = f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
                }
            }
        }
    });
    let ids_disagree = edit("ids.safetensors", &|t| {
        t.metadata.insert("token_ids".into(), "[5, 17, 301]".into());
    });
    for (trace, fragment) in [
        (&no_dtype, "no `dtype` metadata"),
        (&bf16, "is not stored in bf16"),
        (
            &ids_disagree,
            "token_ids metadata and the tokens tensor disagree",
        ),
    ] {
        let (code, _, out) = verify_port(&dir, &model, &[trace.as_path()]);
        assert_eq!(code, Some(2), "{out}");
        let err = out.lines().find(|l| l.starts_with("error:")).unwrap_or("");
        assert!(err.contains(fragment), "{fragment:?} not in: {out}");
        assert!(
            err.contains(trace.file_name().unwrap().to_str().unwrap()),
            "{out}"
        );
    }
    let o = lockstep_in(
        &dir,
        &[
            "verify".into(),
            "--port-trace".into(),
            path_str(&good),
            "--inject".into(),
            "no-qkv-bias".into(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
}

/// A port picks its tier through its `dtype` metadata; the claim is checked against the data. A
/// trace that says bf16 but holds float32 values (an f32 trace relabelled) did not compute in
/// bf16: it is judged as f32, against transformers in f32, and the report says so (before, it was
/// judged with the bf16 yardstick, or refused for the f32-stored checkpoint).
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_bf16_claim_with_f32_data_is_judged_as_f32() {
    reference_python();
    let dir = scratch("port-claim");
    let model = fixtures().join("models/qwen2-gqa");
    let f32_trace = dir.join("f32.safetensors");
    trace_to(&model, "5,17,300,2", "f32", &f32_trace);
    let mut t = Trace::read(&f32_trace).unwrap();
    t.metadata.insert("dtype".into(), "bf16".into());
    t.metadata
        .insert("producer".into(), "relabelled-port".into());
    let claimed = dir.join("claims-bf16.safetensors");
    t.write(&claimed).unwrap();

    let (code, js, out) = verify_port(&dir, &model, &[claimed.as_path()]);
    assert_eq!(code, Some(0), "{out}");
    let note = "claimed bf16, data is f32: judged as f32";
    assert!(out.contains(note), "{out}");
    let logits = phase(&js, "forward logits [f32]");
    assert_eq!(logits["status"], "pass", "{logits}");
    assert!(
        logits["summary"].as_str().unwrap().contains(note),
        "{logits}"
    );
    assert_eq!(phase(&js, "layer-by-layer [f32]")["status"], "pass");
    let phases = js["phases"].as_array().unwrap();
    assert!(
        phases
            .iter()
            .all(|p| !p["name"].as_str().unwrap().contains("[bf16]")),
        "{js}"
    );
}

/// The upcast mistakes bf16 ports make, judged op by op on a 15-token sentence in the bf16 tier
/// (the old report's precision): each fails the op-level phase at the op where it enters, while
/// the careful JAX port and PyTorch's own bf16 trace, submitted as port traces, pass every op
/// (zero false alarms). End-to-end tolerances cannot see these: the mistakes are the size of the
/// rounding accumulated before them.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn upcast_mistakes_are_named_where_they_enter_in_bf16() {
    let py = jax_python();
    let dir = scratch("port-upcast-bf16");
    let model = fixtures().join("models/qwen2-default-bf16");
    let prompt = "The quick brown fox jumps over the lazy dog, and 12 of";
    let ids = lockstep_ok(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        prompt,
    ]);
    let ids = ids.lines().last().unwrap().trim().trim_matches(['[', ']']);
    let ids: String = ids.split(',').map(str::trim).collect::<Vec<_>>().join(",");
    assert!(ids.split(',').count() <= 16, "{ids}");
    let cases: [(&str, Option<&str>); 3] = [
        ("as-written", None),
        ("softmax-bf16", Some("layers.0.attn_probs")),
        ("rope-bf16-inv-freq", Some("layers.0.q_rope")),
    ];
    let mut traces = vec![];
    for (mistake, _) in &cases {
        let out = dir.join(format!("{mistake}.safetensors"));
        let m = (*mistake != "as-written").then_some(*mistake);
        port(&py, &model, &ids, "bf16", m, &out);
        traces.push(out);
    }
    // PyTorch itself, as a port: its own bf16 trace.
    let torch = dir.join("pytorch-bf16.safetensors");
    reference(
        &py,
        &[
            "trace",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &ids,
            "--dtype",
            "bf16",
            "--out",
            torch.to_str().unwrap(),
        ],
    );
    traces.push(torch);
    let refs: Vec<&Path> = traces.iter().map(PathBuf::as_path).collect();
    let (code, js, out) = verify_port(&dir, &model, &refs);
    assert_eq!(code, Some(1), "{out}");
    let ops = js["op_level"].as_array().expect("op_level in the JSON");
    let find = |needle: &str| {
        ops.iter()
            .find(|o| o["input"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no op-level entry for {needle}: {out}"))
    };
    for (mistake, expected) in &cases {
        let needle = if *mistake == "as-written" {
            "(jax_qwen2)".to_string()
        } else {
            format!("[{mistake}]")
        };
        let o = find(&needle);
        assert_eq!(o["tier"], "bf16");
        match expected {
            None => assert_eq!(o["passed"], true, "{mistake}: {}", o["verdict"]),
            Some(t) => {
                assert_eq!(o["passed"], false, "{mistake}: {}", o["verdict"]);
                assert_eq!(o["first_divergence"], *t, "{mistake}: {}", o["verdict"]);
            }
        }
    }
    let torch = find("(transformers)");
    assert_eq!(
        torch["passed"], true,
        "PyTorch as a port: {}",
        torch["verdict"]
    );
}
