//! The weights a port computes with, against the checkpoint's tensors.
//!
//! A port's trace may carry, in its `weights_sha256` metadata (written by
//! `lockstep_reference.writer` from the parameter arrays the port was given), one record per
//! parameter: `{"dtype": "F32", "shape": [...], "sha256": "..."}`, where `sha256` is the hex sha256
//! of the array's values in **its own dtype** (`F64`, `F32`, `BF16` or `F16`, the safetensors
//! names), little-endian, C order. The checkpoint side is plain data: each tensor's stored dtype,
//! shape and raw little-endian bytes (this module knows nothing of the engine).
//!
//! Comparison, per parameter the port recorded:
//! - same dtype as stored: the port's hash must equal the sha256 of the stored bytes;
//! - wider than stored (e.g. an f32 port of bf16 weights, an f64 port of f32 weights): the stored
//!   values widened (exactly) to the port's dtype must hash the same, i.e. the port's array cast
//!   back to the stored dtype is exact and equal to the checkpoint;
//! - narrower than stored (e.g. bf16 weights of an f32 checkpoint): the stored values rounded to
//!   nearest even in the port's dtype (F64 via float32) must hash the same, and the port's dtype
//!   must be the trace's compute dtype (the rounding transformers does when it loads the weights in
//!   that dtype); otherwise the dtype difference is reported.
//!
//! `lm_head.weight` recorded by a port of a tied checkpoint (no such tensor stored) is compared
//! with `model.embed_tokens.weight`. Every stored tensor must be recorded (transformers' discarded
//! `rotary_emb.inv_freq` buffers excepted); a recorded name the checkpoint lacks is a problem.

use crate::report::Phase;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// The trace metadata key holding the port's per-parameter checksums.
pub const METADATA_KEY: &str = "weights_sha256";

/// A floating dtype a weight can be held in (safetensors names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightDtype {
    /// float64.
    F64,
    /// float32.
    F32,
    /// bfloat16.
    BF16,
    /// float16.
    F16,
}

impl WeightDtype {
    /// From a safetensors name (`F32`) or a numpy/torch/trace one (`float32`, `f32`, `bfloat16`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f64" | "float64" | "double" => WeightDtype::F64,
            "f32" | "float32" | "float" => WeightDtype::F32,
            "bf16" | "bfloat16" => WeightDtype::BF16,
            "f16" | "float16" | "half" => WeightDtype::F16,
            _ => return None,
        })
    }

    /// The safetensors name.
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F64 => "F64",
            WeightDtype::F32 => "F32",
            WeightDtype::BF16 => "BF16",
            WeightDtype::F16 => "F16",
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F64 => 8,
            WeightDtype::F32 => 4,
            WeightDtype::BF16 | WeightDtype::F16 => 2,
        }
    }

    /// True when every value of `self` is exactly a value of `to` (and `self != to`).
    pub fn widens_exactly_to(self, to: WeightDtype) -> bool {
        use WeightDtype::*;
        matches!(
            (self, to),
            (BF16, F32) | (BF16, F64) | (F16, F32) | (F16, F64) | (F32, F64)
        )
    }

    fn decode(self, b: &[u8]) -> f64 {
        match self {
            WeightDtype::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
            WeightDtype::F32 => f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            WeightDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            WeightDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        }
    }

    /// Little-endian bytes of `x` in this dtype: exact when `x` is a value of it; otherwise
    /// rounded to nearest even (to BF16/F16 from float32, as torch and ml_dtypes cast).
    fn encode(self, x: f64, out: &mut Vec<u8>) {
        match self {
            WeightDtype::F64 => out.extend(x.to_le_bytes()),
            WeightDtype::F32 => out.extend((x as f32).to_le_bytes()),
            WeightDtype::BF16 => out.extend(half::bf16::from_f32(x as f32).to_le_bytes()),
            WeightDtype::F16 => out.extend(half::f16::from_f32(x as f32).to_le_bytes()),
        }
    }
}

