//! `lockstep verify --endpoint URL` against `lockstep serve` on the loopback address, on a small
//! random model (qwen2-gqa):
//!
//! - a correct server passes: every greedy token is the reference's argmax, the top-k
//!   log-probabilities within the f32 yardstick;
//! - `serve --inject softmax-bf16` keeps greedy identical but fails the log-probabilities, and the
//!   report says which prompt, which step and how far; `serve --inject no-final-norm` fails greedy;
//! - a bad URL, a server that is down and a server that is not OpenAI-compatible are one-line
//!   errors with exit 2.

mod support;

use std::io::{Read, Write};
use support::*;

const MODEL: &str = "qwen2-gqa";

fn model() -> std::path::PathBuf {
    reference_python();
    let m = fixtures().join("models").join(MODEL);
    assert!(
        m.join("config.json").exists(),
        "fixture {MODEL} missing: run bash scripts/fixtures.sh"
    );
    m
}

/// The phase named `name` in the JSON report.
fn phase<'a>(run: &'a VerifyRun, name: &str) -> &'a serde_json::Value {
    run.json["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases in the JSON report: {}", run.stdout))
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no phase {name}: {}", run.stdout))
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_correct_server_passes_and_injected_faults_fail_saying_where() {
    let model = model();
    let m = model.to_str().unwrap();

    // A correct server: every default input, greedy identical and log-probabilities within f32.
    let server = Server::start(&model, &[]);
    let dir = scratch("endpoint-pass");
    let run = verify_in(&dir, &["--endpoint", &server.url(), "--model", m]);
    run.assert_exit(0);
    run.assert_pass(&[
        "endpoint",
        "greedy continuation [f32]",
        "top-k log-probabilities [f32]",
    ]);
    let title = run.json["title"].as_str().unwrap_or_default();
    assert!(
        title.contains(&server.url()) && title.contains(MODEL),
        "the report names the server: {title}"
    );
    // lockstep serve takes `echo` and token ids: the prompt positions are judged too.
    let ep = phase(&run, "endpoint")["summary"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        ep.contains("(echo): yes") && ep.contains("return_tokens_as_token_ids"),
        "{ep}"
    );
    let lp = phase(&run, "top-k log-probabilities [f32]")["summary"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(lp.contains("judged (echo: true)"), "{lp}");
    let greedy = phase(&run, "greedy continuation [f32]");
    let summary = greedy["summary"].as_str().unwrap();
    // 5 inputs × 32 tokens, each the reference's argmax (an EOS may end one early).
    let n: usize = summary.split('/').next().unwrap().parse().unwrap();
    assert!(
        n > 100 && summary.starts_with(&format!("{n}/{n} ")),
        "{summary}"
    );
    let md = std::fs::read_to_string(dir.join("r.md")).unwrap();
    assert!(md.contains("max \\|Δ logprob\\|"), "{md}");
    // The long paragraph's prompt positions (about 300) were judged beside its 32 tokens.
    let row = md
        .lines()
        .find(|l| l.starts_with("| long paragraph | 32 gen + "))
        .unwrap_or_else(|| panic!("{md}"));
    let echoed: usize = row["| long paragraph | 32 gen + ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(echoed > 250, "{row}");
    drop(server);

    // The attention softmax in bf16: greedy still identical, the log-probabilities are not.
    let server = Server::start(&model, &["--inject", "softmax-bf16"]);
    let dir = scratch("endpoint-softmax-bf16");
    let args = ["--endpoint", &server.url(), "--model", m];
    let run = verify_in(
        &dir,
        &[&args[..], &["--prompt", "Hello", "--single-only"]].concat(),
    );
    run.assert_exit(1);
    run.assert_pass(&["greedy continuation [f32]"]);
    let lp = phase(&run, "top-k log-probabilities [f32]");
    assert_eq!(lp["status"], "fail", "{lp}");
    let why = lp["summary"].as_str().unwrap();
    assert!(
        why.contains("\"Hello\": generated step ") && why.contains("|Δ logprob|"),
        "which prompt and step: {why}"
    );
    // The distance, well over a bound that comes from the reference's own noise.
    let d: f64 = why
        .split("|Δ logprob| ")
        .nth(2)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no distance in {why}"));
    assert!(d > 1e-3, "{why}");
    assert!(why.contains("> bound 1.0e-4"), "{why}");
    drop(server);

    // No final norm: the greedy tokens themselves differ, beyond any near-tie.
    let server = Server::start(&model, &["--inject", "no-final-norm"]);
    let dir = scratch("endpoint-no-final-norm");
    let args = ["--endpoint", &server.url(), "--model", m];
    let run = verify_in(
        &dir,
        &[&args[..], &["--prompt", "Hello", "--single-only"]].concat(),
    );
    run.assert_exit(1);
    let greedy = phase(&run, "greedy continuation [f32]");
    assert_eq!(greedy["status"], "fail", "{greedy}");
    let why = greedy["summary"].as_str().unwrap();
    assert!(
        why.contains("\"Hello\": generated step") && why.contains("the server chose token"),
        "{why}"
    );
}

/// Runs `verify --endpoint URL` and asserts a one-line error with exit 2 containing `expect`.
fn assert_one_line_error(url: &str, expect: &str) {
    let dir = scratch("endpoint-errors");
    let m = model();
    let run = verify_in(&dir, &["--endpoint", url, "--model", m.to_str().unwrap()]);
    run.assert_exit(2);
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(expect), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bad_urls_dead_and_foreign_servers_are_one_line_errors() {
    assert_one_line_error("https://127.0.0.1:1/v1", "https is not supported");
    assert_one_line_error("127.0.0.1:8080", "expected http://HOST:PORT/v1");
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_one_line_error(
        &format!("http://127.0.0.1:{port}/v1"),
        "is the server running?",
    );
    // A server that answers HTML, and one that answers JSON of another shape.
    for (body, expect) in [
        ("<html>hello</html>", "did not answer JSON"),
        ("{\"object\":\"list\"}", "not an OpenAI-compatible answer"),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = body.to_string();
        std::thread::spawn(move || {
            for mut s in listener.incoming().map_while(Result::ok) {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        assert_one_line_error(&format!("http://127.0.0.1:{port}/v1"), expect);
    }
}
