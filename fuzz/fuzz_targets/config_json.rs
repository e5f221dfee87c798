//! config.json and generation_config.json text: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_engine::generate::GenerationDefaults;
use lockstep_engine::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ModelConfig::from_json_str(text) {
        Ok(c) => {
            let _ = c.parameter_count();
            let _ = GenerationDefaults::from_json_str(text, &c);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!e.contains('\n') || e.contains("JSON"), "{e}")
        }
    }
});