/// sha256 hex of the values `bytes` (little-endian `from`) converted to `to`: the bytes themselves
/// when `from == to`, exact widening, else rounding to nearest even (F64 → BF16/F16 via float32).
pub fn sha256_as(from: WeightDtype, bytes: &[u8], to: WeightDtype) -> String {
    let mut h = Sha256::new();
    if from == to {
        h.update(bytes);
    } else {
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in bytes.chunks(from.size() * 8192) {
            buf.clear();
            for v in chunk.chunks_exact(from.size()) {
                to.encode(from.decode(v), &mut buf);
            }
            h.update(&buf);
        }
    }
    h.finalize().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One parameter as the port holds it (a record of the `weights_sha256` metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortWeight {
    /// The dtype the port holds it in.
    pub dtype: WeightDtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// sha256 hex of its values in `dtype`, little-endian, C order.
    pub sha256: String,
}

/// Why recorded or stored weights cannot be compared. Each renders as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortWeightsError {
    /// The `weights_sha256` metadata is not JSON or misses a field.
    #[error("{METADATA_KEY} metadata {0}")]
    Metadata(String),
    /// A recorded entry is malformed.
    #[error("{METADATA_KEY}: {name}: {what}")]
    Entry {
        /// The parameter's name.
        name: String,
        /// What is wrong with its entry.
        what: String,
    },
    /// A checkpoint tensor has a dtype whose values cannot be hashed as weights.
    #[error("checkpoint tensor {name} has dtype {dtype}")]
    CheckpointDtype {
        /// The tensor.
        name: String,
        /// Its stored dtype.
        dtype: String,
    },
}

/// Parses the `weights_sha256` metadata: a JSON object name → `{"dtype", "shape", "sha256"}`.
pub fn parse_port_weights(text: &str) -> Result<BTreeMap<String, PortWeight>, PortWeightsError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| PortWeightsError::Metadata(format!("is not JSON ({e})")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| PortWeightsError::Metadata("is not a JSON object".into()))?;
    let mut out = BTreeMap::new();
    for (name, r) in obj {
        let bad = |what: &str| PortWeightsError::Entry {
            name: name.clone(),
            what: what.to_string(),
        };
        let dtype = r["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype"))
            .and_then(|d| {
                WeightDtype::parse(d)
                    .ok_or_else(|| bad(&format!("dtype {d:?} is not F64, F32, BF16 or F16")))
            })?;
        let shape = r["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| bad("bad shape"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sha256 = r["sha256"]
            .as_str()
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| bad("sha256 is not 64 hex digits"))?
            .to_ascii_lowercase();
        out.insert(
            name.clone(),
            PortWeight {
                dtype,
                shape,
                sha256,
            },
        );
    }
    Ok(out)
}

/// One checkpoint tensor, as plain data.
#[derive(Debug, Clone)]
pub struct CheckpointWeight<'a> {
    /// The stored dtype.
    pub dtype: WeightDtype,
    /// The stored shape.
    pub shape: Vec<usize>,
    /// The stored values, little-endian.
    pub bytes: &'a [u8],
}

/// The checkpoint's tensors, with their hashes in each dtype computed once when first needed.
pub struct CheckpointWeights<'a> {
    tensors: BTreeMap<String, CheckpointWeight<'a>>,
    memo: RefCell<HashMap<(String, WeightDtype), String>>,
}

impl<'a> CheckpointWeights<'a> {
    /// From `(name, stored dtype name, shape, bytes)`; a tensor of another dtype (e.g. an integer
    /// buffer) is an error naming it.
    pub fn new(
        tensors: impl IntoIterator<Item = (String, &'a str, Vec<usize>, &'a [u8])>,
    ) -> Result<Self, PortWeightsError> {
        let mut map = BTreeMap::new();
        for (name, dtype, shape, bytes) in tensors {
            let dtype =
                WeightDtype::parse(dtype).ok_or_else(|| PortWeightsError::CheckpointDtype {
                    name: name.clone(),
                    dtype: dtype.to_string(),
                })?;
            map.insert(
                name,
                CheckpointWeight {
                    dtype,
                    shape,
                    bytes,
                },
            );
        }
        Ok(CheckpointWeights {
            tensors: map,
            memo: RefCell::new(HashMap::new()),
        })
    }

