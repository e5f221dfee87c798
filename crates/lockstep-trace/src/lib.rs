//! The lockstep trace format: one safetensors file holding every intermediate tensor of one
//! forward pass, under canonical names in forward order (see `docs/trace-format.md`).
//!
//! Both sides write it: the PyTorch reference tracer (`reference/`) and the Rust engine. Any other
//! port (JAX, ...) that emits these names can be compared too.

pub mod names;
pub mod precision;
pub mod store;

use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

pub use names::{forward_rank, sort_forward, LayerTap, TapName};
pub use precision::{Dtype, Precision};
pub use store::{write_parts, Part, TraceStore};

/// Errors reading or writing a trace. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors trace: {msg}")]
    Format {
        /// The file concerned.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor has a dtype a trace cannot hold.
    #[error("{path}: tensor '{name}' has unsupported dtype {dtype}")]
    Dtype {
        /// The file concerned.
        path: String,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor's data does not match its shape.
    #[error("tensor '{name}': {len} values do not fill shape {shape:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Number of values given.
        len: usize,
        /// The declared shape.
        shape: Vec<usize>,
    },
}

/// Storage dtype of a traced tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceDtype {
    /// float64.
    F64,
    /// float32.
    F32,
    /// bfloat16 (traces from other producers may store it; lockstep writes f32 for bf16 runs).
    BF16,
    /// float16.
    F16,
    /// int64 (token ids).
    I64,
}

impl std::fmt::Display for TraceDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TraceDtype::F64 => "float64",
            TraceDtype::F32 => "float32",
            TraceDtype::BF16 => "bfloat16",
            TraceDtype::F16 => "float16",
            TraceDtype::I64 => "int64",
        })
    }
}

/// Values of one traced tensor, in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// float64 values.
    F64(Vec<f64>),
    /// float32 values.
    F32(Vec<f32>),
    /// bfloat16 values.
    BF16(Vec<half::bf16>),
    /// float16 values.
    F16(Vec<half::f16>),
    /// int64 values.
    I64(Vec<i64>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage dtype.
    pub fn dtype(&self) -> TraceDtype {
        match self {
            TensorData::F64(_) => TraceDtype::F64,
            TensorData::F32(_) => TraceDtype::F32,
            TensorData::BF16(_) => TraceDtype::BF16,
            TensorData::F16(_) => TraceDtype::F16,
            TensorData::I64(_) => TraceDtype::I64,
        }
    }

    /// All values widened to f64 (exact for every dtype but very large int64).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            TensorData::F64(v) => v.clone(),
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    fn to_le_bytes(&self) -> Vec<u8> {
        fn bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|&x| f(x)).collect()
        }
        match self {
            TensorData::F64(v) => bytes(v, f64::to_le_bytes),
            TensorData::F32(v) => bytes(v, f32::to_le_bytes),
            TensorData::BF16(v) => bytes(v, half::bf16::to_le_bytes),
            TensorData::F16(v) => bytes(v, half::f16::to_le_bytes),
            TensorData::I64(v) => bytes(v, i64::to_le_bytes),
        }
    }
}

/// One traced tensor: its shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceTensor {
    /// Shape, batch dimension included.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: TensorData,
}

/// A whole trace: tensors in forward order plus string metadata.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    tensors: Vec<(String, TraceTensor)>,
    /// Position of each name in `tensors` (a lookup must not scan millions of entries).
    index: std::collections::HashMap<String, usize>,
    /// The `__metadata__` map: producer, versions, dtype, model fingerprint, token ids...
    pub metadata: BTreeMap<String, String>,
}

