//! A tokenizer.json loaded the way lockstep loads it (truncation and padding off) and used on a
//! prompt: an error or ids, never a panic or an allocation from the file's padding length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_engine::Tokenizer;

fuzz_target!(|data: &[u8]| {
    // The tokenizers crate reads from a path: one scratch folder per process, in memory.
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::Builder::new()
            .prefix("lockstep-fuzz-tok")
            .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" })
            .unwrap();
    }
    DIR.with(|d| {
        std::fs::write(d.path().join("tokenizer.json"), data).unwrap();
        if let Ok(t) = Tokenizer::from_dir(d.path()) {
            if let Ok(ids) = t.encode("Hello world, ünïcode 123!") {
                let _ = t.decode(&ids);
            }
        }
    });
});
