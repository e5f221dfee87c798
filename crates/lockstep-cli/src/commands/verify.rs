//! `lockstep verify`: the phased verification against the PyTorch reference, with a Markdown
//! report, JSON, an SVG plot of the per-layer error and a self-contained HTML report.

use super::common::TierChoice;
use super::compare::write_atomic;
use crate::cli_error::{CliError, CliResult};
use crate::harness::engine_pipeline::{run_verify, VerifyOptions};
use crate::harness::inputs::{default_inputs, Input, InputKind};
use crate::harness::port_pipeline::{run_port_verify, PortVerifyOptions};
use crate::harness::pyref::PythonReference;
use crate::harness::python::ReferenceEnv;
use lockstep_engine::{Fault, Precision};
use lockstep_verify::{report, Tier, VerifyOutcome};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `verify`.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder or .gguf file (default: a small random-weight Qwen2 model with the real Qwen tokenizer,
    /// created on first use in the cache folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Precision tier(s): f64 (exact), f32, bf16 (bf16-stored checkpoints; also checks bf16w), or
    /// all (f64 + f32, + bf16 when the checkpoint is stored in bf16).
    #[arg(long, value_enum, default_value = "all")]
    pub dtype: TierChoice,
    /// Prompts for the forward phases (repeatable; default: "Hello", "The", "123", plus a short
    /// sentence and a ~300-token paragraph).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Markdown report path.
    #[arg(long, default_value = "reports/verify.md")]
    pub report: PathBuf,
    /// JSON report path.
    #[arg(long, default_value = "reports/verify.json")]
    pub json: PathBuf,
    /// SVG plot of the per-layer error.
    #[arg(long, default_value = "reports/verify.svg")]
    pub plot: PathBuf,
    /// Self-contained HTML report (summary, first divergence, per-layer charts of every tier,
    /// details folded away); opens offline in any browser.
    #[arg(long, default_value = "reports/verify.html")]
    pub html: PathBuf,
    /// Inject a deliberate bug into lockstep's engine (to see the verifier catch it).
    #[arg(long)]
    pub inject: Option<Fault>,
    /// Only the single-token prompts: skip the multi-token sequences and KV-cache decoding
    /// (for 7B-scale models on a CPU, where the full set takes long).
    #[arg(long)]
    pub single_only: bool,
    /// New tokens of the greedy generation phase (f32 and bf16 tiers: lockstep vs transformers.generate,
    /// alone and batched); 0 skips it [default: 64, or 0 with --single-only].
    #[arg(long)]
    pub generate_tokens: Option<usize>,
    /// Verify another port's traces (JAX, C++, ...) instead of lockstep's engine: each trace's
    /// `token_ids` and `dtype` metadata say what the reference runs (see docs/trace-format.md and
    /// reference/lockstep_reference/writer.py). `--dtype` does not apply.
    #[arg(long = "port-trace", value_name = "FILE", num_args = 1.., conflicts_with_all = ["inject", "prompt"])]
    pub port_trace: Vec<PathBuf>,
    /// Verify a running OpenAI-compatible server (lockstep serve, vLLM, SGLang, llama.cpp's
    /// server, ...) at this base URL (`http://HOST:PORT/v1`) as a black box: greedy completions of
    /// the verify prompts with top-k log-probabilities, judged against the reference and the f64
    /// oracle run here on the server's own sequences. `--model` is the checkpoint it serves;
    /// `--dtype` the tier it is judged in (default f32; `all` means f32 here).
    #[arg(long, value_name = "URL", conflicts_with_all = ["inject", "port_trace"])]
    pub endpoint: Option<String>,
    /// With `--endpoint`: top log-probabilities asked for per step (OpenAI's completions allow 5,
    /// most servers 20).
    #[arg(long, default_value_t = 5, requires = "endpoint")]
    pub top_logprobs: usize,
    /// Run even when the memory estimate (weights, KV cache, activations, traces, the Python
    /// reference) exceeds the memory available; without it such a run is refused before loading.
    #[arg(long)]
    pub force: bool,
}

/// The cache folder: `$LOCKSTEP_CACHE`, else `$XDG_CACHE_HOME/lockstep`, else `~/.cache/lockstep`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("lockstep");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/lockstep")
}

