//! Safetensors files read and written by hand (8-byte little-endian header length, JSON header,
//! data), and the config/weight/shard edits the damaged models are made with.

use serde_json::{json, Map, Value};
use std::path::Path;

/// One tensor of a safetensors file.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) dtype: String,
    pub(crate) shape: Vec<u64>,
    pub(crate) bytes: Vec<u8>,
}

/// Reads a safetensors file: its `__metadata__` (if any) and its tensors in file order.
pub(crate) fn read_st(path: &Path) -> (Option<Value>, Vec<Entry>) {
    let buf = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&buf[8..8 + n]).unwrap();
    let data = &buf[8 + n..];
    let mut meta = None;
    let mut entries = vec![];
    for (name, v) in header {
        if name == "__metadata__" {
            meta = Some(v);
            continue;
        }
        let off: Vec<usize> = v["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        entries.push((
            off[0],
            Entry {
                name,
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect(),
                bytes: data[off[0]..off[1]].to_vec(),
            },
        ));
    }
    entries.sort_by_key(|(o, _)| *o);
    (meta, entries.into_iter().map(|(_, e)| e).collect())
}

/// Writes a safetensors file (header padded with spaces to a multiple of 8, as the
/// `safetensors` library does).
pub(crate) fn write_st(path: &Path, meta: Option<&Value>, entries: &[Entry]) {
    let mut header = Map::new();
    if let Some(m) = meta {
        header.insert("__metadata__".into(), m.clone());
    }
    let mut data = vec![];
    for e in entries {
        let start = data.len();
        data.extend_from_slice(&e.bytes);
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut buf = (h.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(&h);
    buf.extend_from_slice(&data);
    std::fs::write(path, buf).unwrap();
}

/// Rewrites `model.safetensors` of `model` through `f`.
pub(crate) fn edit_weights(model: &Path, f: impl FnOnce(&mut Vec<Entry>)) {
    let p = model.join("model.safetensors");
    let (meta, mut entries) = read_st(&p);
    f(&mut entries);
    write_st(&p, meta.as_ref(), &entries);
}

/// Rewrites `config.json` of `model` through `f`.
pub(crate) fn edit_config(model: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let p = model.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Splits `model.safetensors` into two shards plus `model.safetensors.index.json`; returns the
/// shard names and which shard each tensor went to.
pub(crate) fn shard(model: &Path) -> (Vec<String>, Map<String, Value>) {
    let single = model.join("model.safetensors");
    let (meta, entries) = read_st(&single);
    std::fs::remove_file(&single).unwrap();
    let names = vec![
        "model-00001-of-00002.safetensors".to_string(),
        "model-00002-of-00002.safetensors".to_string(),
    ];
    let half = entries.len() / 2;
    let mut map = Map::new();
    for (i, part) in [&entries[..half], &entries[half..]].into_iter().enumerate() {
        write_st(&model.join(&names[i]), meta.as_ref(), part);
        for e in part {
            map.insert(e.name.clone(), Value::String(names[i].clone()));
        }
    }
    write_index(model, &map);
    (names, map)
}

pub(crate) fn write_index(model: &Path, map: &Map<String, Value>) {
    std::fs::write(
        model.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
}
