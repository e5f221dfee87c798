//! The reference implementation as the pipelines see it, and the work they ask of it.

use super::HarnessResult;
use lockstep_verify::near_tie::GeneratedRow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One reference trace to produce.
#[derive(Debug, Clone)]
pub struct TraceJob {
    /// Model folder.
    pub model: PathBuf,
    /// Input ids (batch 1).
    pub tokens: Vec<u32>,
    /// `f64` (pure float64), `f32` or `bf16`.
    pub dtype: String,
    /// Where to write the trace.
    pub out: PathBuf,
}

/// What the reference loaded, for the weights phase (the `weights` answer, Python
/// `WeightsAnswer`: every field required).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceWeights {
    /// sha256 of each loaded tensor's bytes, in its loaded dtype, by checkpoint name.
    pub checksums: BTreeMap<String, String>,
    /// Parameters counted by the reference (tied matrices once).
    pub parameter_count: u64,
    /// Whether lm_head and the embeddings are the same tensor in the reference.
    pub tied: bool,
    /// Whether the reference's attention has q/k/v biases.
    pub qkv_bias: bool,
    /// The dtype the reference loaded the weights in.
    pub dtype: String,
}

/// One greedy generation for the reference to run (eager attention, the checkpoint's EOS ids, no
/// repetition penalty): one prompt alone, or several as one left-padded batch.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Model folder.
    pub model: PathBuf,
    /// The dtype the reference loads the model in: `f32` or `bf16`.
    pub dtype: String,
    /// The prompts' ids; more than one is a batch (left padding and an attention mask).
    pub prompts: Vec<Vec<u32>>,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// The reference lists, per generated step, every token whose score is within this of its
    /// best (at least its best two, at most [`TOP_MAX`]): the near-tie tolerance, so that a
    /// parting on a near-tie finds our token among them with its exact score.
    pub tie_within: f64,
}

/// Most tokens the reference lists per generated step (`batch.TOP_MAX`).
pub const TOP_MAX: usize = 256;

/// One op-level job: every op of a test trace recomputed by the reference on the test's own
/// inputs of that op (docs/numerics.md, "Op-level judgement").
#[derive(Debug, Clone)]
pub struct OpsJob {
    /// Model folder (or GGUF file).
    pub model: PathBuf,
    /// The test trace whose ops are recomputed.
    pub test: PathBuf,
    /// The tier's dtype: `f64`, `f32` or `bf16`.
    pub dtype: String,
    /// Where to write the ops in pure float64 (the exact op on the test's inputs).
    pub out_exact: PathBuf,
    /// Where to write the ops in `dtype` with transformers' own kernels (not for f64).
    pub out_reference: Option<PathBuf>,
}

/// The reference implementation, as seen by the verifier.
pub trait Reference {
    /// Token ids of each text (no special tokens added).
    fn tokenize(&mut self, model: &Path, texts: &[String]) -> HarnessResult<Vec<Vec<u32>>>;
    /// Each conversation (`[{"messages": [...], "tools": [...]|null}]`) rendered by
    /// `apply_chat_template(..., add_generation_prompt=True)`, with its ids.
    fn chat(
        &mut self,
        model: &Path,
        conversations: &serde_json::Value,
    ) -> HarnessResult<Vec<(String, Vec<u32>)>>;
    /// Checksums and facts of the weights as the reference loaded them (in the stored dtype).
    fn weights(&mut self, model: &Path) -> HarnessResult<ReferenceWeights>;
    /// Writes every requested trace.
    fn traces(&mut self, jobs: &[TraceJob]) -> HarnessResult<()>;
    /// Runs each greedy generation; per job, per prompt, the new ids (as `generate` returns them:
    /// a batch row that ended keeps being padded after its EOS) and the reference's best tokens
    /// with their scores at each step (for judging a parting a near-tie from its own logits).
    fn generate(&mut self, jobs: &[GenerateJob]) -> HarnessResult<Vec<Vec<GeneratedRow>>>;
    /// Writes every op-level job's traces.
    fn local_ops(&mut self, jobs: &[OpsJob]) -> HarnessResult<()>;
    /// Starts whatever the reference needs before its first answer (a process, its imports), so
    /// that it gets ready while the caller does other work (loading the model). A failure here is
    /// not reported: the first request reports it.
    fn warm_up(&mut self) {}
}