/// Version of the built-in default model's recipe; a cached model of another version is rebuilt.
/// 2: the tokenizer carries Qwen2.5's chat template.
const DEFAULT_MODEL_VERSION: &str = "2";

/// File in the default model's folder recording the recipe version it was built with.
const DEFAULT_MODEL_STAMP: &str = "lockstep-default-version";

/// The built-in default model, created on first use (and rebuilt when its recipe changed).
pub fn default_model(env: &ReferenceEnv) -> CliResult<PathBuf> {
    let dir = cache_dir().join("models/qwen2-default");
    let stamp = std::fs::read_to_string(dir.join(DEFAULT_MODEL_STAMP)).unwrap_or_default();
    let complete = dir.join("config.json").exists() && dir.join("model.safetensors").exists();
    if complete && stamp.trim() == DEFAULT_MODEL_VERSION {
        return Ok(dir);
    }
    if complete {
        eprintln!(
            "the default model in {} was built by an older recipe; rebuilding it",
            dir.display()
        );
    } else {
        eprintln!(
            "creating the default model in {} (first use)",
            dir.display()
        );
    }
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    crate::progress::with_spinner("building the default model (transformers)", || {
        env.run(&["make-default", "--out", &partial.to_string_lossy()])
    })?;
    let fail = |e: std::io::Error| CliError::input(format!("cannot create {}: {e}", dir.display()));
    std::fs::write(partial.join(DEFAULT_MODEL_STAMP), DEFAULT_MODEL_VERSION).map_err(fail)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(fail)?;
    }
    std::fs::rename(&partial, &dir).map_err(fail)?;
    Ok(dir)
}

/// The tiers `--dtype` asks for. `all` is f64 and f32, plus bf16 when the checkpoint is stored in
/// bf16 (the bf16 tier's oracle must run on the very weights bf16 uses).
pub fn tiers(dtype: TierChoice, model: &Path) -> CliResult<Vec<Tier>> {
    let stored_bf16 = || -> CliResult<bool> {
        let ck = lockstep_engine::weights::Checkpoint::open(model)?;
        Ok(!ck.tensors.is_empty()
            && ck
                .tensors
                .values()
                .all(|t| t.dtype == lockstep_engine::weights::StoredDtype::BF16))
    };
    Ok(match dtype {
        TierChoice::One(Tier::F64) => vec![Tier::F64],
        TierChoice::One(Tier::F32) => vec![Tier::F32],
        TierChoice::All if stored_bf16()? => vec![Tier::F64, Tier::F32, Tier::BF16],
        TierChoice::All => vec![Tier::F64, Tier::F32],
        TierChoice::One(Tier::BF16) if stored_bf16()? => vec![Tier::BF16],
        TierChoice::One(Tier::BF16) => {
            return Err(CliError::input(
                "the bf16 tier needs a checkpoint stored in bf16 (its oracle runs on those same weights); this one is not",
            ))
        }
    })
}

/// Inputs from `--prompt` (each a single-pass input) or the defaults.
pub fn inputs(prompts: &[String]) -> Vec<Input> {
    if prompts.is_empty() {
        return default_inputs();
    }
    let mut v: Vec<Input> = prompts
        .iter()
        .map(|p| Input {
            label: format!("{:?}", p.chars().take(30).collect::<String>()),
            text: p.clone(),
            kind: InputKind::Single,
        })
        .collect();
    v.extend(
        default_inputs()
            .into_iter()
            .filter(|i| i.kind == InputKind::Multi),
    );
    v
}

/// Runs the phases with progress on stderr.
pub fn run_phases(
    model: &Path,
    tiers: Vec<Tier>,
    inputs: Vec<Input>,
    fault: Option<Fault>,
    reference: &mut PythonReference,
    work_dir: &Path,
    generate_tokens: usize,
) -> CliResult<VerifyOutcome> {
    let opts = VerifyOptions {
        model: model.to_path_buf(),
        tiers,
        inputs,
        fault,
        work_dir: work_dir.to_path_buf(),
        generate_tokens,
    };
    let steps = crate::progress::Steps::start();
    let mut progress = |msg: &str| steps.step(msg);
    run_verify(&opts, reference, &mut progress).map_err(CliError::from)
}

/// Work folder for one model's reference traces (kept, so reruns reuse them).
pub fn work_dir_for(model: &Path) -> PathBuf {
    let canon = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    let mut h: u64 = 0xcbf29ce484222325;
    for b in canon.to_string_lossy().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    cache_dir().join("work").join(format!("{h:016x}"))
}

