//! A GGUF file's header and tensor table, and everything derived from its metadata (the config,
//! the tokenizer, the tokenizer config): errors, never panics or unbounded allocations.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_engine::gguf;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = gguf::Header::parse(data) else {
        return;
    };
    if let Ok(json) = gguf::config_json(&h, data) {
        if let Ok(c) = lockstep_engine::ModelConfig::from_json_str(&json) {
            for t in &h.tensors {
                if let Some(name) = gguf::hf_name(&t.name) {
                    let _ = gguf::expected_shape(&name, &c);
                }
            }
        }
    }
    let _ = gguf::tokenizer_json(&h);
    let _ = gguf::tokenizer_config(&h);
    for t in &h.tensors {
        let _ = t.nbytes();
    }
});
