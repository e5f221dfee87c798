//! `lockstep bench --model DIR|FILE.gguf [--dtype ..] [--prompt-tokens N] [--new-tokens N]
//! [--batch B] [--repeat R] [--json]`: how fast this machine runs a model (`lockstep bench
//! --bandwidth-only [--json]`: the machine's read bandwidth alone).
//!
//! Loads the model (timed), then `R` times: a greedy generation from fixed token prompts (`B`
//! rows of `N` tokens, EOS ignored, so every repeat does the same work). Reports the median
//! prefill and decode speeds, the peak resident memory (`VmHWM`), and the weight bandwidth the
//! decode achieves (bytes of weights one decode step streams, coded where the engine codes them
//! in 12 bits per value, × steps per second) as a fraction of the machine's read bandwidth,
//! which it measures itself (a multi-threaded read of a buffer much larger than the caches, the
//! best of fifteen passes, plain and with a software prefetch) before the first repeat and after
//! each one: on a machine whose memory other machines share, the bandwidth moves by half within
//! a minute, so each repeat is judged against the better of the two measurements beside it and
//! the fraction is the median of the repeats'.
//! The test's buffer is left out of the peak resident memory (the peak is noted and the kernel's
//! high-water mark reset around each test, `/proc/self/clear_refs`); where that reset is refused
//! the bandwidth is measured once, after the last repeat, as before.

use super::common::DtypeArg;
use super::generate::{generate_rows, preload};
use crate::cli_error::{CliError, CliResult};
use lockstep_engine::generate::GenerateOptions;
use lockstep_engine::sampling::SamplingParams;
use lockstep_engine::{bandwidth, Model};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json) or a llama.cpp .gguf file.
    #[arg(long, required_unless_present = "bandwidth_only")]
    model: Option<PathBuf>,
    /// Only measure this machine's read bandwidth (the test a decode is judged against: every
    /// thread reading its part of a 512 MiB buffer, best of 15 passes, plain and prefetched) and
    /// exit; no model. For setting another engine's decode beside the same test
    /// (scripts/bench_compare.py does so for llama.cpp).
    #[arg(long, conflicts_with = "model")]
    bandwidth_only: bool,
    /// Compute precision.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Tokens in each prompt (fixed pseudo-random ids).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// New tokens generated after each prompt (greedy, EOS ignored).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Prompts run together as one batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Repeats; speeds are medians over them.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    json: bool,
}

/// Bytes of weights one decode step reads, as stored: every linear layer and the LM head (for
/// a mixture of experts every expert, more than one step reads; the norms and the one embedding
/// row are too small to count).
pub fn decode_weight_bytes(m: &Model) -> u64 {
    decode_matrices(m).map(|t| t.bytes().len() as u64).sum()
}

/// What a decode step of `rows` rows reads of [`decode_weight_bytes`]: in bf16 compute an F32
/// matrix's bf16 copy ([`lockstep_engine::weights::bf16_copy`]) instead of its stored bytes, and
/// a matrix coded in 12 bits per value ([`lockstep_engine::weights::bf16_coded`], made for bf16
/// and f32 runs) coded when the step has up to
/// [`lockstep_engine::kernels::matmul::CODED_MAX_TOKENS`] rows; returns (bytes read, stored
/// bytes of the matrices read coded).
fn decode_read_bytes(m: &Model, bf16_compute: bool, rows: usize) -> (u64, u64) {
    let few = rows <= lockstep_engine::kernels::matmul::CODED_MAX_TOKENS;
    decode_matrices(m).fold((0, 0), |(read, coded), t| {
        let r = match t.bf16_copy() {
            Some(c) if bf16_compute => c,
            _ => t,
        };
        match r.coded().filter(|_| few) {
            Some(c) => (read + c.bytes() as u64, coded + t.bytes().len() as u64),
            None => (read + r.bytes().len() as u64, coded),
        }
    })
}

/// The matrices of [`decode_weight_bytes`].
fn decode_matrices(m: &Model) -> impl Iterator<Item = &lockstep_engine::weights::Tensor> {
    m.layers
        .iter()
        .flat_map(|l| l.linears())
        .chain([&m.lm_head])
}

