//! Traces written by other ports (JAX, C++, ...): what the verifier reads from their metadata.

use crate::tolerance::Tier;
use lockstep_trace::{TensorData, Trace, TraceStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A trace written by another port (JAX, C++, ... e.g. through `lockstep_reference.writer`), with
/// what the verifier needs from its metadata; the tensors stay in the file (or trace folder), read
/// a part at a time when judged.
#[derive(Debug)]
pub struct PortTrace {
    /// The file or trace folder.
    pub path: PathBuf,
    /// Label for tables: the prompt when the trace names one, else the file name.
    pub label: String,
    /// The `producer` metadata (the port's name).
    pub producer: String,
    /// The precision tier it is judged in: the `dtype` metadata's, unless the data contradicts it
    /// (see [`data_tier`]).
    pub tier: Tier,
    /// The tier the `dtype` metadata claims.
    pub claimed: Tier,
    /// The input ids (`token_ids` metadata, else the `tokens` tensor).
    pub tokens: Vec<u32>,
    /// The `prompt` metadata, when the ids came from a text.
    pub prompt: Option<String>,
    /// The trace's metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Why a port's trace cannot be judged: the file is unreadable, or its metadata does not say what
/// the verifier needs. Each renders as one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PortTraceError {
    /// The file is not a readable trace.
    #[error(transparent)]
    Trace(#[from] lockstep_trace::TraceError),
    /// The trace's metadata or token ids are missing or contradictory.
    #[error("{path}: {msg}")]
    Metadata {
        /// The file.
        path: String,
        /// What is missing or wrong.
        msg: String,
    },
}

impl PortTrace {
    /// Reads a port's trace; the error names the file and what is missing.
    pub fn read(path: &Path) -> Result<Self, PortTraceError> {
        let p = path.display();
        let meta = |msg: String| PortTraceError::Metadata {
            path: p.to_string(),
            msg,
        };
        let store = TraceStore::open(path)?;
        let metadata = store.metadata().clone();
        let producer = metadata
            .get("producer")
            .cloned()
            .unwrap_or_else(|| "unnamed port".into());
        let claimed = match metadata.get("dtype") {
            Some(d) => Tier::from_dtype(d).ok_or_else(|| {
                meta(format!("dtype '{d}' names no precision tier (f64, f32 or bf16)"))
            })?,
            None => {
                return Err(meta("no `dtype` metadata: the verifier runs the reference in the port's compute dtype (f64, f32 or bf16)".into()))
            }
        };
        let from_meta: Option<Vec<i64>> = match metadata.get("token_ids") {
            Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                meta(format!(
                    "token_ids metadata is not a JSON array of ids ({e})"
                ))
            })?),
            None => None,
        };
        let from_tensor: Option<Vec<i64>> = if store.contains("tokens") {
            let t = store.load(&["tokens"])?;
            t.get("tokens")
                .map(|t| t.data.to_f64().iter().map(|&v| v as i64).collect())
        } else {
            None
        };
        let ids = match (from_meta, from_tensor) {
            (Some(a), Some(b)) if a != b => {
                return Err(meta(
                    "token_ids metadata and the tokens tensor disagree".into(),
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(meta(
                    "no token ids (neither `token_ids` metadata nor a `tokens` tensor)".into(),
                ))
            }
        };
        if ids.is_empty() {
            return Err(meta("the trace has no tokens".into()));
        }
        let tokens = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| meta(format!("token id {i} is not valid"))))
            .collect::<Result<Vec<u32>, PortTraceError>>()?;
        let prompt = metadata.get("prompt").cloned();
        let label = match &prompt {
            Some(t) => format!("{:?}", t.chars().take(30).collect::<String>()),
            None => path
                .file_name()
                .map_or_else(|| p.to_string(), |f| f.to_string_lossy().into_owned()),
        };
        // A part at a time: a trace folder of a model bigger than memory is never read whole.
        let mut data = Tier::BF16;
        for part in store.parts() {
            let part_tier = data_tier(&store.load_part(part)?);
            if finer(part_tier, data) {
                data = part_tier;
            }
        }
        let tier = if finer(data, claimed) { data } else { claimed };
        Ok(PortTrace {
            path: path.to_path_buf(),
            label,
            producer,
            tier,
            claimed,
            tokens,
            prompt,
            metadata,
        })
    }
}

