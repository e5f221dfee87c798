//! `lockstep serve` through the official `openai` Python client (pinned in
//! reference/requirements.txt; `scripts/serve_client.py` drives it):
//!
//! - on SmolLM2: the models list, a completion, a chat completion and a streaming chat give
//!   exactly what `lockstep generate` gives for the same prompt (greedy, and sampled with the same
//!   seed); 8 concurrent streaming clients each get exactly the text they get alone;
//! - on a small random model: a bounded load run (200 streaming requests, 16 at a time) with no
//!   error and no mixed-up stream, memory back to its idle level; a client that disconnects frees
//!   its slot; OpenAI-style 400s; SIGINT lets the running stream finish, then the server exits 0.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

/// The reference environment's python with the `openai` client (a failure, never a skip).
fn python() -> PathBuf {
    let py = reference_python();
    let o = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} has no `openai` client (reference/requirements.txt pins it; run bash scripts/setup.sh): {}",
        py.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    py
}

impl Server {
    /// Runs `scripts/serve_client.py MODE ARGS` against this server; its JSON line.
    fn client(&self, py: &Path, mode: &str, args: &[&str]) -> Value {
        let pid = self.child.id().to_string();
        let o = Command::new(py)
            .arg(repo_root().join("scripts/serve_client.py"))
            .args(["--base-url", &self.url(), "--pid", &pid])
            .args(args)
            .arg(mode)
            .output()
            .expect("run scripts/serve_client.py");
        assert!(
            o.status.success(),
            "serve_client.py {mode} failed: {}\nserver: {}",
            String::from_utf8_lossy(&o.stderr),
            self.stderr.lock().unwrap()
        );
        let out = String::from_utf8(o.stdout).unwrap();
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    }
}