    fn sha256_as(&self, name: &str, to: WeightDtype) -> String {
        let key = (name.to_string(), to);
        if let Some(h) = self.memo.borrow().get(&key) {
            return h.clone();
        }
        let t = &self.tensors[name];
        let h = sha256_as(t.dtype, t.bytes, to);
        self.memo.borrow_mut().insert(key, h.clone());
        h
    }
}

/// What checking one trace's recorded weights found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightsCheck {
    /// Parameters compared.
    pub compared: usize,
    /// Held in the stored dtype, bit-identical.
    pub identical: usize,
    /// Held in a wider dtype, exactly the stored values.
    pub widened: usize,
    /// Held in the compute dtype narrower than stored, exactly the stored values rounded to it.
    pub rounded: usize,
    /// `(parameter, what is wrong)`, in name order.
    pub problems: Vec<(String, String)>,
}

impl WeightsCheck {
    /// True when every parameter matched and nothing is missing.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.compared > 0
    }

    /// One line: counts, then the problems.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}/{} parameter(s) the port computes with are the checkpoint's ({} bit-identical, {} widened exactly, {} rounded to the compute dtype)",
            self.identical + self.widened + self.rounded,
            self.compared,
            self.identical,
            self.widened,
            self.rounded
        );
        if !self.problems.is_empty() {
            let _ = write!(
                s,
                "; {} problem(s): {}",
                self.problems.len(),
                self.problems
                    .iter()
                    .map(|(n, p)| format!("{n}: {p}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        s
    }
}

/// Checks the port's recorded parameters against the checkpoint. `compute`: the trace's compute
/// dtype (`F64`, `F32` or `BF16`), the one dtype narrower than stored a port may hold weights in.
pub fn check_port_weights(
    port: &BTreeMap<String, PortWeight>,
    checkpoint: &CheckpointWeights,
    compute: Option<WeightDtype>,
) -> WeightsCheck {
    let mut c = WeightsCheck::default();
    let tied = !checkpoint.tensors.contains_key("lm_head.weight")
        && checkpoint.tensors.contains_key("model.embed_tokens.weight");
    for (name, p) in port {
        let stored_name = if name == "lm_head.weight" && tied {
            "model.embed_tokens.weight"
        } else {
            name.as_str()
        };
        let Some(t) = checkpoint.tensors.get(stored_name) else {
            c.problems
                .push((name.clone(), "not in the checkpoint".into()));
            continue;
        };
        c.compared += 1;
        if p.shape != t.shape {
            c.problems.push((
                name.clone(),
                format!(
                    "shape {:?}, the checkpoint stores {:?} (transposed or reshaped?)",
                    p.shape, t.shape
                ),
            ));
            continue;
        }
        let want = checkpoint.sha256_as(stored_name, p.dtype);
        let same = want == p.sha256;
        let how = if p.dtype == t.dtype {
            "bit-identical"
        } else if t.dtype.widens_exactly_to(p.dtype) {
            "widened exactly"
        } else {
            "rounded"
        };
        if !same {
            let detail = match how {
                "bit-identical" => format!("values differ from the checkpoint's ({})", t.dtype.name()),
                "widened exactly" => format!(
                    "held in {}, stored in {}: values differ from the stored ones widened exactly (not the checkpoint's values)",
                    p.dtype.name(),
                    t.dtype.name()
                ),
                _ => format!(
                    "held in {}, stored in {}: values differ from the stored ones rounded to nearest even",
                    p.dtype.name(),
                    t.dtype.name()
                ),
            };
            c.problems.push((name.clone(), detail));
            continue;
        }
        match how {
            "bit-identical" => c.identical += 1,
            "widened exactly" => c.widened += 1,
            _ if compute == Some(p.dtype) => c.rounded += 1,
            _ => c.problems.push((
                name.clone(),
                format!(
                    "held in {}, narrower than the stored {} and not the trace's compute dtype{}: precision lost before any op runs",
                    p.dtype.name(),
                    t.dtype.name(),
                    compute.map_or(String::new(), |d| format!(" ({})", d.name()))
                ),
            )),
        }
    }
    for name in checkpoint.tensors.keys() {
        if !port.contains_key(name) && !name.ends_with(".rotary_emb.inv_freq") {
            c.problems.push((
                name.clone(),
                "not recorded by the port (give every parameter to the writer)".into(),
            ));
        }
    }
    c.problems.sort();
    c
}

/// The weights phase of `lockstep verify --port-trace` from the traces' recorded parameters:
/// `None` when no trace records `weights_sha256` (the caller falls back to the fingerprint).
/// `traces`: `(file, metadata)`; a trace without the key among ones with it is a problem.
pub fn weights_phase(
    checkpoint: &CheckpointWeights,
    traces: &[(String, &BTreeMap<String, String>)],
) -> Option<Phase> {
    let name = "weights";
    if !traces.iter().any(|(_, m)| m.contains_key(METADATA_KEY)) {
        return None;
    }
    let mut table = String::from("| trace | held in | result |\n|---|---|---|\n");
    let mut failed = vec![];
    let mut first = None;
    for (file, meta) in traces {
        let compute = meta.get("dtype").and_then(|d| WeightDtype::parse(d));
        let result = match meta.get(METADATA_KEY).map(|t| parse_port_weights(t)) {
            None => Err(format!(
                "no {METADATA_KEY}: the port's parameters were not given to the writer"
            )),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(p)) => {
                let held: Vec<&str> = {
                    let mut v: Vec<&str> = p.values().map(|w| w.dtype.name()).collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                };
                let c = check_port_weights(&p, checkpoint, compute);
                let _ = writeln!(table, "| {file} | {} | {} |", held.join(", "), c.summary());
                if first.is_none() {
                    first = Some(c.summary());
                }
                if c.passed() {
                    Ok(())
                } else {
                    Err(c.summary())
                }
            }
        };
        if let Err(e) = result {
            if !table.contains(&e) {
                let _ = writeln!(table, "| {file} | — | {e} |");
            }
            failed.push(format!("{file}: {e}"));
        }
    }
    let n = traces.len();
    Some(
        if failed.is_empty() {
            Phase::pass(name, format!("{n} trace(s): {}", first.unwrap_or_default()))
        } else {
            Phase::fail(
                name,
                format!(
                    "{} of {n} trace(s) computed with weights that are not the checkpoint's: {}",
                    failed.len(),
                    failed.join(" | ")
                ),
            )
        }
        .with_details(table),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn bf16s(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect()
    }
    fn f64s(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn sha(b: &[u8]) -> String {
        sha256_as(WeightDtype::F32, b, WeightDtype::F32)
    }
    fn rec(dtype: WeightDtype, shape: &[usize], bytes: &[u8]) -> PortWeight {
        PortWeight {
            dtype,
            shape: shape.to_vec(),
            sha256: sha(bytes),
        }
    }

    #[test]
    fn hashes_casts_as_numpy_does() {
        // sha256 of the empty input, and a known value: 1.0f32 little-endian.
        assert_eq!(
            sha(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let w = [1.0f32, -2.5, 0.1, 3.0e-5];
        // f32 → f64 is exact: the hash of the f64 array.
        let wide: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        assert_eq!(
            sha256_as(WeightDtype::F32, &f32s(&w), WeightDtype::F64),
            sha(&f64s(&wide))
        );
        // f32 → bf16 rounds to nearest even (0.1 is not a bf16 value).
        assert_eq!(
            sha256_as(WeightDtype::F32, &f32s(&w), WeightDtype::BF16),
            sha(&bf16s(&w))
        );
        // The writer's own hashes (lockstep_reference.writer.weight_checksums) of
        // [[0.1, 2.5], [3, 4]] as float32 held in bfloat16 and in float64.
        let x = f32s(&[0.1, 2.5, 3.0, 4.0]);
        assert_eq!(
            sha256_as(WeightDtype::F32, &x, WeightDtype::BF16),
            "4af4d0d32f5dd7e2d4faaf481d8a744c6b32f88635b13e80e56c5fd5485d1ccd"
        );
        assert_eq!(
            sha256_as(WeightDtype::F32, &x, WeightDtype::F64),
            "ca246287678378ced09c02be67de4cc7c1517d6a301a3825f0350aa9a2684972"
        );
        assert_eq!(
            sha(&x),
            "ed149e481dbdc1e156d804041b5b6494ee3ad597057febb681c85e08547900ba"
        );
        // bf16 → f32 → bf16 round trip.
        let b = bf16s(&w);
        let up: Vec<f32> = w
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(
            sha256_as(WeightDtype::BF16, &b, WeightDtype::F32),
            sha(&f32s(&up))
        );
        assert_eq!(
            sha256_as(WeightDtype::F32, &f32s(&up), WeightDtype::BF16),
            sha(&b)
        );
    }

    fn checkpoint<'a>(t: &'a [(&str, &str, Vec<usize>, Vec<u8>)]) -> CheckpointWeights<'a> {
        CheckpointWeights::new(
            t.iter()
                .map(|(n, d, s, b)| (n.to_string(), *d, s.clone(), b.as_slice())),
        )
        .unwrap()
    }

    #[test]
    fn same_widened_rounded_and_wrong_weights() {
        let a = [0.5f32, 0.1, -3.0, 7.25];
        let e = [1.0f32, 2.0];
        let bf = bf16s(&a);
        let bf_up: Vec<f32> = a
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        let store = [
            ("a", "F32", vec![2, 2], f32s(&a)),
            ("b", "BF16", vec![2, 2], bf.clone()),
            ("model.embed_tokens.weight", "F32", vec![2], f32s(&e)),
        ];
        let ck = checkpoint(&store);
        let wide: Vec<f64> = a.iter().map(|&x| x as f64).collect();
        let mut port = BTreeMap::new();
        port.insert(
            "a".to_string(),
            rec(WeightDtype::F64, &[2, 2], &f64s(&wide)),
        );
        port.insert(
            "b".to_string(),
            rec(WeightDtype::F32, &[2, 2], &f32s(&bf_up)),
        );
        port.insert(
            "model.embed_tokens.weight".to_string(),
            rec(WeightDtype::F32, &[2], &f32s(&e)),
        );
        // A tied checkpoint: the port's lm_head is the embedding.
        port.insert(
            "lm_head.weight".to_string(),
            rec(WeightDtype::F32, &[2], &f32s(&e)),
        );
        let c = check_port_weights(&port, &ck, Some(WeightDtype::F64));
        assert!(c.passed(), "{}", c.summary());
        assert_eq!(
            (c.compared, c.identical, c.widened, c.rounded),
            (4, 2, 2, 0)
        );

        // One value perturbed: that tensor, and only it, is named.
        let mut bad = port.clone();
        let mut wrong = wide.clone();
        wrong[1] += 1e-9;
        bad.insert("a".into(), rec(WeightDtype::F64, &[2, 2], &f64s(&wrong)));
        let c = check_port_weights(&bad, &ck, Some(WeightDtype::F64));
        assert!(!c.passed());
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert_eq!(c.problems[0].0, "a");
        assert!(
            c.problems[0].1.contains("widened exactly"),
            "{:?}",
            c.problems
        );

        // f32 weights rounded to bf16: fine in a bf16 trace, a problem in an f32 one.
        let mut r = port.clone();
        r.insert("a".into(), rec(WeightDtype::BF16, &[2, 2], &bf16s(&a)));
        r.remove("b");
        r.insert("b".into(), rec(WeightDtype::BF16, &[2, 2], &bf));
        let c = check_port_weights(&r, &ck, Some(WeightDtype::BF16));
        assert!(c.passed(), "{}", c.summary());
        assert_eq!(c.rounded, 1);
        let c = check_port_weights(&r, &ck, Some(WeightDtype::F32));
        assert_eq!(c.problems.len(), 1);
        assert!(
            c.problems[0].1.contains("narrower than the stored F32"),
            "{:?}",
            c.problems
        );

        // Transposed, unknown and unrecorded tensors.
        let mut t = port.clone();
        t.insert("a".into(), rec(WeightDtype::F64, &[4, 1], &f64s(&wide)));
        t.insert("c".into(), rec(WeightDtype::F32, &[1], &f32s(&[1.0])));
        t.remove("b");
        let c = check_port_weights(&t, &ck, None);
        let names: Vec<&str> = c.problems.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "{:?}", c.problems);
        assert!(c.summary().contains("shape [4, 1]"));
        assert!(c.summary().contains("not recorded by the port"));
        assert!(c.summary().contains("not in the checkpoint"));
    }

    #[test]
    fn metadata_parses_and_bad_records_are_named() {
        let good = format!(
            r#"{{"a": {{"dtype": "F32", "shape": [2, 3], "sha256": "{}"}}}}"#,
            "AB".repeat(32)
        );
        let p = parse_port_weights(&good).unwrap();
        assert_eq!(p["a"].dtype, WeightDtype::F32);
        assert_eq!(p["a"].shape, [2, 3]);
        assert_eq!(p["a"].sha256, "ab".repeat(32));
        for (text, needle) in [
            ("[1]", "not a JSON object"),
            ("{", "not JSON"),
            (
                r#"{"a": {"dtype": "I8", "shape": [], "sha256": ""}}"#,
                "a: dtype \"I8\"",
            ),
            (
                r#"{"a": {"dtype": "F32", "shape": [1], "sha256": "xyz"}}"#,
                "64 hex",
            ),
            (r#"{"a": {"dtype": "F32", "sha256": "xyz"}}"#, "no shape"),
        ] {
            let e = parse_port_weights(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn phase_passes_fails_or_defers_to_the_fingerprint() {
        let a = [0.5f32, 0.25];
        let store = [("a", "F32", vec![2], f32s(&a))];
        let ck = checkpoint(&store);
        let record = |v: &[f32]| {
            format!(
                r#"{{"a": {{"dtype": "F32", "shape": [2], "sha256": "{}"}}}}"#,
                sha(&f32s(v))
            )
        };
        let meta = |sums: Option<String>| {
            let mut m = BTreeMap::new();
            m.insert("dtype".to_string(), "f32".to_string());
            if let Some(s) = sums {
                m.insert(METADATA_KEY.to_string(), s);
            }
            m
        };
        let none = meta(None);
        assert!(weights_phase(&ck, &[("x".into(), &none)]).is_none());
        let good = meta(Some(record(&a)));
        let p = weights_phase(&ck, &[("good".into(), &good)]).unwrap();
        assert_eq!(p.status, crate::report::PhaseStatus::Pass, "{}", p.summary);
        let bad = meta(Some(record(&[0.5, 0.3])));
        let p = weights_phase(&ck, &[("good".into(), &good), ("bad".into(), &bad)]).unwrap();
        assert_eq!(p.status, crate::report::PhaseStatus::Fail);
        assert!(
            p.summary.contains("bad: ") && p.summary.contains("a: values differ"),
            "{}",
            p.summary
        );
        // A trace without checksums next to one with them is not waved through.
        let p = weights_phase(&ck, &[("good".into(), &good), ("x".into(), &none)]).unwrap();
        assert_eq!(p.status, crate::report::PhaseStatus::Fail);
        assert!(p.summary.contains("x: no weights_sha256"), "{}", p.summary);
    }
}
