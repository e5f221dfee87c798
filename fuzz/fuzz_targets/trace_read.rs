//! A trace (safetensors bytes): errors, never panics or allocations sized by a lying header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_trace::Trace;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Trace::from_bytes(data, "fuzz") {
        for name in t.names() {
            let x = t.get(name).expect("listed");
            assert_eq!(x.shape.iter().product::<usize>(), x.data.len());
        }
    }
});
