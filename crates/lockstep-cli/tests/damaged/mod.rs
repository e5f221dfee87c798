//! Builders of damaged inputs (model folders, GGUF and safetensors files written by hand, sparse
//! where they claim terabytes) and the measured runner of the damaged-input table
//! (`tests/damaged_inputs.rs`).
#![allow(dead_code)]

use crate::support::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a refusal may take (the machine running the tests may be busy).
pub const TIME_LIMIT: Duration = Duration::from_secs(60);

/// Peak resident set a refusal may reach, in KiB (1 GiB).
pub const RSS_LIMIT_KB: u64 = 1 << 20;

/// One terabyte-class size for sparse files: 4 TiB.
pub const SPARSE: u64 = 1 << 42;

/// The fixture whose files the damaged model folders link or copy.
pub const FIXTURE: &str = "qwen2-gqa";

/// One row of the table.
pub struct Case {
    pub name: &'static str,
    /// Builds the damaged input in the given folder and returns the arguments to run.
    pub build: fn(&Path) -> Vec<String>,
    /// A substring of the error line (case-insensitive).
    pub needle: &'static str,
    /// The exit code expected.
    pub code: i32,
}

pub fn p(x: &Path) -> String {
    x.to_str().unwrap().to_string()
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A model folder in `dir/model` linking the fixture's files, except `own`, which the case
/// writes itself.
pub fn model(dir: &Path, own: &[&str]) -> PathBuf {
    let src = fixtures().join("models").join(FIXTURE);
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !own.contains(&f) {
            std::os::unix::fs::symlink(src.join(f), m.join(f)).unwrap();
        }
    }
    m
}

pub fn config() -> Value {
    let text = std::fs::read(fixtures().join("models").join(FIXTURE).join("config.json"));
    serde_json::from_slice(&text.expect("fixture config.json")).unwrap()
}

/// A model folder whose config.json has `key` set to `value`.
pub fn with_config(dir: &Path, key: &str, value: Value) -> PathBuf {
    let m = model(dir, &["config.json"]);
    let mut c = config();
    c[key] = value;
    if key == "num_hidden_layers" {
        // A v4-style config (no per-layer `layer_types`, whose length would be refused first),
        // so the case reaches the check it is about.
        c.as_object_mut().unwrap().remove("layer_types");
    }
    std::fs::write(m.join("config.json"), c.to_string()).unwrap();
    m
}

/// `generate` on `model` with two prompt tokens and two new ones.
pub fn generate(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["generate", "--model", &p(model), "--tokens", "1,2"]);
    a.extend(args(&["--max-new-tokens", "2"]));
    a.extend(args(extra));
    a
}

/// `trace` on `model` writing `dir/out.safetensors`.
pub fn trace(dir: &Path, model: &Path) -> Vec<String> {
    let out = dir.join("out.safetensors");
    args(&[
        "trace",
        "--model",
        &p(model),
        "--tokens",
        "1,2",
        "--dtype",
        "f32",
        "--out",
        &p(&out),
    ])
}

/// `generate --chat` with `template` as the model's chat_template.jinja.
pub fn chat_with(dir: &Path, template: &str) -> Vec<String> {
    let m = model(dir, &[]);
    std::fs::write(m.join("chat_template.jinja"), template).unwrap();
    args(&[
        "generate",
        "--model",
        &p(&m),
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
    ])
}

/// `generate` on a model folder with `text` as its generation_config.json.
pub fn gen_config(dir: &Path, text: &str) -> Vec<String> {
    let m = model(dir, &[]);
    std::fs::write(m.join("generation_config.json"), text).unwrap();
    generate(&m, &[])
}

// ---- GGUF ----------------------------------------------------------------------------------