/// Bytes of the weights one decode step reads ([`decode_weight_bytes`]) that were copied into
/// 2 MiB pages of the process's own at load (when the page cache could not hold them so).
fn copied_weight_bytes(m: &Model) -> u64 {
    let layers = m.layers.iter().flat_map(|l| l.linears());
    layers
        .chain([&m.lm_head])
        .filter(|t| t.in_huge_pages())
        .map(|t| t.bytes().len() as u64)
        .sum()
}

/// This process's anonymous memory in 2 MiB pages, as the kernel counts it (`AnonHugePages` in
/// /proc/self/smaps_rollup), when it reports it.
fn anon_huge_page_bytes() -> Option<u64> {
    proc_kib("/proc/self/smaps_rollup", "AnonHugePages:")
}

/// This process's mappings of the model's files (the weights, when mapped) in 2 MiB pages, as
/// the kernel counts them (`FilePmdMapped`), when it reports them.
fn file_huge_page_bytes(model: &std::path::Path) -> Option<u64> {
    lockstep_engine::weights::page_cache::mapped_in_huge_pages(model)
}

/// The value of the `key` line (`key   N kB`) of a /proc file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The machine's read bandwidth in bytes/s ([`bandwidth::read_bandwidth`]: 512 MiB summed by
/// the engine's threads, best of five passes of each kind it reads in); an input-side error
/// where the OS refuses the test's memory.
fn read_bandwidth() -> CliResult<f64> {
    bandwidth::read_bandwidth().map_err(|e| {
        CliError::input(format!(
            "the read-bandwidth test could not map its {} MiB buffer: {e}",
            bandwidth::TEST_BYTES >> 20
        ))
    })
}

/// Peak resident memory of this process in bytes (`VmHWM` in /proc/self/status), when the OS
/// reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// The peak resident memory of the work, without the bandwidth test's buffer: the kernel's
/// high-water mark noted before each test and reset after it (writing `5` to
/// `/proc/self/clear_refs` sets `VmHWM` to the current resident size).
#[derive(Default)]
struct PeakRss {
    /// The highest mark noted so far.
    bytes: u64,
}

impl PeakRss {
    /// Notes the current high-water mark.
    fn note(&mut self) {
        self.bytes = self.bytes.max(peak_rss_bytes().unwrap_or(0));
    }

    /// Notes the mark, then runs `test` between two resets of it, so that the test's memory is
    /// not counted, and returns what `test` returns; `Err`, without running `test`, where the
    /// kernel refuses the reset (a refusal of the second reset alone, just after the first
    /// succeeded, would leave the test in the mark).
    fn note_and_reset<T>(&mut self, test: impl FnOnce() -> T) -> std::io::Result<T> {
        self.note();
        let reset = || std::fs::write("/proc/self/clear_refs", "5");
        reset()?;
        let value = test();
        reset()?;
        Ok(value)
    }

