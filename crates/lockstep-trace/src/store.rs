//! Traces on disk read a part at a time: one trace file, or a folder of part files (one per
//! decoder layer), so a 70B model's trace never has to sit in memory whole.
//!
//! A trace folder holds `part-NNNNN.safetensors` files, each a valid trace file with the same
//! `__metadata__`: part 0 the tensors before the first layer (`tokens`, `embed`), part `i + 1`
//! layer `i`'s taps, the last part everything after the layers (`final_norm`, `logits`). Read
//! together they are the single-file trace; [`TraceStore`] opens either form from its headers
//! alone and loads the tensors of one [`Part`] at a time.

use crate::{check_header, decode_tensor, map_file, TensorData, Trace, TraceError};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where a tensor belongs when a trace is split: before the layers, in layer `i`, or after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// `tokens`, `embed`.
    Before,
    /// `layers.{i}.*`.
    Layer(usize),
    /// `final_norm`, `logits` and any name that is not a layer's.
    After,
}

impl Part {
    /// The part of a tensor name (a name that is not canonical goes after the layers, where
    /// forward order puts it).
    pub fn of(name: &str) -> Part {
        match crate::TapName::parse(name) {
            Some(crate::TapName::Tokens | crate::TapName::Embed) => Part::Before,
            Some(crate::TapName::Layer(i, _)) => Part::Layer(i),
            _ => Part::After,
        }
    }
}

/// One tensor's place in a file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// A trace file or trace folder, opened from its headers; tensors are read on demand.
#[derive(Debug)]
pub struct TraceStore {
    path: PathBuf,
    files: Vec<PathBuf>,
    /// Header length + 8 of each file (where its data starts).
    data_start: Vec<u64>,
    entries: HashMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl TraceStore {
    /// Opens a trace file, or a folder of `*.safetensors` part files (read in name order; every
    /// part must carry the same metadata and no tensor may be in two parts).
    pub fn open(path: &Path) -> Result<TraceStore, TraceError> {
        let shown = path.display().to_string();
        let io = |source| TraceError::Io {
            path: shown.clone(),
            source,
        };
        let files = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            if v.is_empty() {
                return Err(TraceError::Format {
                    path: shown,
                    msg: "the folder holds no .safetensors part files".into(),
                });
            }
            v
        } else {
            vec![path.to_path_buf()]
        };
        let mut store = TraceStore {
            path: path.to_path_buf(),
            files: files.clone(),
            data_start: vec![],
            entries: HashMap::new(),
            metadata: BTreeMap::new(),
        };
        for (i, f) in files.iter().enumerate() {
            let (start, meta, tensors) = read_header(f)?;
            let fshown = f.display().to_string();
            if i == 0 {
                store.metadata = meta;
            } else if meta != store.metadata {
                return Err(TraceError::Format {
                    path: fshown,
                    msg: format!(
                        "its metadata differs from that of {} (parts of different traces?)",
                        files[0].display()
                    ),
                });
            }
            for (name, dtype, shape, begin, end) in tensors {
                if let Some(prev) = store.entries.get(&name) {
                    return Err(TraceError::Format {
                        path: fshown,
                        msg: format!("tensor '{name}' is also in {}", files[prev.file].display()),
                    });
                }
                let e = Entry {
                    file: i,
                    dtype,
                    shape,
                    begin,
                    end,
                };
                store.entries.insert(name, e);
            }
            store.data_start.push(start);
        }
        Ok(store)
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its files, in the order they are read: the trace file, or a folder's part files by name.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The trace's metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor name, in forward order.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        crate::sort_forward(&mut v);
        v
    }