/// A GGUF tensor entry: name, dims fastest-first, ggml type, bytes of data.
pub type GgufTensor = (&'static str, Vec<u64>, u32, u64);

pub fn gstr(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

/// A metadata entry: key, type id, payload.
pub fn kv(key: &str, ty: u32, payload: Vec<u8>) -> Vec<u8> {
    let mut b = gstr(key);
    b.extend(ty.to_le_bytes());
    b.extend(payload);
    b
}

pub fn kv_u32(key: &str, x: u32) -> Vec<u8> {
    kv(key, 4, x.to_le_bytes().to_vec())
}

/// The metadata of a tiny Llama (hidden 64, 2 heads of 32, 1 kv head, ffn 32, vocab 8, 1 layer).
pub fn tiny_llama_kvs() -> Vec<Vec<u8>> {
    vec![
        kv("general.architecture", 8, gstr("llama")),
        kv_u32("llama.block_count", 1),
        kv_u32("llama.embedding_length", 64),
        kv_u32("llama.feed_forward_length", 32),
        kv_u32("llama.attention.head_count", 2),
        kv_u32("llama.attention.head_count_kv", 1),
        kv_u32("llama.vocab_size", 8),
    ]
}

pub fn tiny_llama_tensors() -> Vec<GgufTensor> {
    let f32s = |name, dims: Vec<u64>| {
        let n: u64 = dims.iter().product();
        (name, dims, 0u32, 4 * n)
    };
    vec![
        f32s("token_embd.weight", vec![64, 8]),
        f32s("blk.0.attn_norm.weight", vec![64]),
        f32s("blk.0.attn_q.weight", vec![64, 64]),
        f32s("blk.0.attn_k.weight", vec![64, 32]),
        f32s("blk.0.attn_v.weight", vec![64, 32]),
        f32s("blk.0.attn_output.weight", vec![64, 64]),
        f32s("blk.0.ffn_norm.weight", vec![64]),
        f32s("blk.0.ffn_gate.weight", vec![64, 32]),
        f32s("blk.0.ffn_up.weight", vec![64, 32]),
        f32s("blk.0.ffn_down.weight", vec![32, 64]),
        f32s("output_norm.weight", vec![64]),
    ]
}

/// Writes a GGUF v3 file: the header, then zeros (a sparse file) for the tensors' data, which
/// are laid out one after another at 32-byte alignment. Returns the folder holding it, with the
/// fixture's tokenizer.json beside it.
pub fn gguf(dir: &Path, kvs: &[Vec<u8>], tensors: &[GgufTensor]) -> PathBuf {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for e in kvs {
        b.extend(e);
    }
    let mut offset = 0u64;
    for (name, dims, ty, nbytes) in tensors {
        b.extend(gstr(name));
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += nbytes.div_ceil(32) * 32;
    }
    let data_start = (b.len() as u64).div_ceil(32) * 32;
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let path = m.join("model.gguf");
    std::fs::write(&path, &b).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(data_start + offset).unwrap();
    let tok = fixtures()
        .join("models")
        .join(FIXTURE)
        .join("tokenizer.json");
    std::os::unix::fs::symlink(tok, m.join("tokenizer.json")).unwrap();
    m
}

/// The tiny Llama GGUF with one metadata entry replaced (or added).
pub fn gguf_with(dir: &Path, key: &str, entry: Vec<u8>) -> PathBuf {
    let mut kvs: Vec<Vec<u8>> = tiny_llama_kvs()
        .into_iter()
        .filter(|e| !e[8..].starts_with(key.as_bytes()))
        .collect();
    kvs.push(entry);
    gguf(dir, &kvs, &tiny_llama_tensors())
}

/// The tiny Llama GGUF with attn_q claiming `dims` of type `ty` (data sparse).
pub fn gguf_big_q(dir: &Path, dims: Vec<u64>, ty: u32, nbytes: u64) -> PathBuf {
    let mut ts = tiny_llama_tensors();
    ts[2] = ("blk.0.attn_q.weight", dims, ty, nbytes);
    gguf(dir, &tiny_llama_kvs(), &ts)
}

/// Rewrites bytes of the GGUF in `m` at `at`.
pub fn patch(m: &Path, at: usize, bytes: &[u8]) {
    let path = m.join("model.gguf");
    let mut b = std::fs::read(&path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(&path, b).unwrap();
}

// ---- safetensors and traces ----------------------------------------------------------------

/// A safetensors file with `header` (a JSON object) and `data_len` bytes of zeros (sparse).
pub fn safetensors(path: &Path, header: &Value, data_len: u64) {
    let h = header.to_string();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h.as_bytes());
    std::fs::write(path, &b).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(b.len() as u64 + data_len).unwrap();
}

/// `compare` of a damaged trace against itself, with a report that must not appear.
pub fn compare_one(dir: &Path, header: &Value, data_len: u64) -> Vec<String> {
    let t = dir.join("bad.safetensors");
    safetensors(&t, header, data_len);
    let report = dir.join("report.md");
    args(&["compare", &p(&t), &p(&t), "--report", &p(&report)])
}

pub fn tensor(dtype: &str, shape: &[u64], start: u64, end: u64) -> Value {
    json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]})
}

/// Outcome of one run: exit code, stderr, peak RSS (KiB), seconds.
pub struct Run {
    pub code: Option<i32>,
    pub stderr: String,
    pub rss_kb: u64,
    pub secs: f64,
}

/// Runs `lockstep ARGS` under `/usr/bin/time` (peak RSS), killed after [`TIME_LIMIT`].
pub fn run(dir: &Path, a: &[String]) -> Run {
    let time = Path::new("/usr/bin/time");
    assert!(
        time.exists(),
        "/usr/bin/time is needed to measure peak memory"
    );
    let rss_file = dir.join("rss.txt");
    let t0 = Instant::now();
    let mut child = Command::new(time)
        .args([
            "-f",
            "%M",
            "-o",
            &p(&rss_file),
            env!("CARGO_BIN_EXE_lockstep"),
        ])
        .args(a)
        .env("LOCKSTEP_PYTHON", repo_root().join(".venv/bin/python"))
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lockstep");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > TIME_LIMIT {
            child.kill().ok();
            child.wait().ok();
            panic!("lockstep {a:?} ran past {TIME_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = t0.elapsed().as_secs_f64();
    let rss = std::fs::read_to_string(&rss_file).unwrap_or_default();
    let rss_kb = rss
        .lines()
        .rev()
        .find_map(|l| l.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no peak RSS from /usr/bin/time: {rss:?}"));
    std::fs::remove_file(&rss_file).ok();
    // /usr/bin/time reports a signal death as "Command terminated by signal N" and exit 128+N.
    let stderr = reader.join().unwrap();
    Run {
        code: status.code(),
        stderr,
        rss_kb,
        secs,
    }
}

/// Every file under `dir` (links not followed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
