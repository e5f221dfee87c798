//! Reading safetensors files: the shard list of `model.safetensors.index.json`, mapping one file
//! into tensors, and one-line explanations of a damaged header.

use super::{StoredDtype, Tensor};
use crate::error::{EngineError, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(super) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Safetensors {
        path: path.into(),
        msg: format!("index is not valid JSON: {e}"),
    })
}

pub(super) fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| EngineError::Safetensors {
            path: index.into(),
            msg: "index has no 'weight_map' object".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut out = vec![];
    for f in files {
        if f.contains('/') || f.contains("..") {
            return Err(EngineError::Safetensors {
                path: index.into(),
                msg: format!("shard name '{f}' must be a plain file name"),
            });
        }
        let p = dir.join(&f);
        if !p.exists() {
            return Err(EngineError::MissingFile {
                path: p,
                what: "a shard listed in model.safetensors.index.json".into(),
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// Memory-maps a checkpoint file (safetensors or GGUF) read-only.
///
/// Every tensor's byte range is checked against the file's length (the safetensors header, or
/// [`crate::gguf::Header::parse`]) before any tensor byte is read, so a file truncated *before*
/// it is opened is a one-line error. What no loader of mapped files can guard against: a file
/// truncated or rewritten by another process *while* it is mapped makes the next read of a page
/// past its new end raise SIGBUS, which ends the process. Do not modify a checkpoint while
/// lockstep runs on it.
pub(crate) fn map_readonly(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|source| EngineError::Io {
        path: path.into(),
        source,
    })?;
    // SAFETY: the file is opened read-only; lockstep never writes to checkpoint files, and a
    // checkpoint changed underneath a running process is outside what any loader can guard.
    unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
        path: path.into(),
        source,
    })
}

/// Maps one safetensors file and validates its header completely.
pub(super) fn map_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |msg: String| EngineError::Safetensors {
        path: path.into(),
        msg,
    };
    let map = Arc::new(map_readonly(path)?);
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| bad(explain(&map, e)))?;
    let (header_len, _) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
    let base = 8 + header_len;
    let mut out = vec![];
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => StoredDtype::F32,
            safetensors::Dtype::BF16 => StoredDtype::BF16,
            safetensors::Dtype::F16 => StoredDtype::F16,
            safetensors::Dtype::F64 => StoredDtype::F64,
            other => {
                return Err(EngineError::TensorDtype {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let data = view.data();
        let start = data.as_ptr() as usize - map.as_ptr() as usize;
        debug_assert!(start >= base);
        out.push((
            name,
            Tensor::mapped(
                map.clone(),
                start,
                start + data.len(),
                dtype,
                view.shape().to_vec(),
            ),
        ));
    }
    Ok(out)
}

/// A clearer one-line account of why `safetensors` refused a file, naming sizes and tensors
/// where its own message does not.
pub(super) fn explain(buf: &[u8], e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let len = buf.len();
    let header_len = buf
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match e {
        E::HeaderTooSmall => format!(
            "the file is only {len} bytes, too short to hold a header (truncated, or not a safetensors file)"
        ),
        E::HeaderTooLarge => format!(
            "header length {} is beyond the 100 MB limit (corrupt, or not a safetensors file)",
            header_len.unwrap_or(0)
        ),
        E::InvalidHeaderLength => format!(
            "header length {} runs past the end of the {len}-byte file (truncated, or corrupt)",
            header_len.unwrap_or(0)
        ),
        E::MetadataIncompleteBuffer => match header_json(buf) {
            Some((n, h)) => {
                let need = h
                    .values()
                    .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                    .max()
                    .unwrap_or(0);
                let have = len - 8 - n;
                let what = if (have as u64) < need {
                    "truncated"
                } else {
                    "trailing bytes after the last tensor"
                };
                format!("the header describes {need} bytes of tensor data but the file holds {have} ({what})")
            }
            None => e.to_string(),
        },
        E::TensorInvalidInfo => match header_json(buf).and_then(|(_, h)| inconsistent_tensor(&h)) {
            Some(name) => format!(
                "tensor '{name}': its data_offsets disagree with its shape and dtype (corrupt header)"
            ),
            None => e.to_string(),
        },
        E::InvalidOffset(name) => format!(
            "tensor '{name}': its data_offsets are not contiguous with the previous tensor's (corrupt header)"
        ),
        other => other.to_string(),
    }
}

/// The header's length and JSON object, when the header itself is readable.
pub(super) fn header_json(
    buf: &[u8],
) -> Option<(usize, serde_json::Map<String, serde_json::Value>)> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let h = serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((n, h))
}

/// The first tensor whose byte range does not match shape × dtype size.
pub(super) fn inconsistent_tensor(
    h: &serde_json::Map<String, serde_json::Value>,
) -> Option<String> {
    h.iter()
        .filter(|(name, _)| *name != "__metadata__")
        .find(|(_, t)| {
            let size = || -> Option<u64> {
                let dtype: safetensors::Dtype =
                    serde_json::from_value(t.get("dtype")?.clone()).ok()?;
                let numel = t
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .try_fold(1u64, |a, d| a.checked_mul(d.as_u64()?))?;
                numel.checked_mul(dtype.bitsize() as u64).map(|b| b / 8)
            };
            let off = t
                .get("data_offsets")
                .and_then(|o| Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?)));
            match (size(), off) {
                (Some(size), Some((a, b))) => b.checked_sub(a) != Some(size),
                _ => true,
            }
        })
        .map(|(name, _)| name.clone())
}
