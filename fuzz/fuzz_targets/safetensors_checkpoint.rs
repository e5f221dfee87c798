//! A safetensors checkpoint and its shard index, opened as `Checkpoint::open` opens a model
//! folder. The first byte picks the file the rest becomes: `model.safetensors`, or
//! `model.safetensors.index.json` beside a small valid shard. A checkpoint that opens is then
//! read, brought into 2 MiB pages through the page cache, copied into anonymous memory, and read
//! again: every tensor reads the same values from the copy as from the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_engine::weights::{page_cache, Checkpoint};

/// A valid one-tensor shard: `model.norm.weight`, F32, two values.
fn shard() -> Vec<u8> {
    let h = br#"{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend([0u8; 8]);
    b
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let d = tempfile::Builder::new()
        .prefix("lockstep-fuzz-st")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" })
        .unwrap();
    if mode % 2 == 0 {
        std::fs::write(d.path().join("model.safetensors"), rest).unwrap();
    } else {
        std::fs::write(d.path().join("model.safetensors.index.json"), rest).unwrap();
        std::fs::write(d.path().join("model-00001-of-00001.safetensors"), shard()).unwrap();
    }
    if let Ok(mut ck) = Checkpoint::open(d.path()) {
        let _ = ck.nonfinite_report();
        let before = ck.get("model.norm.weight", &[2]).map(|t| t.bytes().to_vec());
        for f in std::fs::read_dir(d.path()).unwrap() {
            let _ = page_cache::in_huge_pages(&f.unwrap().path());
        }
        ck.copy_to_huge_pages();
        let after = ck.get("model.norm.weight", &[2]).map(|t| t.bytes().to_vec());
        assert_eq!(before.ok(), after.ok(), "the copy changed a tensor");
    }
});