impl PortTrace {
    /// When the data contradicts the claimed dtype, what the report says about it, e.g. "claimed
    /// bf16, data is f32: judged as f32".
    pub fn tier_note(&self) -> Option<String> {
        (self.tier != self.claimed).then(|| {
            format!(
                "claimed {}, data is {}: judged as {}",
                self.claimed, self.tier, self.tier
            )
        })
    }
}

/// The coarsest tier whose dtype holds every value of the trace's floating tensors exactly (the
/// `tokens` tensor and integer tensors aside; NaN and infinities fit every dtype): bf16 when every
/// value is a bfloat16, f32 when every value is a float32, else f64. A port claiming a coarser
/// dtype than its data has did not compute in that dtype: a "bf16" trace holding float32 values
/// is judged as f32, not with bf16's wider yardstick.
pub fn data_tier(trace: &Trace) -> Tier {
    let mut tier = Tier::BF16;
    for name in trace.names() {
        let Some(t) = trace.get(name).filter(|_| name != "tokens") else {
            continue;
        };
        let need = match &t.data {
            TensorData::I64(_) | TensorData::BF16(_) => continue,
            TensorData::F32(v) => {
                if v.iter().all(|&x| fits_bf16(x)) {
                    continue;
                }
                Tier::F32
            }
            data => {
                let v = data.to_f64();
                if v.iter().any(|&x| !fits_f32(x)) {
                    return Tier::F64;
                }
                if v.iter().all(|&x| fits_bf16(x as f32)) {
                    continue;
                }
                Tier::F32
            }
        };
        if finer(need, tier) {
            tier = need;
        }
    }
    tier
}

/// Whether `a` is a finer (more precise) tier than `b`.
fn finer(a: Tier, b: Tier) -> bool {
    let rank = |t: Tier| match t {
        Tier::BF16 => 0,
        Tier::F32 => 1,
        Tier::F64 => 2,
    };
    rank(a) > rank(b)
}

/// Whether a float64 value is exactly a float32 (NaN counts as one).
fn fits_f32(x: f64) -> bool {
    x.is_nan() || (x as f32) as f64 == x
}

/// Whether a float32 value is exactly a bfloat16: its low 16 bits are zero (NaN counts as one).
fn fits_bf16(x: f32) -> bool {
    x.is_nan() || x.to_bits() & 0xffff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(dtype: &str, data: TensorData) -> Trace {
        let mut t = Trace::new();
        t.insert("tokens", vec![1, 2], TensorData::I64(vec![5, 7]))
            .unwrap();
        t.insert("logits", vec![1, 2, 2], data).unwrap();
        t.metadata.insert("dtype".into(), dtype.into());
        t
    }

    fn read(t: &Trace) -> PortTrace {
        let dir = std::env::temp_dir().join(format!("lockstep-port-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}.safetensors", t.metadata["dtype"]));
        t.write(&p).unwrap();
        let port = PortTrace::read(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        port
    }

    #[test]
    fn the_dtype_claim_is_checked_against_the_data() {
        let bf16_values = vec![1.0f32, -2.5, 0.15625, f32::INFINITY];
        let f32_values = vec![1.0f32, -2.5, 0.1, 3.0];
        let f64_values = vec![1.0f64, -2.5, 0.1, 3.0];
        // A claim the data bears out stands.
        let ok = read(&trace("bf16", TensorData::F32(bf16_values.clone())));
        assert_eq!(
            (ok.claimed, ok.tier, ok.tier_note()),
            (Tier::BF16, Tier::BF16, None)
        );
        // bf16 claimed, float32 values: judged as f32, and said so.
        let p = read(&trace("bf16", TensorData::F32(f32_values.clone())));
        assert_eq!((p.claimed, p.tier), (Tier::BF16, Tier::F32));
        assert_eq!(
            p.tier_note().as_deref(),
            Some("claimed bf16, data is f32: judged as f32")
        );
        // f32 claimed, float64 values stored as F64: judged as f64.
        let p = read(&trace("f32", TensorData::F64(f64_values)));
        assert_eq!((p.claimed, p.tier), (Tier::F32, Tier::F64));
        // f32 claimed, stored as F64 but every value a float32: the claim stands.
        let p = read(&trace(
            "f32",
            TensorData::F64(f32_values.iter().map(|&x| x as f64).collect()),
        ));
        assert_eq!(p.tier, Tier::F32);
        // A finer claim than the data needs is not contradicted (f64 compute may land on f32s).
        let p = read(&trace("f64", TensorData::F32(bf16_values)));
        assert_eq!(p.tier, Tier::F64);
    }
}
