//! Traces written by other ports (JAX, C++, ...): what the verifier reads from their metadata.

use crate::tolerance::Tier;
use lockstep_trace::Trace;
use std::path::{Path, PathBuf};

/// A trace written by another port (JAX, C++, ... e.g. through `lockstep_reference.writer`), with
/// what the verifier needs from its metadata.
#[derive(Debug)]
pub struct PortTrace {
    /// The file.
    pub path: PathBuf,
    /// Label for tables: the prompt when the trace names one, else the file name.
    pub label: String,
    /// The `producer` metadata (the port's name).
    pub producer: String,
    /// The precision tier, from the `dtype` metadata.
    pub tier: Tier,
    /// The input ids (`token_ids` metadata, else the `tokens` tensor).
    pub tokens: Vec<u32>,
    /// The `prompt` metadata, when the ids came from a text.
    pub prompt: Option<String>,
    /// The tensors.
    pub trace: Trace,
}

impl PortTrace {
    /// Reads a port's trace; the error names the file and what is missing.
    pub fn read(path: &Path) -> Result<Self, String> {
        let p = path.display();
        let trace = Trace::read(path).map_err(|e| e.to_string())?;
        let producer = trace
            .metadata
            .get("producer")
            .cloned()
            .unwrap_or_else(|| "unnamed port".into());
        let tier = match trace.metadata.get("dtype") {
            Some(d) => Tier::from_dtype(d).ok_or_else(|| {
                format!("{p}: dtype '{d}' names no precision tier (f64, f32 or bf16)")
            })?,
            None => {
                return Err(format!(
                    "{p}: no `dtype` metadata: the verifier runs the reference in the port's compute dtype (f64, f32 or bf16)"
                ))
            }
        };
        let from_meta: Option<Vec<i64>> = match trace.metadata.get("token_ids") {
            Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                format!("{p}: token_ids metadata is not a JSON array of ids ({e})")
            })?),
            None => None,
        };
        let from_tensor: Option<Vec<i64>> = trace
            .get("tokens")
            .map(|t| t.data.to_f64().iter().map(|&v| v as i64).collect());
        let ids = match (from_meta, from_tensor) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "{p}: token_ids metadata and the tokens tensor disagree"
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(format!(
                    "{p}: no token ids (neither `token_ids` metadata nor a `tokens` tensor)"
                ))
            }
        };
        if ids.is_empty() {
            return Err(format!("{p}: the trace has no tokens"));
        }
        let tokens = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| format!("{p}: token id {i} is not valid")))
            .collect::<Result<Vec<u32>, String>>()?;
        let prompt = trace.metadata.get("prompt").cloned();
        let label = match &prompt {
            Some(t) => format!("{:?}", t.chars().take(30).collect::<String>()),
            None => path
                .file_name()
                .map_or_else(|| p.to_string(), |f| f.to_string_lossy().into_owned()),
        };
        Ok(PortTrace {
            path: path.to_path_buf(),
            label,
            producer,
            tier,
            tokens,
            prompt,
            trace,
        })
    }
}