    /// True when the trace holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The parts its tensors fall in, in forward order.
    pub fn parts(&self) -> Vec<Part> {
        let mut v: Vec<Part> = self.entries.keys().map(|n| Part::of(n)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// A trace of the named tensors (those it holds; others are skipped) and the metadata.
    pub fn load(&self, names: &[&str]) -> Result<Trace, TraceError> {
        let mut t = Trace::new();
        t.metadata = self.metadata.clone();
        let wanted: Vec<(&str, &Entry)> = names
            .iter()
            .filter_map(|&n| self.entries.get(n).map(|e| (n, e)))
            .collect();
        // Each file holding a wanted tensor, mapped once (the map is dropped, and its pages
        // leave the resident set, when this load returns).
        let mut maps: HashMap<usize, memmap2::Mmap> = HashMap::new();
        for (_, e) in &wanted {
            if maps.contains_key(&e.file) {
                continue;
            }
            let path = &self.files[e.file];
            let io = |source| TraceError::Io {
                path: path.display().to_string(),
                source,
            };
            let f = std::fs::File::open(path).map_err(io)?;
            maps.insert(e.file, map_file(&f).map_err(io)?);
        }
        let decoded: Vec<Result<TensorData, TraceError>> = wanted
            .par_iter()
            .map(|&(name, e)| {
                let shown = self.files[e.file].display().to_string();
                let map = &maps[&e.file];
                let start = self.data_start[e.file] + e.begin;
                let len = e.end - e.begin;
                let bytes = usize::try_from(start)
                    .ok()
                    .and_then(|s| map.get(s..s.checked_add(usize::try_from(len).ok()?)?))
                    .ok_or_else(|| TraceError::Io {
                        path: shown.clone(),
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    })?;
                decode_tensor(&shown, name, &e.dtype, bytes)
            })
            .collect();
        for ((name, e), data) in wanted.into_iter().zip(decoded) {
            t.insert(name, e.shape.clone(), data?)?;
        }
        Ok(t)
    }

    /// The tensors of one part (and the metadata).
    pub fn load_part(&self, part: Part) -> Result<Trace, TraceError> {
        let names: Vec<&str> = self
            .names()
            .into_iter()
            .filter(|n| Part::of(n) == part)
            .collect();
        self.load(&names)
    }
}

/// Writes `trace` as a trace folder (see the module docs): every part atomically, into `dir`
/// (created when missing; part files of an earlier trace there are removed first).
pub fn write_parts(trace: &Trace, dir: &Path) -> Result<(), TraceError> {
    let shown = dir.display().to_string();
    let io = |source| TraceError::Io {
        path: shown.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        let is_part = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("part-") && n.ends_with(".safetensors"));
        if is_part {
            std::fs::remove_file(&p).map_err(io)?;
        }
    }
    let mut parts: BTreeMap<Part, Trace> = BTreeMap::new();
    for name in trace.names() {
        let t = trace.get(name).expect("listed");
        let part = parts.entry(Part::of(name)).or_insert_with(|| Trace {
            metadata: trace.metadata.clone(),
            ..Trace::default()
        });
        part.insert(name, t.shape.clone(), t.data.clone())?;
    }
    for (i, part) in parts.values().enumerate() {
        part.write(&dir.join(format!("part-{i:05}.safetensors")))?;
    }
    Ok(())
}

/// A tensor listed in a header: name, dtype, shape, data offsets.
type HeaderTensor = (String, String, Vec<usize>, u64, u64);

/// A file's header: where its data starts, its metadata, its tensors.
type Header = (u64, BTreeMap<String, String>, Vec<HeaderTensor>);

/// A trace file's header, checked against the file's size: where the data starts, the
/// metadata, and every tensor.
fn read_header(path: &Path) -> Result<Header, TraceError> {
    let shown = path.display().to_string();
    let io = |source| TraceError::Io {
        path: shown.clone(),
        source,
    };
    let bad = |msg: String| TraceError::Format {
        path: shown.clone(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    check_header(&mut f, &shown)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    let v: serde_json::Value =
        serde_json::from_slice(&head).map_err(|e| bad(format!("its header is not JSON ({e})")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("its header is not a JSON object".into()))?;
    let mut meta = BTreeMap::new();
    let mut tensors = vec![];
    for (k, t) in obj {
        if k == "__metadata__" {
            let m = t
                .as_object()
                .ok_or_else(|| bad("its __metadata__ is not an object".into()))?;
            for (mk, mv) in m {
                let s = mv
                    .as_str()
                    .ok_or_else(|| bad(format!("metadata '{mk}' is not a string")))?;
                meta.insert(mk.clone(), s.to_string());
            }
            continue;
        }
        let dtype = t
            .get("dtype")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad(format!("tensor '{k}' has no dtype")))?
            .to_string();
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad(format!("tensor '{k}' has no valid shape")))?;
        let off = |i: usize| {
            t.get("data_offsets")
                .and_then(|o| o.get(i))
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| bad(format!("tensor '{k}' has no data_offsets")))
        };
        let (begin, end) = (off(0)?, off(1)?);
        if begin > end {
            return Err(bad(format!(
                "tensor '{k}' has data_offsets [{begin}, {end}]"
            )));
        }
        // As `Trace::from_bytes` checks them: a shape without values must not size anything
        // downstream, and the data must be exactly the shape's values in the dtype.
        if shape.contains(&0) {
            return Err(bad(format!(
                "tensor '{k}' has shape {shape:?}, which holds no values"
            )));
        }
        let size: u64 = match dtype.as_str() {
            "F64" | "I64" => 8,
            "F32" => 4,
            "BF16" | "F16" => 2,
            other => {
                return Err(TraceError::Dtype {
                    path: shown.clone(),
                    name: k.clone(),
                    dtype: other.to_string(),
                })
            }
        };
        let want = shape.iter().try_fold(size, |a, &d| a.checked_mul(d as u64));
        if want != Some(end - begin) {
            return Err(bad(format!(
                "tensor '{k}' has shape {shape:?} but {} bytes of {dtype}",
                end - begin
            )));
        }
        tensors.push((k.clone(), dtype, shape, begin, end));
    }
    Ok((8 + n, meta, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;

    fn sample() -> Trace {
        let mut t = Trace::new();
        t.metadata.insert("dtype".into(), "f32".into());
        t.insert("tokens", vec![1, 2], TensorData::I64(vec![5, 6]))
            .unwrap();
        t.insert(
            "embed",
            vec![1, 2, 2],
            TensorData::F32(vec![1., 2., 3., 4.]),
        )
        .unwrap();
        for i in 0..3 {
            let v = (0..4).map(|k| (i * 10 + k) as f64).collect();
            t.insert(format!("layers.{i}.out"), vec![1, 2, 2], TensorData::F64(v))
                .unwrap();
        }
        t.insert("logits", vec![1, 2, 1], TensorData::F32(vec![0.5, -0.5]))
            .unwrap();
        t
    }

    #[test]
    fn a_folder_reads_back_as_the_single_file_does() {
        let d = tempfile::tempdir().unwrap();
        let t = sample();
        let file = d.path().join("t.safetensors");
        t.write(&file).unwrap();
        let dir = d.path().join("parts");
        write_parts(&t, &dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 5);
        for p in [file, dir] {
            let s = TraceStore::open(&p).unwrap();
            assert_eq!(s.names(), t.names());
            assert_eq!(s.metadata(), &t.metadata);
            let want = vec![
                Part::Before,
                Part::Layer(0),
                Part::Layer(1),
                Part::Layer(2),
                Part::After,
            ];
            assert_eq!(s.parts(), want);
            let l1 = s.load_part(Part::Layer(1)).unwrap();
            assert_eq!(l1.names(), vec!["layers.1.out"]);
            assert_eq!(l1.get("layers.1.out"), t.get("layers.1.out"));
            let all = s.load(&t.names()).unwrap();
            let read = Trace::read(&p).unwrap();
            assert_eq!(read.names(), t.names());
            assert_eq!(read.metadata, t.metadata);
            for n in t.names() {
                assert_eq!(all.get(n), t.get(n), "{n}");
                assert_eq!(read.get(n), t.get(n), "{n}");
            }
        }
    }

    #[test]
    fn mismatched_or_duplicated_parts_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let t = sample();
        write_parts(&t, d.path()).unwrap();
        let mut other = Trace::new();
        other.metadata.insert("dtype".into(), "bf16".into());
        other
            .insert("logits2", vec![1], TensorData::F32(vec![1.0]))
            .unwrap();
        other
            .write(&d.path().join("part-99999.safetensors"))
            .unwrap();
        let e = TraceStore::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("metadata differs"), "{e}");
        let mut dup = Trace::new();
        dup.metadata = t.metadata.clone();
        dup.insert("embed", vec![1], TensorData::F32(vec![1.0]))
            .unwrap();
        dup.write(&d.path().join("part-99999.safetensors")).unwrap();
        let e = TraceStore::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("'embed' is also in"), "{e}");
        let zero = d.path().join("zero.safetensors");
        let head =
            br#"{"logits":{"dtype":"F32","shape":[0,1152921504606846976],"data_offsets":[0,0]}}"#;
        let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(head);
        std::fs::write(&zero, bytes).unwrap();
        let e = TraceStore::open(&zero).unwrap_err().to_string();
        assert!(e.contains("holds no values"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = TraceStore::open(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no .safetensors part files"), "{e}");
    }
}
