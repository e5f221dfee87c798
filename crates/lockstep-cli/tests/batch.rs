//! Batches: prompts of different lengths left-padded into one batch with an attention mask.
//!
//! Each row's logits must equal its unpadded run (ours, f32 within 1e-4 and f64 within 1e-9),
//! and the logits of transformers' own left-padded forward (mask plus mask-derived position
//! ids; f32 within max(1e-4, 3x transformers' own f32-vs-f64 distance) as docs/numerics.md sets for
//! logits as large as a trained model's); a decode step through the batched KV cache must too. Batched greedy generation must be
//! token for token what `transformers.generate` gives for the same left-padded batch, and what
//! each prompt gives alone.

mod support;

use lockstep_engine::{BatchKvCache, Float, KvCache, LogitsFor, Model, PaddedBatch};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use support::*;

/// Row lengths: a one-token row, the longest row, rows in between.
const LENGTHS: [usize; 4] = [4, 1, 13, 9];

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn prompts(vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    LENGTHS
        .iter()
        .enumerate()
        .map(|(i, &n)| token_ids(n, vocab, seed + i as u64))
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Our batched logits of each row's real positions, then of one more (decode) token per row;
/// and the same from each row run alone.
struct Runs {
    batched: Vec<Vec<f64>>,
    alone: Vec<Vec<f64>>,
    batched_decode: Vec<Vec<f64>>,
    alone_decode: Vec<Vec<f64>>,
}

fn run_ours<T: Float>(model: &Model, rows: &[Vec<u32>], next: &[u32]) -> Runs {
    let vocab = model.config.vocab_size;
    let layers = model.config.num_layers;
    let batch = PaddedBatch::left_padded(rows, 0);
    let mut cache = BatchKvCache::<T>::new(layers, rows.len());
    let all = model
        .forward_batch::<T>(&batch.tokens, &batch.mask, &mut cache, LogitsFor::All)
        .unwrap();
    let width = batch.len;
    let batched = rows
        .iter()
        .enumerate()
        .map(|(b, r)| {
            all[(b * width + width - r.len()) * vocab..(b + 1) * width * vocab]
                .iter()
                .map(|x| x.to_f64())
                .collect()
        })
        .collect();
    let step = model
        .forward_batch::<T>(next, &vec![true; next.len()], &mut cache, LogitsFor::Last)
        .unwrap();
    let batched_decode = step
        .chunks(vocab)
        .map(|r| r.iter().map(|x| x.to_f64()).collect())
        .collect();
    let mut alone = vec![];
    let mut alone_decode = vec![];
    for (r, &t) in rows.iter().zip(next) {
        let mut c = KvCache::<T>::new(layers);
        let l = model
            .forward(r, &mut c, &mut lockstep_engine::NoObserver)
            .unwrap();
        alone.push(l.iter().map(|x| x.to_f64()).collect());
        let d = model.forward_last(&[t], &mut c).unwrap();
        alone_decode.push(d.iter().map(|x| x.to_f64()).collect());
    }
    Runs {
        batched,
        alone,
        batched_decode,
        alone_decode,
    }
}

/// transformers' logits of each row's real positions in a left-padded batch.
fn reference_padded(py: &Path, dir: &Path, rows: &[Vec<u32>], dtype: &str) -> Vec<Vec<f64>> {
    let s = scratch(&format!(
        "batch-{}-{dtype}",
        dir.file_name().unwrap().to_str().unwrap()
    ));
    let rows_path = s.join("rows.json");
    std::fs::write(&rows_path, json!(rows).to_string()).unwrap();
    let out = s.join("padded.safetensors");
    reference(
        py,
        &[
            "padded-logits",
            "--model",
            dir.to_str().unwrap(),
            "--rows",
            rows_path.to_str().unwrap(),
            "--dtype",
            dtype,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    (0..rows.len())
        .map(|i| {
            let t = st.tensor(&format!("row{i}")).unwrap();
            match t.dtype() {
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                _ => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
            }
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn batched_logits_equal_each_rows_unpadded_run_and_transformers() {
    let py = reference_python();
    let cases = [
        ("qwen2-gqa", "f32", 1e-4f64),
        ("qwen2-mqa", "f32", 1e-4),
        ("llama-gqa", "f32", 1e-4),
        ("smollm2-135m-instruct", "f32", 1e-4),
        ("qwen2-gqa", "f64", 1e-9),
        // Sliding windows (8, 6) shorter than the longest rows: the window counts the padding
        // as transformers' cache indices do.
        ("mistral-swa", "f32", 1e-4),
        ("qwen2-swa", "f64", 1e-9),
        ("qwen3-small", "f32", 1e-4),
        ("qwen3-small", "f64", 1e-9),
        // Mixture of experts: padding tokens are routed too, never mixed into real rows.
        ("qwen3-moe-small", "f32", 1e-4),
        ("qwen3-moe-small", "f64", 1e-9),
    ];
    let mut failures = vec![];
    eprintln!("| model | dtype | rows (lengths) | batched vs alone | batched vs transformers padded | decode step batched vs alone |");
    for (i, (name, dtype, bound)) in cases.iter().enumerate() {
        let dir = model_dir(name);
        let model = Model::load(&dir).unwrap();
        let rows = prompts(model.config.vocab_size.min(2048), 40 + i as u64);
        let next = token_ids(rows.len(), model.config.vocab_size.min(2048), 90 + i as u64);
        let runs = match *dtype {
            "f64" => run_ours::<f64>(&model, &rows, &next),
            _ => run_ours::<f32>(&model, &rows, &next),
        };
        let theirs = reference_padded(&py, &dir, &rows, dtype);
        let worst = |a: &[Vec<f64>], b: &[Vec<f64>]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| max_diff(x, y))
                .fold(0.0, f64::max)
        };
        // transformers' own f32 rounding noise on this batch: its distance to its f64 run.
        let ref_bound = match *dtype {
            "f32" => (*bound).max(3.0 * worst(&theirs, &reference_padded(&py, &dir, &rows, "f64"))),
            _ => *bound,
        };
        let (d_alone, d_ref, d_decode) = (
            worst(&runs.batched, &runs.alone),
            worst(&runs.batched, &theirs),
            worst(&runs.batched_decode, &runs.alone_decode),
        );
        eprintln!(
            "| {name} | {dtype} | {LENGTHS:?} | {d_alone:.2e} | {d_ref:.2e} (bound {ref_bound:.2e}) | {d_decode:.2e} |"
        );
        for (what, d, bound) in [
            ("batched vs alone", d_alone, *bound),
            ("batched vs transformers", d_ref, ref_bound),
            ("decode step", d_decode, *bound),
        ] {
            if d.is_nan() || d > bound {
                failures.push(format!(
                    "{name} {dtype}: {what} differs by {d:e} (bound {bound:e})"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `lockstep generate ARGS --json`'s JSON line.
fn generate_json(args: &[&str]) -> Value {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = lockstep_ok(&all);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// One row of transformers' batched generation as the row generated it: transformers keeps a
/// finished row in the batch and pads it after its EOS, so the row ends at its first EOS
/// (transformers' own EOS ids: never cut to the other side's length), and everything after that
/// must be `pad`.
fn their_row(full: &[u64], eos: &[u64], pad: u64) -> Result<Vec<u64>, String> {
    let end = full
        .iter()
        .position(|x| eos.contains(x))
        .map_or(full.len(), |e| e + 1);
    let (row, padding) = full.split_at(end);
    if padding.iter().any(|&x| x != pad) {
        return Err(format!(
            "transformers generated {padding:?} after its EOS (pad id {pad}): {full:?}"
        ));
    }
    Ok(row.to_vec())
}

/// The comparison above never cuts transformers' output to ours: a row that stops early or runs
/// past its EOS differs (cutting transformers' row to our length, as this test once did, passed
/// both).
#[test]
fn a_row_that_stops_early_or_runs_on_differs() {
    let theirs = [5, 6, 2, 0, 0];
    let row = their_row(&theirs, &[2], 0).unwrap();
    assert_eq!(row, [5, 6, 2]);
    for ours in [&[5u64, 6][..], &[5, 6, 2, 0], &[5, 6, 2, 7, 8]] {
        assert_ne!(ours, &row[..], "{ours:?}");
    }
    // Without EOS ids (ignore_eos) the whole row is the generation.
    assert_eq!(their_row(&theirs, &[], 0).unwrap(), theirs);
    // Anything but padding after the EOS is reported.
    let e = their_row(&[5, 2, 9], &[2], 0).unwrap_err();
    assert!(e.contains("[9] after its EOS"), "{e}");
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn batched_greedy_generation_matches_transformers_and_each_prompt_alone() {
    let py = reference_python();
    const NEW: usize = 24;
    let n = NEW.to_string();
    let mut jobs = vec![];
    let mut ours = vec![];
    let mut alone = vec![];
    let mut labels = vec![];
    // Random fixtures, EOS ignored (every row generates NEW tokens).
    for (i, name) in [
        "qwen2-gqa",
        "llama-gqa",
        "mistral-swa",
        "qwen2-swa",
        "qwen3-small",
        "qwen3-moe-small",
    ]
    .iter()
    .enumerate()
    {
        let dir = model_dir(name);
        let d = dir.to_str().unwrap();
        let rows = prompts(2048, 70 + i as u64);
        let mut args = vec![
            "--model",
            d,
            "--max-new-tokens",
            &n,
            "--temperature",
            "0",
            "--ignore-eos",
        ];
        let tokens: Vec<String> = rows.iter().map(|r| ids_arg(r)).collect();
        for t in &tokens {
            args.extend(["--tokens", t.as_str()]);
        }
        ours.push(generate_json(&args));
        alone.push(
            tokens
                .iter()
                .map(|t| {
                    generate_json(&[
                        "--model",
                        d,
                        "--tokens",
                        t,
                        "--max-new-tokens",
                        &n,
                        "--temperature",
                        "0",
                        "--ignore-eos",
                    ])
                })
                .collect::<Vec<_>>(),
        );
        jobs.push(
            json!({"model": d, "token_batch": rows, "max_new_tokens": NEW, "ignore_eos": true}),
        );
        labels.push(format!("{name} tokens"));
    }
    // The real model, chat-formatted prompts of different lengths, EOS on: rows finish apart.
    let smol = model_dir("smollm2-135m-instruct");
    let s = smol.to_str().unwrap();
    let questions = [
        "What is the capital of France?",
        "Name a color.",
        "Explain in one sentence why the sky is blue.",
    ];
    let mut args = vec![
        "--model",
        s,
        "--chat",
        "--max-new-tokens",
        &n,
        "--temperature",
        "0",
    ];
    for q in &questions {
        args.extend(["--prompt", q]);
    }
    let batch = generate_json(&args);
    let rows: Vec<Vec<u64>> = batch["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["prompt_ids"]))
        .collect();
    alone.push(
        questions
            .iter()
            .map(|q| {
                generate_json(&[
                    "--model",
                    s,
                    "--chat",
                    "--prompt",
                    q,
                    "--max-new-tokens",
                    &n,
                    "--temperature",
                    "0",
                ])
            })
            .collect(),
    );
    ours.push(batch);
    jobs.push(json!({"model": s, "token_batch": rows, "max_new_tokens": NEW, "ignore_eos": false}));
    labels.push("smollm2 chat".into());

    let dir = scratch("batch-generate");
    let path = dir.join("jobs.json");
    std::fs::write(&path, Value::Array(jobs).to_string()).unwrap();
    let out = reference(&py, &["generate-batch", path.to_str().unwrap()]);
    let theirs: Vec<Value> = serde_json::from_str(out.lines().last().unwrap()).unwrap();

    let mut failures = vec![];
    eprintln!("| case | row | prompt tokens | lockstep batched | identical to transformers batched | identical alone | finish |");
    for (((label, o), t), a) in labels.iter().zip(&ours).zip(&theirs).zip(&alone) {
        let t_rows = t["generated"].as_array().unwrap();
        let eos = ids(&t["eos_token_ids"]);
        let pad = t["pad_token_id"].as_u64().unwrap();
        for (r, row) in o["rows"].as_array().unwrap().iter().enumerate() {
            let og = ids(&row["generated_tokens"]);
            let tg = match their_row(&ids(&t_rows[r]), &eos, pad) {
                Ok(tg) => tg,
                Err(e) => {
                    failures.push(format!("{label} row {r}: {e}"));
                    ids(&t_rows[r])
                }
            };
            let ag = ids(&a[r]["generated_tokens"]);
            let same = og.iter().zip(&tg).take_while(|(x, y)| x == y).count();
            eprintln!(
                "| {label} | {r} | {} | {} | {same}/{} | {} | {} |",
                ids(&row["prompt_ids"]).len(),
                og.len(),
                og.len().max(tg.len()),
                og == ag,
                row["finish_reason"]
            );
            if og != tg {
                failures.push(format!(
                    "{label} row {r}: differs from transformers at token {same} (lockstep {} tokens, transformers {}): lockstep {og:?} vs transformers {tg:?}",
                    og.len(),
                    tg.len()
                ));
            }
            if og != ag {
                failures.push(format!("{label} row {r}: batched {og:?} but alone {ag:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The real model still answers when batched.
    let smol = labels.iter().position(|l| l == "smollm2 chat").unwrap();
    assert_eq!(
        ours[smol]["rows"][0]["text"],
        "The capital of France is Paris."
    );
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bad_batch_input_is_one_line_and_exit_2() {
    reference_python();
    let m = model_dir("qwen2-gqa");
    let m = m.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--tokens", "1,2,3", "--tokens", "5,99999"],
            "token id 99999 is out of range",
        ),
        (vec!["--tokens", "1,2", "--tokens", "3,x"], "x"),
        (
            vec!["--prompt", "a", "--prompt", ""],
            "tokenizes to no tokens",
        ),
    ] {
        let mut all = vec!["generate", "--model", m, "--max-new-tokens", "2"];
        all.extend(args.iter().copied());
        let o = lockstep(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: wrote to stdout");
    }
}