/// The model (given, or the default one), its work folder, and the reference runner.
pub fn open_session(model: Option<&Path>) -> CliResult<(PathBuf, PathBuf, PythonReference)> {
    let env = ReferenceEnv::find()?;
    let model = match model {
        Some(m) => m.to_path_buf(),
        None => default_model(&env)?,
    };
    let work = work_dir_for(&model);
    // Silently, as caches are pruned: a message would be a second line under every one-line
    // error about the input.
    prune_work_folders(&work, &model);
    let reference = PythonReference::new(env, &work);
    Ok((model, work, reference))
}

/// The file in a work folder that names the model its traces are of.
const MODEL_MARKER: &str = "model-path";

/// Records `model` (when it exists) in its work folder `keep`, and removes the other work folders (its siblings)
/// whose recorded model no longer exists: traces of a deleted model or of a checkout since
/// removed, which no run can reuse (each checkout's fixtures get their own folders, so without
/// this the cache grows by every clone's traces). Folders without a record are left, as is
/// anything that cannot be read or removed. Returns how many folders it removed.
fn prune_work_folders(keep: &Path, model: &Path) -> usize {
    let canon = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    if model.exists() && std::fs::create_dir_all(keep).is_ok() {
        let _ = std::fs::write(keep.join(MODEL_MARKER), canon.to_string_lossy().as_bytes());
    }
    let Some(Ok(entries)) = keep.parent().map(std::fs::read_dir) else {
        return 0;
    };
    let mut removed = 0;
    for dir in entries.flatten().map(|e| e.path()) {
        if dir == keep || !dir.is_dir() {
            continue;
        }
        let Ok(recorded) = std::fs::read_to_string(dir.join(MODEL_MARKER)) else {
            continue;
        };
        if Path::new(recorded.trim_end()).exists() {
            continue;
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Runs `verify`.
pub fn run(a: Args) -> CliResult<ExitCode> {
    if !a.port_trace.is_empty() {
        return run_port(a);
    }
    if a.endpoint.is_some() {
        return super::verify_endpoint::run_endpoint(a);
    }
    let (model, work, mut reference) = open_session(a.model.as_deref())?;
    let inputs: Vec<Input> = inputs(&a.prompt)
        .into_iter()
        .filter(|i| !a.single_only || i.kind == InputKind::Single)
        .collect();
    let generate_tokens = a
        .generate_tokens
        .unwrap_or(if a.single_only { 0 } else { 64 });
    check_memory(&model, a.dtype, &inputs, generate_tokens, a.force)?;
    let tiers = tiers(a.dtype, &model)?;
    let outcome = run_phases(
        &model,
        tiers,
        inputs,
        a.inject,
        &mut reference,
        &work,
        generate_tokens,
    )?;

    let mut title = format!("lockstep verify: {}", model.display());
    if let Some(f) = a.inject {
        title.push_str(&format!(" (injected fault: {f})"));
    }
    let desc = describe_model(&model);
    let code = write_reports(
        &a,
        &title,
        &desc,
        &outcome,
        "max |ours - transformers| per layer vs the reference's own noise",
    )?;
    // What the run leaves behind (a 7B run: ~14 GB), so the space is never a surprise.
    println!(
        "traces kept in {} ({:.2} GB, reused by the next run of this model; delete the folder to free it)",
        work.display(),
        folder_bytes(&work) as f64 / 1e9
    );
    Ok(code)
}

/// Bytes of the files in `dir` and in its folders (trace folders), recursively; what cannot be
/// read counts 0.
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Refuses a `verify` whose memory estimate exceeds the available memory, before any weights are
/// mapped (a warning with `--force`). The longest input counts its tokens (one per byte when the
/// tokenizer does not load: a byte-level BPE token covers at least one byte), the finest tier's
/// activations, and the Python reference's model in its dtype.
fn check_memory(
    model: &Path,
    dtype: TierChoice,
    inputs: &[Input],
    generate_tokens: usize,
    force: bool,
) -> CliResult<()> {
    use lockstep_engine::resources::{self, MemoryEstimate, RunShape};
    let source = lockstep_engine::source::ModelSource::resolve(model)?;
    let config = resources::config_of(&source)?;
    let (weights, streamed) = resources::held_weight_bytes(&source, &config)?;
    // The longest input in tokens when the model's tokenizer loads (the paragraph is ~300 tokens
    // of ~1,700 bytes, and the traces grow with its square), else one token per byte.
    let tokenizer = lockstep_engine::Tokenizer::from_dir(model).ok();
    let tokens = |text: &str| {
        tokenizer
            .as_ref()
            .and_then(|t| t.encode(text).ok())
            .map_or(text.len(), |ids| ids.len())
    };
    let prompt_len = inputs
        .iter()
        .map(|i| tokens(&i.text) + 16)
        .max()
        .unwrap_or(16);
    // Bytes per value of the activations, of the Python reference's weights, and of the traces
    // compared together (lockstep's and the reference's in the tier, plus the f64 oracle's).
    let (act_bytes, reference_bytes, trace_bytes) = match dtype {
        TierChoice::One(Precision::F64) | TierChoice::All => (8, 4, 16),
        TierChoice::One(Precision::BF16) => (4, 2, 2 + 2 + 8),
        TierChoice::One(Precision::F32) => (4, 4, 4 + 4 + 8),
    };
    let run = RunShape {
        batch: 2,
        prompt_len,
        context: prompt_len + generate_tokens,
        act_bytes,
    };
    let mut estimate =
        MemoryEstimate::for_verify(&config, weights, run, reference_bytes, trace_bytes);
    estimate.weights_streamed = streamed;
    let reference_dtype = if reference_bytes == 2 { "bf16" } else { "f32" };
    if crate::harness::pyref::streamed(model, reference_dtype) {
        estimate = estimate.with_streamed_reference(&config, reference_bytes);
    }
    // The bf16 and f32 tiers' decodes on a bf16 checkpoint may code its matrices.
    let tiers = tiers(dtype, model)?;
    let bf16 = config.declared_dtype.as_deref() == Some("bfloat16");
    if bf16 && (tiers.contains(&Precision::BF16) || tiers.contains(&Precision::F32)) {
        estimate = estimate.with_coded_copy(resources::available_memory())?;
    }
    super::common::enforce_memory_estimate(&estimate, model, force)
}

/// The phased JSON with the op-level judgements (`op_level`) and the first divergence taken from
/// where a difference is first *made* when an op-level check found one (`first_divergence`; the
/// end-to-end one stays as `first_divergence_end_to_end`).
fn verify_json(title: &str, desc: &str, outcome: &VerifyOutcome) -> String {
    let mut r = report::verify_report(title, desc, &outcome.phases);
    let end_to_end = r.first_divergence.clone();
    if let Some(made) = outcome
        .local
        .iter()
        .flat_map(|(_, v)| v.iter())
        .filter_map(|l| l.local.first_divergence.clone())
        .min_by_key(|n| lockstep_trace::forward_rank(n))
    {
        r.first_divergence = Some(made);
    }
    r.timings = &outcome.timings;
    r.op_level = Some(report::OpLevel {
        first_divergence_end_to_end: end_to_end,
        op_level: lockstep_verify::local::local_json(&outcome.local),
    });
    report::Versioned::new(r).to_json()
}

/// Writes the Markdown report, JSON and SVG plot (the plot from the last tier's comparisons),
/// prints the phase summary, and returns exit 0 when every phase passed, else 1.
pub fn write_reports(
    a: &Args,
    title: &str,
    desc: &str,
    outcome: &VerifyOutcome,
    plot_title: &str,
) -> CliResult<ExitCode> {
    let md = report::phased_markdown(title, desc, &outcome.phases)
        + &report::timings_markdown(&outcome.timings);
    let js = verify_json(title, desc, outcome);
    let plot_inputs = outcome
        .full
        .last()
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    let svg = report::svg_per_layer(plot_title, &plot_inputs);
    let html = lockstep_verify::html::verify_html(title, desc, outcome);
    for (p, text) in [
        (&a.report, &md),
        (&a.json, &js),
        (&a.plot, &svg),
        (&a.html, &html),
    ] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| CliError::input(format!("cannot create {}: {e}", dir.display())))?;
        }
        write_atomic(p, text)?;
    }
    println!("{title}");
    for p in &outcome.phases {
        println!("  {:4}  {:32} {}", p.status.label(), p.name, p.summary);
    }
    if !outcome.timings.is_empty() {
        let total: f64 = outcome.timings.iter().map(|s| s.seconds).sum();
        println!(
            "  {total:.0} s in {} steps (each step's time in the report)",
            outcome.timings.len()
        );
    }
    println!(
        "{}: report {}, JSON {}, plot {}, HTML {}",
        lockstep_verify::overall_status(&outcome.phases),
        a.report.display(),
        a.json.display(),
        a.plot.display(),
        a.html.display()
    );
    Ok(if outcome.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line describing the model for report headers.
pub fn describe_model(model: &Path) -> String {
    match lockstep_engine::ModelConfig::from_file(&model.join("config.json")) {
        Ok(c) => format!(
            "{} at {}: {} layers, hidden {}, {} heads / {} kv heads (head_dim {}), vocab {}, {} parameters, {} embeddings, rope_theta {}, rms_norm_eps {:e}",
            c.arch.hf_class(),
            model.display(),
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.parameter_count(),
            if c.tie_word_embeddings { "tied" } else { "untied" },
            c.rope_theta,
            c.rms_norm_eps
        ),
        Err(e) => e.to_string(),
    }
}

/// Runs `verify --port-trace FILE...`: another port's traces against the reference.
pub fn run_port(a: Args) -> CliResult<ExitCode> {
    let (model, work, mut reference) = open_session(a.model.as_deref())?;
    let opts = PortVerifyOptions {
        model: model.clone(),
        traces: a.port_trace.clone(),
        work_dir: work,
    };
    let steps = crate::progress::Steps::start();
    let mut progress = |msg: &str| steps.step(msg);
    let outcome = run_port_verify(&opts, &mut reference, &mut progress)?;
    drop(steps);

    let mut producers: Vec<String> = outcome
        .full
        .iter()
        .flat_map(|(_, c)| c.iter().filter_map(|c| c.comparison.test_producer.clone()))
        .collect();
    producers.sort();
    producers.dedup();
    let title = format!(
        "lockstep verify: {} (port trace{}) against transformers",
        if producers.is_empty() {
            "unnamed port".to_string()
        } else {
            producers.join(", ")
        },
        if a.port_trace.len() > 1 { "s" } else { "" }
    );
    let desc = format!(
        "{}\n\nPort traces: {}. Each is compared with the reference run on the trace's own token ids in the trace's dtype (and, for f32/bf16, the pure-f64 oracle).",
        describe_model(&model),
        a.port_trace
            .iter()
            .map(|p| format!("`{}`", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    write_reports(
        &a,
        &title,
        &desc,
        &outcome,
        "max |port - transformers| per layer vs the reference's own noise",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work folders of models no longer on disk are removed; those of models still there, those
    /// without a record and the current one are kept, and the current one records its model.
    #[test]
    fn work_folders_of_vanished_models_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let models = tempfile::tempdir().unwrap();
        let (alive, gone, current) = (
            models.path().join("alive"),
            models.path().join("gone"),
            models.path().join("current"),
        );
        std::fs::create_dir_all(&alive).unwrap();
        std::fs::create_dir_all(&current).unwrap();
        let folder = |name: &str, model: Option<&Path>| {
            let d = root.path().join(name);
            std::fs::create_dir_all(d.join("traces")).unwrap();
            std::fs::write(d.join("traces/t.safetensors"), [0u8; 1000]).unwrap();
            if let Some(m) = model {
                std::fs::write(d.join(MODEL_MARKER), m.to_string_lossy().as_bytes()).unwrap();
            }
            d
        };
        let a = folder("a", Some(&alive));
        let g = folder("g", Some(&gone));
        let u = folder("u", None);
        let keep = root.path().join("k");
        assert_eq!(prune_work_folders(&keep, &current), 1);
        assert!(a.exists() && u.exists() && !g.exists());
        let recorded = std::fs::read_to_string(keep.join(MODEL_MARKER)).unwrap();
        assert_eq!(Path::new(&recorded), current.canonicalize().unwrap());
        // Once its model is gone too, a later run elsewhere removes it.
        std::fs::remove_dir_all(&alive).unwrap();
        assert_eq!(prune_work_folders(&keep, &current), 1);
        assert!(!a.exists() && u.exists() && keep.exists());
    }
}
