//! Generation tests: `lockstep generate` greedy output token for token against
//! `transformers.generate` (f32, eager attention) on the real SmolLM2-135M-Instruct weights and on
//! random fixture models; seeded sampling; the SmolLM2 chat template against `apply_chat_template`;
//! streaming, stop strings and bad input.
//!
//! The transformers side runs in one `generate-batch` process (started first, in parallel with the
//! lockstep runs).

mod support;

use lockstep_engine::chat::{ChatTemplate, Message};
use lockstep_engine::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::*;

const SMOLLM2: &str = "smollm2-135m-instruct";
/// SmolLM2's weights saved as Qwen2 with random q/k/v biases (a realistic Qwen2 case).
const SMOLLM2_QWEN2: &str = "smollm2-as-qwen2";
const NEW_TOKENS: usize = 64;

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The SmolLM2 fixture (a failure naming the fix when set-up has not made it).
fn smollm2() -> PathBuf {
    reference_python();
    let d = model_dir(SMOLLM2);
    assert!(
        d.join("lockstep-fixture.json").exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh`",
        d.display()
    );
    d
}

/// A fixture model folder; a model missing from set-up fixtures is a failure naming it and how
/// to make it.
fn fixture_model(name: &str) -> PathBuf {
    reference_python();
    let d = model_dir(name);
    assert!(
        d.join("config.json").exists(),
        "fixture {} missing: create it with `bash scripts/fixtures.sh`",
        d.display()
    );
    d
}

/// Runs `lockstep generate ARGS --json`; returns (streamed stdout text before the JSON line, JSON).
fn generate_json(args: &[&str]) -> (String, Value) {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = lockstep_ok(&all);
    let body = out.strip_suffix('\n').unwrap_or(&out);
    let (streamed, last) = body.rsplit_once('\n').unwrap_or(("", body));
    let v: Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line not JSON ({e}): {last}"));
    (streamed.to_string(), v)
}

/// Starts `python -m lockstep_reference generate-batch` on `jobs` in the background.
fn spawn_reference(py: &Path, jobs: &Value, dir: &Path) -> std::process::Child {
    let path = dir.join("generate-jobs.json");
    std::fs::write(&path, jobs.to_string()).unwrap();
    Command::new(py)
        .args(["-m", "lockstep_reference", "generate-batch"])
        .arg(&path)
        .current_dir(repo_root().join("reference"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference")
}

struct Case {
    label: String,
    /// lockstep arguments (model, prompt and limits; --json is added).
    args: Vec<String>,
    /// The generate-batch job.
    job: Value,
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn greedy_generation_matches_transformers_token_for_token() {
    let smol = smollm2();
    let py = reference_python();
    let smol_s = smol.to_str().unwrap().to_string();
    let n = NEW_TOKENS.to_string();
    let mut cases = vec![];
    // SmolLM2: chat-formatted and plain prompts; EOS on both sides as the checkpoint says.
    for q in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
    ] {
        cases.push(Case {
            label: format!("smollm2 chat {q:?}"),
            args: vec!["--model".into(), smol_s.clone(), "--chat".into(), "--prompt".into(), q.into(), "--max-new-tokens".into(), n.clone(), "--temperature".into(), "0".into()],
            job: json!({"model": smol_s, "messages": [{"role": "user", "content": q}], "max_new_tokens": NEW_TOKENS, "ignore_eos": false}),
        });
    }
    for p in ["The three primary colors are", "def fibonacci(n):"] {
        cases.push(Case {
            label: format!("smollm2 {p:?}"),
            args: vec!["--model".into(), smol_s.clone(), "--prompt".into(), p.into(), "--max-new-tokens".into(), n.clone(), "--temperature".into(), "0".into()],
            job: json!({"model": smol_s, "prompt": p, "max_new_tokens": NEW_TOKENS, "ignore_eos": false}),
        });
    }
    // The same trained weights as a Qwen2 checkpoint with random q/k/v biases.
    let qwen2_smol = model_dir(SMOLLM2_QWEN2).to_str().unwrap().to_string();
    let q = "What is the capital of France?";
    cases.push(Case {
        label: format!("smollm2-as-qwen2 chat {q:?}"),
        args: vec!["--model".into(), qwen2_smol.clone(), "--chat".into(), "--prompt".into(), q.into(), "--max-new-tokens".into(), n.clone(), "--temperature".into(), "0".into()],
        job: json!({"model": qwen2_smol, "messages": [{"role": "user", "content": q}], "max_new_tokens": NEW_TOKENS, "ignore_eos": false}),
    });
    // Random fixture models: token prompts, EOS ignored on both sides (exactly 64 tokens).
    for (name, seed) in [
        ("qwen2-gqa", 11u64),
        ("llama-gqa", 12),
        ("qwen2-tied-3layer", 13),
        // Sliding windows of 8 and 6 keys: 9 prompt + 64 new tokens run far past them.
        ("mistral-swa", 15),
        ("qwen2-swa", 16),
        ("qwen3-small", 14),
        ("qwen3-moe-small", 17),
        // RoPE scaling: llama3 (Llama 3.1's) and yarn (Qwen2.5's, bf16-stored, run in f32).
        ("llama3-rope-small", 17),
        ("qwen2-yarn-bf16-small", 18),
    ] {
        let dir = model_dir(name);
        let d = dir.to_str().unwrap().to_string();
        let prompt = token_ids(9, 2048, seed);
        cases.push(Case {
            label: format!("{name} tokens"),
            args: vec!["--model".into(), d.clone(), "--tokens".into(), ids_arg(&prompt), "--max-new-tokens".into(), n.clone(), "--ignore-eos".into(), "--temperature".into(), "0".into()],
            job: json!({"model": d, "tokens": prompt, "max_new_tokens": NEW_TOKENS, "ignore_eos": true}),
        });
    }
    // The repetition penalty applies to greedy decoding too: same processor, same tokens.
    let d = model_dir("llama-gqa").to_str().unwrap().to_string();
    let prompt = token_ids(9, 2048, 14);
    cases.push(Case {
        label: "llama-gqa tokens, repetition penalty 1.3".into(),
        args: vec![
            "--model".into(),
            d.clone(),
            "--tokens".into(),
            ids_arg(&prompt),
            "--max-new-tokens".into(),
            n.clone(),
            "--ignore-eos".into(),
            "--temperature".into(),
            "0".into(),
            "--repetition-penalty".into(),
            "1.3".into(),
        ],
        job: json!({"model": d, "tokens": prompt, "max_new_tokens": NEW_TOKENS, "ignore_eos": true, "repetition_penalty": 1.3}),
    });
    let dir = scratch("generation-greedy");
    let jobs = Value::Array(cases.iter().map(|c| c.job.clone()).collect());
    let child = spawn_reference(&py, &jobs, &dir);

    let mut ours = vec![];
    for c in &cases {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let (streamed, v) = generate_json(&args);
        // What streamed is exactly the final text (UTF-8-safe incremental detokenization).
        assert_eq!(
            streamed,
            v["text"].as_str().unwrap(),
            "{}: streamed text",
            c.label
        );
        ours.push(v);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let theirs: Vec<Value> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    let mut failures = vec![];
    eprintln!("| case | prompt tokens | lockstep | transformers | identical | decode tok/s |");
    for ((c, o), t) in cases.iter().zip(&ours).zip(&theirs) {
        let (op, tp) = (ids(&o["prompt_ids"]), ids(&t["prompt_ids"]));
        let (og, tg) = (ids(&o["generated_tokens"]), ids(&t["generated"]));
        let same = og.iter().zip(&tg).take_while(|(a, b)| a == b).count();
        eprintln!(
            "| {} | {} | {} | {} | {same}/{} | {:.1} |",
            c.label,
            op.len(),
            og.len(),
            tg.len(),
            tg.len(),
            o["decode_tok_s"].as_f64().unwrap()
        );
        if op != tp {
            failures.push(format!(
                "{}: prompt ids differ: lockstep {op:?}, transformers {tp:?}",
                c.label
            ));
        }
        if og != tg {
            failures.push(format!(
                "{}: generations differ from token {same}: lockstep {og:?}, transformers {tg:?}",
                c.label
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The real model answers the question (transformers says "Paris" too, greedy).
    assert_eq!(ours[0]["text"], "The capital of France is Paris.");
    assert_eq!(ours[0]["finish_reason"], "eos");
    assert_eq!(ours[4]["text"], "The capital of France is Paris.");
    for o in &ours[5..] {
        assert_eq!(ids(&o["generated_tokens"]).len(), NEW_TOKENS);
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn same_seed_same_sample_and_seeds_differ() {
    let smol = smollm2();
    let m = smol.to_str().unwrap();
    let run = |seed: &str| {
        generate_json(&[
            "--model",
            m,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0.9",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--min-p",
            "0.02",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
        ])
        .1
    };
    let a = run("1");
    let b = run("1");
    let c = run("2");
    assert_eq!(a["generated_tokens"], b["generated_tokens"]);
    assert_eq!(a["text"], b["text"]);
    assert_eq!(a["seed"], 1);
    assert_eq!(a["sampling"]["do_sample"], true);
    assert_ne!(
        a["generated_tokens"], c["generated_tokens"],
        "seeds 1 and 2 gave the same sample"
    );
    // Fast check on a random model too: 5 seeds, 5 different samples, each reproducible.
    let d = model_dir("qwen2-gqa");
    let d = d.to_str().unwrap();
    let sample = |seed: u64| {
        generate_json(&[
            "--model",
            d,
            "--tokens",
            "1,2,3",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1",
            "--ignore-eos",
            "--seed",
            &seed.to_string(),
        ])
        .1["generated_tokens"]
            .clone()
    };
    let samples: Vec<Value> = (0..5).map(sample).collect();
    for i in 0..5 {
        for j in i + 1..5 {
            assert_ne!(samples[i], samples[j], "seeds {i} and {j}");
        }
    }
    assert_eq!(samples[3], sample(3));
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn smollm2_chat_template_renders_like_apply_chat_template() {
    let smol = smollm2();
    let py = reference_python();
    let conversations = json!([
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "tools": null},
        {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. What do you need?"},
            {"role": "user", "content": "Tell me a joke about naïve café owners 😀."}
        ], "tools": null},
        {"messages": [
            {"role": "user", "content": "Weather in Paris?"}
        ], "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]},
        {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"}
        ], "tools": null}
    ]);
    let dir = scratch("generation-chat-template");
    let path = dir.join("conversations.json");
    std::fs::write(&path, conversations.to_string()).unwrap();
    let out = reference(
        &py,
        &[
            "chat-batch",
            "--model",
            smol.to_str().unwrap(),
            "--conversations",
            path.to_str().unwrap(),
        ],
    );
    let theirs: Vec<Value> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let template = ChatTemplate::from_dir(&smol)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let tok = Tokenizer::from_dir(&smol).unwrap();
    for (conv, t) in conversations.as_array().unwrap().iter().zip(&theirs) {
        let msgs: Vec<Message> = serde_json::from_value(conv["messages"].clone()).unwrap();
        let tools = conv.get("tools").filter(|t| !t.is_null());
        let text = template.render(&msgs, true, tools).unwrap();
        assert_eq!(text, t["text"].as_str().unwrap());
        let ours: Vec<u64> = tok
            .encode(&text)
            .unwrap()
            .into_iter()
            .map(u64::from)
            .collect();
        assert_eq!(ours, ids(&t["ids"]), "ids of {text:?}");
    }
    // The CLI path: --chat with --system renders the same prompt as apply_chat_template (the 4th
    // conversation).
    let (_, v) = generate_json(&[
        "--model",
        smol.to_str().unwrap(),
        "--chat",
        "--system",
        "You are terse.",
        "--prompt",
        "Hi!",
        "--max-new-tokens",
        "0",
    ]);
    assert_eq!(ids(&v["prompt_ids"]), ids(&theirs[3]["ids"]));
    assert_eq!(v["generated_tokens"], json!([]));
}

/// Qwen3's tokenizer and chat template (fixture `qwen3`): 24 texts tokenize as transformers does,
/// and conversations render identically in text and ids with thinking on (the default, and
/// `enable_thinking: true`) and off (`enable_thinking: false`), including an assistant turn
/// whose `<think>` block the template strips.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn qwen3_tokenizer_and_chat_template_with_and_without_thinking() {
    let model = model_dir("qwen3");
    assert!(
        model.join("tokenizer_config.json").exists(),
        "fixture qwen3 missing"
    );
    let py = reference_python();
    let mut conversations = vec![];
    let convs = [
        json!([{"role": "user", "content": "What is the capital of France?"}]),
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello. What do you need?"},
            {"role": "user", "content": "Tell me a joke about naïve café owners 😀."}
        ]),
        json!([
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "<tool_response>ok</tool_response>"}
        ]),
    ];
    for c in &convs {
        for kw in [
            json!({}),
            json!({"enable_thinking": true}),
            json!({"enable_thinking": false}),
        ] {
            conversations.push(json!({"messages": c, "tools": null, "template_kwargs": kw}));
        }
    }
    let conversations = Value::Array(conversations);
    let dir = scratch("generation-qwen3-chat");
    let path = dir.join("conversations.json");
    std::fs::write(&path, conversations.to_string()).unwrap();
    let m = model.to_str().unwrap();
    let out = reference(
        &py,
        &[
            "chat-batch",
            "--model",
            m,
            "--conversations",
            path.to_str().unwrap(),
        ],
    );
    let theirs: Vec<Value> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let template = ChatTemplate::from_dir(&model)
        .unwrap()
        .expect("Qwen3 has a chat template");
    let tok = Tokenizer::from_dir(&model).unwrap();
    let mut texts = vec![];
    for (conv, t) in conversations.as_array().unwrap().iter().zip(&theirs) {
        let msgs: Vec<Message> = serde_json::from_value(conv["messages"].clone()).unwrap();
        let vars = conv["template_kwargs"].as_object().unwrap();
        let text = template.render_with_vars(&msgs, true, None, vars).unwrap();
        assert_eq!(text, t["text"].as_str().unwrap(), "{vars:?}");
        let ours: Vec<u64> = tok
            .encode(&text)
            .unwrap()
            .into_iter()
            .map(u64::from)
            .collect();
        assert_eq!(ours, ids(&t["ids"]), "ids of {text:?}");
        texts.push(text);
    }
    assert!(texts[2].ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    assert!(texts[0].ends_with("<|im_start|>assistant\n") && texts[0] == texts[1]);
    // Plain texts (seed-style prompts and 20 more) through the reference's tokenize-batch.
    let plain: Vec<String> = [
        "Hello",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "1+1=2",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n",
        "naïve café 😀 日本語のテキスト",
        "fn main() { println!(\"hi\"); }",
        "<think>reasoning</think> answer",
        "<|im_start|>user\nHi<|im_end|>",
        "3.14159 2.71828 1e-9",
        "don't won't y'all",
        "ALL CAPS AND lowercase",
        "emoji 👩‍👩‍👧 family",
        "Ünïcödé àccents",
        "\u{a0}non-breaking space",
        "a\n\n\nb",
        "https://example.org/path?q=1",
        "def f(x):\n    return x * 2\n",
        "Привет, мир",
        "مرحبا بالعالم",
        "12345678901234567890",
        "<tool_call>{\"name\": \"f\"}</tool_call>",
        "  ",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(plain.len() >= 24);
    let tpath = dir.join("texts.json");
    std::fs::write(&tpath, serde_json::to_string(&plain).unwrap()).unwrap();
    let out = reference(
        &py,
        &[
            "tokenize-batch",
            "--model",
            m,
            "--texts",
            tpath.to_str().unwrap(),
        ],
    );
    let want: Vec<Vec<u32>> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    for (text, w) in plain.iter().zip(&want) {
        assert_eq!(&tok.encode(text).unwrap(), w, "ids of {text:?}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn stop_strings_end_the_text_before_them() {
    let smol = smollm2();
    let (streamed, v) = generate_json(&[
        "--model",
        smol.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--stop",
        "Paris",
        "--stop",
        "never appears",
    ]);
    assert_eq!(v["text"], "The capital of France is ");
    assert_eq!(v["finish_reason"], "stop");
    assert_eq!(streamed, "The capital of France is ");
    // The token that completed the stop string was generated; nothing after it.
    assert_eq!(
        ids(&v["generated_tokens"]),
        vec![504, 3575, 282, 4649, 314, 7042]
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bad_generation_input_is_one_line_and_exit_2() {
    let m = fixture_model("qwen2-gqa");
    // A model folder without a chat template.
    let bare = scratch("generation-no-template");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(m.join(f), bare.join(f)).unwrap();
    }
    let ms = m.to_str().unwrap();
    let bs = bare.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--model", bs, "--chat", "--prompt", "hi"],
            "no chat template",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--temperature", "hot"],
            "--temperature",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--temperature", "-1"],
            "--temperature",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--top-p", "1.5"],
            "--top-p",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--top-p", "0"],
            "--top-p",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--min-p", "2"],
            "--min-p",
        ),
        (
            vec![
                "--model",
                ms,
                "--tokens",
                "1,2",
                "--repetition-penalty",
                "0",
            ],
            "--repetition-penalty",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--top-k", "-3"],
            "-3",
        ),
        (
            vec!["--model", ms, "--tokens", "1,2", "--max-new-tokens", "many"],
            "--max-new-tokens",
        ),
        (vec!["--model", ms, "--tokens", "1,x"], "--tokens"),
        (vec!["--model", ms, "--tokens", "99999"], "out of range"),
        (vec!["--model", ms, "--tokens", "1", "--chat"], "--chat"),
        (vec!["--model", ms], "required"),
        (
            vec!["--model", "/nonexistent", "--prompt", "hi"],
            "not found",
        ),
    ] {
        let mut all = vec!["generate"];
        all.extend(args.iter());
        let o = lockstep(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
        assert!(lines[0].starts_with("error:"), "{args:?}: {err}");
        assert!(
            lines[0].contains(needle),
            "{args:?}: {err} lacks {needle:?}"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn random_model_streams_byte_tokens_without_broken_characters() {
    // Random models over the byte-level Qwen vocabulary emit lone UTF-8 bytes often; the streamed
    // text must still equal the final decoded text, and the final text equal the tokenizer's decode.
    let m = fixture_model("qwen2-mqa");
    let tok = Tokenizer::from_dir(&m).unwrap();
    for seed in 0..3 {
        let (streamed, v) = generate_json(&[
            "--model",
            m.to_str().unwrap(),
            "--tokens",
            "151,152,153",
            "--max-new-tokens",
            "48",
            "--temperature",
            "1.5",
            "--top-k",
            "0",
            "--ignore-eos",
            "--seed",
            &seed.to_string(),
        ]);
        let gen: Vec<u32> = ids(&v["generated_tokens"])
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let full = tok.inner().decode(&gen, true).unwrap();
        assert_eq!(v["text"].as_str().unwrap(), full);
        assert_eq!(streamed, full);
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn chat_session_keeps_history() {
    let smol = smollm2();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "chat",
            "--model",
            smol.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // The second question only makes sense with the first one in the history.
        stdin
            .write_all(b"What is the capital of France?\nAnd of Germany?\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        replies,
        [
            "The capital of France is Paris.",
            "The capital of Germany is Berlin."
        ]
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn smollm2_as_qwen2_verifies_and_a_missing_bias_is_caught() {
    smollm2();
    let m = model_dir(SMOLLM2_QWEN2);
    let dir = scratch("verify-smollm2-qwen2");
    let args = [
        "--model",
        m.to_str().unwrap(),
        "--single-only",
        "--generate-tokens",
        "16",
    ];
    let run = verify_in(&dir, &args);
    run.assert_exit(0);
    run.assert_pass(&[
        "weights",
        "single-token forward [f64]",
        "single-token forward [f32]",
        "greedy generation [f32]",
    ]);
    assert_eq!(run.json["passed"], true);
    let run = verify_in(
        &dir,
        &[&args[..], &["--dtype", "f32", "--inject", "no-qkv-bias"]].concat(),
    );
    run.assert_exit(1);
    let j = &run.json;
    assert_eq!(j["first_divergence"], "layers.0.q");
}