    /// Measures the read bandwidth between two resets of the mark ([`PeakRss::note_and_reset`])
    /// and adds it to `beside`; where the kernel refuses the reset, clears `beside` (the caller
    /// then measures once at the end). `Err` where the test's memory is refused.
    fn test_beside(&mut self, beside: &mut Vec<f64>) -> CliResult<()> {
        match self.note_and_reset(read_bandwidth) {
            Ok(bw) => beside.push(bw?),
            Err(_) => beside.clear(),
        }
        Ok(())
    }
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `rows` prompts of `len` fixed pseudo-random ids below `vocab` (the same every run).
fn prompts(rows: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// Runs `bench`.
pub fn run(a: Args) -> CliResult<ExitCode> {
    let Some(model) = a.model.clone() else {
        return bandwidth_only(a.json);
    };
    if a.prompt_tokens == 0 || a.new_tokens < 2 || a.batch == 0 || a.repeat == 0 {
        return Err(CliError::input(
            "--prompt-tokens, --batch and --repeat must be at least 1, --new-tokens at least 2 (one decode step)",
        ));
    }
    let pre = preload(&model)?;
    let max_ctx = pre.config.max_position_embeddings;
    let context = a.prompt_tokens + a.new_tokens;
    if context > max_ctx {
        return Err(CliError::input(format!(
            "--prompt-tokens + --new-tokens = {context} exceeds the model's {max_ctx} positions"
        )));
    }
    pre.check_memory(a.dtype, a.batch, a.prompt_tokens, context, false)?;
    let loaded = pre.load_model(a.dtype)?;
    let prompts = prompts(a.batch, a.prompt_tokens, loaded.model.config.vocab_size);
    let opts = GenerateOptions {
        max_new_tokens: a.new_tokens,
        eos_token_ids: vec![],
        ignore_eos: true,
        stop: vec![],
        sampling: SamplingParams {
            do_sample: false,
            repetition_penalty: 1.0,
            ..loaded.defaults.sampling.clone()
        },
        seed: 0,
    };
    eprintln!(
        "loaded {} in {:.2} s ({}, {} layers); {} × {} prompt tokens, {} new, {} repeats",
        model.display(),
        loaded.load_s,
        a.dtype.name(),
        loaded.model.config.num_layers,
        a.batch,
        a.prompt_tokens,
        a.new_tokens,
        a.repeat
    );
    let (mut prefill, mut decode, mut steps_s) = (vec![], vec![], vec![]);
    // The bandwidth beside each repeat: measured before the first and after each, while the
    // kernel's peak-memory mark can be reset around the test's buffer.
    let mut peak = PeakRss::default();
    let mut beside = vec![];
    peak.test_beside(&mut beside)?;
    for r in 0..a.repeat {
        let g = generate_rows(&loaded, a.dtype, &prompts, &opts)?;
        let g0 = &g[0];
        let p = rate(a.batch * a.prompt_tokens, g0.prefill_s);
        let steps = rate(g0.decode_steps, g0.decode_s);
        eprintln!(
            "repeat {}: prefill {p:.1} tok/s, decode {:.2} tok/s",
            r + 1,
            steps * a.batch as f64
        );
        prefill.push(p);
        decode.push(steps * a.batch as f64);
        steps_s.push(steps);
        if !beside.is_empty() {
            peak.test_beside(&mut beside)?;
        }
    }
    let interleaved = beside.len() == a.repeat + 1;
    peak.note();
    let wbytes = decode_weight_bytes(&loaded.model);
    let (read, coded) = decode_read_bytes(&loaded.model, a.dtype.name() == "bf16", a.batch);
    let (copied, anon_huge, file_huge) = (
        copied_weight_bytes(&loaded.model),
        anon_huge_page_bytes().unwrap_or(0),
        file_huge_page_bytes(&model).unwrap_or(0),
    );
    let peak_rss = peak.bytes;
    // Each repeat's bandwidth: the better test beside it; where the resets were refused, one
    // test at the end, after the peak is read.
    let bandwidths: Vec<f64> = if interleaved {
        beside.windows(2).map(|w| w[0].max(w[1])).collect()
    } else {
        beside = vec![read_bandwidth()?];
        vec![beside[0]; steps_s.len()]
    };
    let fraction = median(
        steps_s
            .iter()
            .zip(&bandwidths)
            .map(|(s, bw)| read as f64 * s / bw)
            .collect(),
    );
    let machine = median(bandwidths);
    let steps = median(steps_s);
    let achieved = read as f64 * steps;
    let (prefill, decode) = (median(prefill), median(decode));
    let kernels = kernel_names(coded);
    let rounded: u64 = decode_matrices(&loaded.model)
        .filter(|t| t.bf16_copy().is_some())
        .map(|t| t.bytes().len() as u64)
        .sum();
    // Where the codings came from when they replace the matrices: a file kept between runs.
    use lockstep_engine::weights::{coded_cache::CacheUse, page_cache::mapped_in_huge_pages};
    let (cache, cache_path, cache_note) = match loaded.model.coded_cache.get() {
        Some(CacheUse::Read(p)) => (
            "read",
            Some(p),
            format!("; codings read from {}", p.display()),
        ),
        Some(CacheUse::Written(p)) => (
            "written",
            Some(p),
            format!(
                "; codings made and written to {} (read from it by later runs)",
                p.display()
            ),
        ),
        Some(CacheUse::Skipped(why)) => {
            ("memory", None, format!("; codings made in memory ({why})"))
        }
        None => ("none", None, String::new()),
    };
    let cache_huge = cache_path
        .and_then(|p| mapped_in_huge_pages(p))
        .unwrap_or(0);
    eprintln!(
        "load {:.2} s; prefill {prefill:.1} tok/s; decode {decode:.2} tok/s; peak RSS {:.2} GB; \
         weights read {:.1} GB/s per decode = {:.0}% of the read bandwidth measured beside each repeat \
         ({}{:.1} GB/s; {} threads, \
         kernels {}); \
         of the {:.2} GB of weights, {:.2} GB rounded from f32 to bf16 copies, {:.2} GB coded in 12 bits \
         per value (a decode step reads {:.2} GB), {:.2} GB copied; in 2 MiB pages the kernel counts {:.2} GB \
         of the model's mapped files, {:.2} GB of the codings' file and {:.2} GB of the process's own \
         memory{cache_note}",
        loaded.load_s,
        peak_rss as f64 / 1e9,
        achieved / 1e9,
        100.0 * fraction,
        if a.repeat > 1 { "median " } else { "" },
        machine / 1e9,
        bandwidth::threads(),
        kernels,
        wbytes as f64 / 1e9,
        rounded as f64 / 1e9,
        coded as f64 / 1e9,
        read as f64 / 1e9,
        copied as f64 / 1e9,
        file_huge as f64 / 1e9,
        cache_huge as f64 / 1e9,
        anon_huge as f64 / 1e9
    );
    if a.json {
        let obj = serde_json::json!({
            "model": model.display().to_string(),
            "dtype": a.dtype.name(),
            "threads": bandwidth::threads(),
            "kernels": kernels,
            "batch": a.batch,
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "repeat": a.repeat,
            "load_s": loaded.load_s,
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
            "peak_rss_bytes": peak_rss,
            "decode_weight_bytes": wbytes,
            "decode_read_bytes": read,
            "coded_weight_bytes": coded,
            "bf16_copied_weight_bytes": rounded,
            "achieved_weight_bytes_per_s": achieved,
            "read_bandwidth_bytes_per_s": machine,
            "read_bandwidth_tests_bytes_per_s": beside,
            "bandwidth_fraction": fraction,
            "copied_weight_bytes": copied,
            "file_huge_page_bytes": file_huge,
            "anon_huge_page_bytes": anon_huge,
            "coded_cache": cache,
            "coded_cache_path": cache_path.map(|p| p.display().to_string()),
            "coded_cache_huge_page_bytes": cache_huge,
        });
        println!("{obj}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench --bandwidth-only`: the read-bandwidth test alone, printed (and as JSON with `json`).
fn bandwidth_only(json: bool) -> CliResult<ExitCode> {
    let bw = read_bandwidth()?;
    eprintln!(
        "read bandwidth {:.1} GB/s ({} threads, best of {} passes over 512 MiB, plain and prefetched)",
        bw / 1e9,
        bandwidth::threads(),
        bandwidth::PASSES * bandwidth::READS.len()
    );
    if json {
        let obj = serde_json::json!({
            "threads": bandwidth::threads(),
            "read_bandwidth_bytes_per_s": bw,
        });
        println!("{obj}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The fastest matmul kernel this CPU runs, and "coded decode" where the decode read 12-bit codings
/// (`coded`: the bytes of the matrices it read coded): which code paths the figures above come
/// from (`Amx` means the bf16 prefill ran on AMX tiles).
fn kernel_names(coded: u64) -> String {
    use lockstep_engine::kernels::matmul::Kernel;
    let fastest = format!("{:?}", Kernel::detect());
    if coded > 0 {
        format!("{fastest} + coded decode")
    } else {
        fastest
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}
