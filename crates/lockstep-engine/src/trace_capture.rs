//! One traced forward pass, written in the lockstep trace format (`docs/trace-format.md`).

use crate::error::Result;
use crate::kernels::{Float, Precision};
use crate::model::{KvCache, Model};
use crate::observer::TraceRecorder;
use lockstep_trace::Trace;

/// Runs one forward pass over `tokens` (batch 1) in precision `T` and returns its full trace with
/// metadata: producer, version, dtype, model fingerprint, token ids (and the prompt if given).
pub fn trace_forward<T: Float>(
    model: &Model,
    tokens: &[u32],
    prompt: Option<&str>,
) -> Result<Trace> {
    let mut rec = TraceRecorder::default();
    let mut cache = KvCache::<T>::new(model.config.num_layers);
    model.forward(tokens, &mut cache, &mut rec)?;
    let mut trace = rec.trace;
    let m = &mut trace.metadata;
    m.insert("producer".into(), "lockstep".into());
    m.insert("lockstep_version".into(), crate::VERSION.into());
    m.insert("dtype".into(), T::PRECISION.as_str().into());
    m.insert(
        "pure_f64".into(),
        (T::PRECISION == Precision::F64).to_string(),
    );
    m.insert("attn_implementation".into(), "eager".into());
    m.insert("model_type".into(), model.config.arch.model_type().into());
    m.insert("num_layers".into(), model.config.num_layers.to_string());
    m.insert(
        "token_ids".into(),
        serde_json::to_string(tokens).expect("ids serialize"),
    );
    if let Some(p) = prompt {
        m.insert("prompt".into(), p.into());
    }
    if let Some(f) = model.fault {
        m.insert("injected_fault".into(), f.name().into());
    }
    m.insert("model_fingerprint".into(), fingerprint(model)?);
    Ok(trace)
}

/// The model fingerprint, computed once per checkpoint folder per process (hashing a 7B
/// checkpoint reads 15 GB).
fn fingerprint(model: &Model) -> Result<String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<std::path::PathBuf, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = model.checkpoint.dir.clone();
    if let Some(f) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let f = model.checkpoint.fingerprint()?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, f.clone());
    Ok(f)
}
