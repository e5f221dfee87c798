//! A hostile chat template rendered over a short conversation: an error or text, within the
//! fuel, recursion and output limits; never a panic, a hang or a stack overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_engine::chat::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let mut special = serde_json::Map::new();
    special.insert("bos_token".into(), "<s>".into());
    let t = ChatTemplate::new(src, special);
    let msgs = [Message::new("system", "be brief"), Message::new("user", "hi")];
    let _ = t.render(&msgs, true, None);
});
