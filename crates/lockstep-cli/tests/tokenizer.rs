//! The tokenizer against known Qwen ids, llama.cpp's 46 Qwen2 tokenizer test cases, and the live
//! `transformers` tokenizer.
//!
//! - `lockstep tokenize` on a model folder holding the real Qwen tokenizer gives the known ids.
//! - `lockstep_engine::Tokenizer` (what the CLI uses) reproduces every case of
//!   `fixtures/llama-cpp/ggml-vocab-qwen2.gguf.inp/.out`, parsed exactly as llama.cpp's
//!   `test-tokenizer-0` does (see `reference/lockstep_reference/vocab_cases.py`). The files hold
//!   46 cases: splitting `.inp` on the separator gives 47 pieces, the last one the empty string
//!   after the final separator, and `.out` has 46 lines.
//! - For a handful of texts (unicode, emoji, runs of spaces, newlines) our ids equal those of the
//!   Hugging Face tokenizer run through the reference environment.

mod support;

use lockstep_engine::Tokenizer;
use std::path::{Path, PathBuf};
use support::*;

/// The separator llama.cpp writes after every case of a `.inp` file.
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

/// The known ids of a few strings under the Qwen tokenizer.
const KNOWN: [(&str, &[u32]); 4] = [
    ("Hello", &[9707]),
    ("The", &[785]),
    ("123", &[16, 17, 18]),
    ("Hello, world!", &[9707, 11, 1879, 0]),
];

/// Texts checked against the live transformers tokenizer, besides the known ones.
const LIVE: [&str; 10] = [
    "héllo wörld — ünïcödé",
    "你好，世界！こんにちは 안녕하세요",
    "emoji 🦙🚀👩‍👩‍👧 and flags 🇫🇷",
    "many     spaces   here",
    "   leading and trailing   ",
    "line one\nline two\n\n\nthree\r\nfour\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "numbers 3.14159 and 1,000,000 and 12345678901234567890",
    "don't won't I'm we'LL they'Re",
    "",
];

/// A model folder holding the real Qwen tokenizer: any fixture model (they all ship
/// `fixtures/tokenizer/qwen/tokenizer.json`).
fn model_dir() -> PathBuf {
    fixtures().join("models/qwen2-gqa")
}

/// Parses an `.inp`/`.out` pair into (text, expected ids), like llama.cpp's test-tokenizer-0.
fn parse_cases(inp: &[u8], out: &[u8]) -> Vec<(String, Vec<u32>)> {
    let inp = std::str::from_utf8(inp).expect(".inp is UTF-8");
    let out = std::str::from_utf8(out).expect(".out is UTF-8");
    let mut texts: Vec<&str> = inp.split(SEPARATOR).collect();
    assert_eq!(
        texts.pop(),
        Some(""),
        ".inp does not end with the separator"
    );
    let mut lines: Vec<&str> = out.split('\n').collect();
    assert_eq!(lines.pop(), Some(""), ".out does not end with a newline");
    assert_eq!(
        texts.len(),
        lines.len(),
        "{} inputs but {} output lines",
        texts.len(),
        lines.len()
    );
    texts
        .into_iter()
        .zip(lines)
        .map(|(t, l)| {
            let ids = l
                .split_whitespace()
                .map(|x| x.parse().expect("an id in .out"))
                .collect();
            (t.to_string(), ids)
        })
        .collect()
}

fn last_line_ids(stdout: &str) -> Vec<u32> {
    let line = stdout.lines().last().expect("no output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON id array ({e}): {line}"))
}

fn cli_tokenize(model: &Path, text: &str) -> Vec<u32> {
    last_line_ids(&lockstep_ok(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text,
    ]))
}