impl Trace {
    /// An empty trace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor (replacing one of the same name). Fails if `data` does not fill `shape`.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<(), TraceError> {
        let name = name.into();
        // A zero dimension makes the product 0 whatever the others are; otherwise an overflow
        // can never match the data's length.
        let want = if shape.contains(&0) {
            Some(0)
        } else {
            shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
        };
        if want != Some(data.len()) {
            return Err(TraceError::Shape {
                name,
                len: data.len(),
                shape,
            });
        }
        let t = TraceTensor { shape, data };
        match self.index.get(&name) {
            Some(&i) => self.tensors[i].1 = t,
            None => {
                self.index.insert(name.clone(), self.tensors.len());
                self.tensors.push((name, t));
            }
        }
        Ok(())
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TraceTensor> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    /// Mutable access to a tensor by name.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut TraceTensor> {
        let i = *self.index.get(name)?;
        Some(&mut self.tensors[i].1)
    }

    /// Tensor names in forward order (canonical names first by position in the forward pass,
    /// then any others alphabetically).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
        sort_forward(&mut names);
        names
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the trace holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Serializes to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TraceError> {
        let fmt = |msg: String| TraceError::Format {
            path: "<memory>".into(),
            msg,
        };
        let owned: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let dt = match t.data.dtype() {
                    TraceDtype::F64 => safetensors::Dtype::F64,
                    TraceDtype::F32 => safetensors::Dtype::F32,
                    TraceDtype::BF16 => safetensors::Dtype::BF16,
                    TraceDtype::F16 => safetensors::Dtype::F16,
                    TraceDtype::I64 => safetensors::Dtype::I64,
                };
                (n.clone(), t.data.to_le_bytes(), dt, t.shape.clone())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
            .iter()
            .map(|(n, b, dt, s)| {
                safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| fmt(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let meta: std::collections::HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        safetensors::serialize(views, Some(meta)).map_err(|e| fmt(e.to_string()))
    }

    /// Writes the trace atomically: to a temporary file beside `path`, then renamed, so a
    /// failure never leaves a half-written trace.
    pub fn write(&self, path: &Path) -> Result<(), TraceError> {
        let bytes = self.to_bytes()?;
        let io = |source| TraceError::Io {
            path: path.display().to_string(),
            source,
        };
        write_atomic(path, &bytes).map_err(io)
    }

    /// Reads a trace from safetensors bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Self, TraceError> {
        let fmt = |msg: String| TraceError::Format {
            path: path.to_string(),
            msg,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| fmt(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| fmt(e.to_string()))?;
        let mut trace = Trace::new();
        if let Some(m) = meta.metadata() {
            trace.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        // Zero elements make zero bytes whatever the shape claims ([0, 2^60] is accepted by
        // safetensors); a tensor without values says nothing, and its shape must not size
        // anything downstream.
        let holds_no_values =
            |view: &safetensors::tensor::TensorView<'_>| view.shape().contains(&0);
        // Decoded in parallel, then checked and inserted in the file's order (the first error
        // in that order is the one reported).
        let views = st.tensors();
        let decoded: Vec<Option<Result<TensorData, TraceError>>> = views
            .par_iter()
            .map(|(name, view)| {
                (!holds_no_values(view))
                    .then(|| decode_tensor(path, name, &format!("{:?}", view.dtype()), view.data()))
            })
            .collect();
        for ((name, view), data) in views.into_iter().zip(decoded) {
            let Some(data) = data else {
                return Err(fmt(format!(
                    "tensor '{name}' has shape {:?}, which holds no values",
                    view.shape()
                )));
            };
            trace.insert(name, view.shape().to_vec(), data?)?;
        }
        Ok(trace)
    }

    /// Reads a trace file, or a trace folder whole (its parts together: [`store::TraceStore`]).
    /// A file's header is checked against its size before the file is read whole.
    pub fn read(path: &Path) -> Result<Self, TraceError> {
        if path.is_dir() {
            let store = store::TraceStore::open(path)?;
            return store.load(&store.names());
        }
        let shown = path.display().to_string();
        let io = |source| TraceError::Io {
            path: shown.clone(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        check_header(&mut f, &shown)?;
        // Decoded straight from the page cache: no copy of the file's bytes.
        let bytes = map_file(&f).map_err(io)?;
        Self::from_bytes(&bytes, &shown)
    }
}

/// The file's bytes, mapped read-only (traces are written atomically, by rename, so a mapped
/// file is never rewritten in place).
fn map_file(f: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is only read, and lives no longer than the read that made it; a trace
    // file is replaced by rename, never truncated or written in place by lockstep.
    unsafe { memmap2::Mmap::map(f) }
}

/// The values of a stored tensor: its little-endian `bytes` as safetensors' `dtype` (`F64`,
/// `F32`, `BF16`, `F16` or `I64`); `path` and `name` name it in errors.
fn decode_tensor(path: &str, name: &str, dtype: &str, b: &[u8]) -> Result<TensorData, TraceError> {
    Ok(match dtype {
        "F64" => TensorData::F64(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "F32" => TensorData::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "BF16" => TensorData::BF16(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        "F16" => TensorData::F16(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        "I64" => TensorData::I64(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        other => {
            return Err(TraceError::Dtype {
                path: path.to_string(),
                name: name.to_string(),
                dtype: other.to_string(),
            })
        }
    })
}

/// Largest safetensors header accepted (the format's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads a safetensors header from `f` and checks that the data it describes fills the file
/// exactly; leaves `f` at its start.
fn check_header(f: &mut std::fs::File, path: &str) -> Result<(), TraceError> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |source| TraceError::Io {
        path: path.to_string(),
        source,
    };
    let bad = |msg: String| TraceError::Format {
        path: path.to_string(),
        msg,
    };
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "{len} bytes is too short for a safetensors header (truncated?)"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > len.saturating_sub(8) {
        return Err(bad(format!(
            "its header claims {n} bytes but the file has {len} (truncated, or not a trace)"
        )));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&head)
        .map_err(|e| bad(format!("its header is not JSON ({e}); not a trace")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("its header is not a JSON object; not a trace".into()))?;
    let mut end = 0u64;
    for (k, t) in obj {
        if k == "__metadata__" {
            continue;
        }
        let off = t
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(format!("tensor '{k}' has no data_offsets")))?;
        end = end.max(off);
    }
    let want = 8 + n + end;
    if want != len {
        return Err(bad(format!(
            "its header describes {want} bytes but the file has {len} (truncated or corrupt)"
        )));
    }
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(())
}

/// Writes `bytes` to `path` atomically: into a new temporary file beside it (a random name,
/// created exclusively, so no symlink or other writer's file is followed), then renamed over
/// `path`. A failure or an interruption leaves at most a `.NAME.*.partial` file, never a
/// half-written `path`; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_keeps_values_shapes_and_metadata() {
        let mut t = Trace::new();
        t.insert(
            "logits",
            vec![1, 2, 2],
            TensorData::F64(vec![1.0, -2.5, 3.25, 1e-300]),
        )
        .unwrap();
        t.insert("tokens", vec![1, 2], TensorData::I64(vec![9707, 11]))
            .unwrap();
        t.insert("embed", vec![1, 2, 1], TensorData::F32(vec![0.5, -0.25]))
            .unwrap();
        t.metadata.insert("producer".into(), "test".into());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        t.write(&p).unwrap();
        let r = Trace::read(&p).unwrap();
        assert_eq!(r.names(), vec!["tokens", "embed", "logits"]);
        assert_eq!(r.get("logits"), t.get("logits"));
        assert_eq!(r.get("tokens"), t.get("tokens"));
        assert_eq!(r.metadata.get("producer").map(String::as_str), Some("test"));
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut t = Trace::new();
        assert!(t
            .insert("x", vec![2, 2], TensorData::F32(vec![1.0]))
            .is_err());
    }

    #[test]
    fn truncated_file_is_a_format_error() {
        let mut t = Trace::new();
        t.insert("x", vec![4], TensorData::F32(vec![1.0; 4]))
            .unwrap();
        let b = t.to_bytes().unwrap();
        let err = Trace::from_bytes(&b[..b.len() - 3], "x").unwrap_err();
        assert!(matches!(err, TraceError::Format { .. }), "{err}");
    }
}