/// `lockstep generate ... --json`: the generated text and the prompt's length.
fn generate(model: &Path, args: &[&str]) -> (String, u64) {
    let mut all = vec!["generate", "--model", model.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = lockstep_ok(&all);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    (
        v["text"].as_str().unwrap().to_string(),
        v["prompt_tokens"].as_u64().unwrap(),
    )
}

const SMOLLM2: &str = "smollm2-135m-instruct";
const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: &str = "16";

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn the_openai_client_gets_what_generate_gives_and_concurrent_streams_stay_exact() {
    let py = python();
    let model = fixtures().join("models").join(SMOLLM2);
    let server = Server::start(&model, &[]);
    let got = server.client(
        &py,
        "basic",
        &["--prompt", PROMPT, "--max-tokens", MAX_TOKENS],
    );
    assert_eq!(got["model"], SMOLLM2);

    let greedy = ["--max-new-tokens", MAX_TOKENS, "--temperature", "0"];
    let (text, prompt_len) = generate(&model, &[&["--prompt", PROMPT][..], &greedy].concat());
    assert!(!text.is_empty());
    assert_eq!(got["completion"], text.as_str(), "completion vs generate");
    assert_eq!(got["completion_finish"], "length");
    let n: u64 = MAX_TOKENS.parse().unwrap();
    assert_eq!(
        got["completion_usage"],
        serde_json::json!([prompt_len, n, prompt_len + n])
    );

    let (chat, chat_len) = generate(
        &model,
        &[&["--prompt", PROMPT, "--chat"][..], &greedy].concat(),
    );
    assert_eq!(got["chat"], chat.as_str(), "chat vs generate --chat");
    assert_eq!(got["chat_stream"], chat.as_str(), "streamed chat");
    assert_eq!(got["chat_stream_usage"], serde_json::json!([chat_len, n]));
    assert_eq!(got["chat_stream_finish"], got["chat_finish"]);

    let (sampled, _) = generate(
        &model,
        &[
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            MAX_TOKENS,
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--min-p",
            "0.05",
            "--repetition-penalty",
            "1.1",
            "--seed",
            "7",
        ],
    );
    assert_eq!(got["sampled"], sampled.as_str(), "sampled, same seed");

    // A stop string: the text ends before it, finish_reason "stop".
    let stop = got["stop_string"].as_str().unwrap();
    let cut = &text[..text.find(stop).expect("the stop string is in the text")];
    assert_eq!(got["stop_text"], cut);
    assert_eq!(got["stop_finish"], "stop");

    // 8 streaming clients at once, each exactly what it gets alone (greedy and seeded sampling).
    let c = server.client(&py, "concurrent", &["--clients", "8", "--max-tokens", "12"]);
    let alone = c["alone"].as_array().unwrap();
    assert_eq!(alone.len(), 8);
    assert_eq!(c["together"], c["alone"], "concurrent streams vs alone");
    assert!(alone.iter().all(|t| !t.as_str().unwrap().is_empty()));
    assert_eq!(
        c["ids_per_stream"],
        serde_json::json!([1, 1, 1, 1, 1, 1, 1, 1])
    );

    server.interrupt();
    let (ok, log) = server.wait(Duration::from_secs(60));
    assert!(ok, "serve exited with an error: {log}");
}

/// Bytes of keys and values one cached position takes in f32 (from the model's config.json).
fn kv_bytes_per_token(model: &Path) -> u64 {
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| c[k].as_u64().unwrap();
    let heads = get("num_attention_heads");
    let head_dim = c["head_dim"].as_u64().unwrap_or(get("hidden_size") / heads);
    let kv_heads = c["num_key_value_heads"].as_u64().unwrap_or(heads);
    get("num_hidden_layers") * 2 * kv_heads * head_dim * 4
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn load_run_disconnects_errors_and_ctrl_c_on_a_small_model() {
    let py = python();
    let model = fixtures().join("models").join("qwen2-gqa");
    let server = Server::start(&model, &["--max-batch", "16"]);

    let e = server.client(&py, "errors", &[]);
    for (case, status, param) in [
        ("frequency_penalty", 400, "frequency_penalty"),
        ("presence_penalty", 400, "presence_penalty"),
        ("n", 400, "n"),
        ("temperature", 400, "temperature"),
        ("top_p", 400, "top_p"),
        ("max_tokens", 400, "max_tokens"),
        ("unknown", 400, "frobnicate"),
        ("role", 400, "messages.[0].role"),
    ] {
        let err = &e[case];
        assert_eq!(err["status"], status, "{case}: {err}");
        assert_eq!(err["type"], "invalid_request_error", "{case}: {err}");
        assert_eq!(err["param"], param, "{case}: {err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(e["model"]["status"], 404);
    assert_eq!(e["model"]["code"], "model_not_found");
    assert_eq!(e["bad_json"]["status"], 400);
    assert!(e["bad_json"]["message"].as_str().unwrap().contains("JSON"));

    // 200 streaming requests, 16 at a time; every stream equals its request alone.
    let (max_tokens, longest_prompt) = (48, 17);
    let l = server.client(
        &py,
        "load",
        &[
            "--requests",
            "200",
            "--concurrency",
            "16",
            "--max-tokens",
            &max_tokens.to_string(),
            "--token-vocab",
            "2048",
        ],
    );
    assert_eq!(l["n_errors"], 0, "{l}");
    assert_eq!(l["mixed"], serde_json::json!([]), "{l}");
    assert_eq!(l["health_after"]["running"], 0);
    assert_eq!(l["health_after"]["waiting"], 0);
    // Back to idle: what stays may not exceed a quarter of the KV caches the whole run
    // allocated (200 requests' worth): keeping every request's cache would exceed it 4 times.
    let (requests, longest) = (200, longest_prompt + max_tokens);
    let bound = requests * longest * kv_bytes_per_token(&model) / 1024 / 4;
    let (idle, after) = (
        l["rss_idle_kb"].as_u64().unwrap(),
        l["rss_after_kb"].as_u64().unwrap(),
    );
    eprintln!(
        "load: 200 requests in {:.2} s; RSS idle {idle} kB, peak {} kB, after {after} kB (bound +{bound} kB)",
        l["wall_s"].as_f64().unwrap(),
        l["rss_peak_kb"]
    );
    assert!(
        after <= idle + bound,
        "RSS {after} kB after the load run, {idle} kB idle: {l}"
    );

    let d = server.client(&py, "disconnect", &[]);
    assert_eq!(d["running_during"], 1, "{d}");
    assert_eq!(d["running_after"], 0, "{d}");
    assert_eq!(
        d["finished_delta"], 0,
        "the abandoned request must not run to its end: {d}"
    );

    // SIGINT mid-stream: the stream completes, then the server stops listening and exits 0.
    let r = server.client(&py, "drain", &["--max-tokens", "1000"]);
    assert_eq!(r["finish"], "length", "{r}");
    assert!(!r["text"].as_str().unwrap().is_empty());
    assert_eq!(r["refused_after"], true, "{r}");
    let (ok, log) = server.wait(Duration::from_secs(30));
    assert!(ok, "serve exited with an error: {log}");
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

/// Qwen3's template with `chat_template_kwargs: {"enable_thinking": false}` (vLLM's field): the
/// prompt the server tokenizes has as many tokens as transformers' `apply_chat_template` with the
/// same kwargs gives, with and without it; a kwargs value that is not an object is a 400.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn chat_template_kwargs_reach_the_template_as_transformers_passes_them() {
    let py = python();
    // The full-vocabulary Qwen3 fixture: a text's token ids fit its embedding.
    let model = fixtures().join("models").join("qwen3");
    let server = Server::start(&model, &[]);
    let dir = model.display().to_string();
    let r = server.client(&py, "thinking", &["--model-dir", &dir]);
    for case in ["default", "no_thinking"] {
        assert_eq!(
            r[case]["served_prompt_tokens"], r[case]["transformers_prompt_tokens"],
            "{case}: {r}"
        );
    }
    assert_ne!(
        r["default"]["served_prompt_tokens"], r["no_thinking"]["served_prompt_tokens"],
        "enable_thinking false must change the prompt: {r}"
    );
    assert_eq!(r["bad_kwargs"]["status"], 400, "{r}");
    assert_eq!(r["bad_kwargs"]["param"], "chat_template_kwargs", "{r}");
}

#[test]
fn serve_refuses_bad_arguments_in_one_line() {
    for (args, needle) in [
        (vec!["--model", "/nonexistent/model"], "/nonexistent/model"),
        (vec!["--model", "x", "--max-batch", "0"], "--max-batch"),
        (vec!["--model", "x", "--dtype", "f16"], "f16"),
    ] {
        let o = lockstep(&[&["serve"][..], &args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