#[test]
fn parser_handles_empty_and_whitespace_cases() {
    let inp = format!("a b{SEPARATOR}{SEPARATOR}\n\n{SEPARATOR} \t{SEPARATOR}");
    let out = " 64 293\n\n 271\n 220 197\n";
    let cases = parse_cases(inp.as_bytes(), out.as_bytes());
    assert_eq!(
        cases,
        vec![
            ("a b".to_string(), vec![64, 293]),
            (String::new(), vec![]),
            ("\n\n".to_string(), vec![271]),
            (" \t".to_string(), vec![220, 197]),
        ]
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn cli_gives_the_known_qwen_ids() {
    reference_python();
    let model = model_dir();
    for (text, want) in KNOWN {
        assert_eq!(cli_tokenize(&model, text), want, "ids of {text:?}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn all_46_llama_cpp_qwen2_cases() {
    reference_python();
    let base = fixtures().join("llama-cpp/ggml-vocab-qwen2.gguf");
    let inp = std::fs::read(base.with_extension("gguf.inp")).expect("read .inp");
    let out = std::fs::read(base.with_extension("gguf.out")).expect("read .out");
    assert_eq!(
        String::from_utf8_lossy(&inp).matches(SEPARATOR).count(),
        46,
        "separators in the .inp file"
    );
    let cases = parse_cases(&inp, &out);
    assert_eq!(cases.len(), 46, "number of llama.cpp tokenizer cases");

    let tok = Tokenizer::from_dir(&model_dir()).expect("load tokenizer");
    let mut bad = vec![];
    for (text, want) in &cases {
        let got = tok.encode(text).expect("encode");
        if &got != want {
            bad.push(format!("{text:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} cases differ:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
    // The CLI goes through the same tokenizer; spot-check that on two of the cases.
    for (text, want) in cases.iter().filter(|(t, _)| !t.is_empty()).take(2) {
        assert_eq!(
            &cli_tokenize(&model_dir(), text),
            want,
            "CLI ids of {text:?}"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn fixture_tokenizer_is_the_shared_qwen_one() {
    reference_python();
    let shared = std::fs::read(fixtures().join("tokenizer/qwen/tokenizer.json")).unwrap();
    let in_model = std::fs::read(model_dir().join("tokenizer.json")).unwrap();
    assert!(
        shared == in_model,
        "the model fixture's tokenizer.json differs from fixtures/tokenizer/qwen"
    );
}

/// Ids of every text from the reference environment's transformers tokenizer, in one Python
/// process (each `python -m lockstep_reference tokenize` call pays ~5 s of imports).
fn reference_tokenize_batch(py: &Path, model: &Path, texts: &[&str]) -> Vec<Vec<u32>> {
    let script = "import json, sys\n\
                  from transformers import AutoTokenizer\n\
                  tok = AutoTokenizer.from_pretrained(sys.argv[1])\n\
                  texts = json.loads(sys.stdin.read())\n\
                  print(json.dumps([tok(t, add_special_tokens=False)['input_ids'] for t in texts]))\n";
    let mut child = std::process::Command::new(py)
        .args(["-c", script, model.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the reference python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(texts).unwrap().as_bytes())
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "reference tokenizer failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8(o.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("no output")).unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn matches_live_transformers_tokenizer() {
    let py = reference_python();
    let model = model_dir();
    let m = model.to_str().unwrap();
    let tok = Tokenizer::from_dir(&model).expect("load tokenizer");

    // Through the reference's own command line, once.
    let want = last_line_ids(&reference(
        &py,
        &["tokenize", "--model", m, "--text", LIVE[2]],
    ));
    assert_eq!(
        cli_tokenize(&model, LIVE[2]),
        want,
        "CLI ids of {:?}",
        LIVE[2]
    );

    // The rest in one batch.
    let texts: Vec<&str> = KNOWN.iter().map(|(t, _)| *t).chain(LIVE).collect();
    let wants = reference_tokenize_batch(&py, &model, &texts);
    assert_eq!(wants.len(), texts.len());
    for ((text, want), (known_text, known)) in texts.iter().zip(&wants).zip(KNOWN) {
        assert_eq!(*text, known_text);
        assert_eq!(want, known, "transformers ids of {text:?}");
    }
    for (text, want) in texts.iter().zip(&wants) {
        let got = tok.encode(text).expect("encode");
        assert_eq!(&got, want, "ids of {text:?} vs transformers");
        assert_eq!(&cli_tokenize(&model, text), want, "CLI ids of {text:?}");
    }
}

/// A tokenizer.json asking for truncation to 4 tokens and fixed padding to 64 (and a stride the
/// tokenizers crate would assert on): transformers turns both off when it encodes a prompt, so
/// lockstep must give the same, whole, unpadded ids.
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn file_truncation_and_padding_are_ignored_like_transformers() {
    let py = reference_python();
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer_config.json", "config.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).unwrap();
    }
    let mut tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    tj["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4,
        "strategy": "LongestFirst", "stride": 0});
    tj["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "!"});
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let texts = [
        LIVE[2],
        "Hello world, this is a prompt longer than four tokens.",
    ];
    let wants = reference_tokenize_batch(&py, dir.path(), &texts);
    let tok = Tokenizer::from_dir(dir.path()).expect("load tokenizer");
    for (text, want) in texts.iter().zip(&wants) {
        assert!(want.len() > 4 && want.len() < 64, "transformers: {want:?}");
        assert_eq!(&tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(&cli_tokenize(dir.path(), text), want, "CLI ids of {text:?}");
    }
    // A stride at or beyond max_length and padding to 2^40: still whole prompts, no panic and
    // no allocation.
    tj["truncation"]["stride"] = 8.into();
    tj["padding"]["strategy"] = serde_json::json!({"Fixed": 1u64 << 40});
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    assert_eq!(&cli_tokenize(dir.path(), texts[1]), &wants[1]);
}
