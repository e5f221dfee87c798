//! The tokenizer, chat template and special tokens a GGUF's metadata describes.

use super::error::GgufError;
use super::header::{Header, Value};
use super::read;
use crate::error::{EngineError, Result};
use std::path::Path;

/// Split patterns `transformers` puts before the byte-level step, by `tokenizer.ggml.pre`
/// (its `GGUF_PRE_TOKENIZER_SPLITS`); any other value keeps GPT-2's own byte-level regex.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's reversible byte-to-character map (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("BMP")
        };
    }
    map
}

/// The `tokenizer.json` text of the byte-level BPE tokenizer a GGUF's metadata describes
/// (`tokenizer.ggml.model = "gpt2"`), built as `transformers` builds it
/// (`integrations/gguf/gguf_tokenizer_mapping.py`): vocabulary spelled in GPT-2's byte alphabet,
/// the file's merges, control tokens (type 3) as special added tokens and user-defined ones
/// (type 4) as plain added tokens, the split regex its `tokenizer.ggml.pre` calls for, and a BOS
/// prepended only when `tokenizer.ggml.add_bos_token` says so.
pub fn tokenizer_json(h: &Header) -> std::result::Result<String, GgufError> {
    use serde_json::{json, Map, Value as J};
    let model = h
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or("no tokenizer in its metadata (tokenizer.ggml.model)")?;
    if model != "gpt2" {
        return Err(GgufError::from(format!(
            "its tokenizer is '{model}'; lockstep builds only byte-level BPE ('gpt2') tokenizers from GGUF metadata"
        )));
    }
    let strings = |key: &str| -> std::result::Result<Vec<&str>, GgufError> {
        h.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| GgufError::from(format!("no {key} in its metadata")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| GgufError::from(format!("{key} holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = h
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as i64).collect())
        .unwrap_or_default();
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        let spelled: String = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(spelled, id.into());
    }
    let merges: Vec<J> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect();
    let added = |id: usize, t: &str, special: bool| {
        json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": special})
    };
    let mut added_tokens = vec![];
    for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if *ty == 3 && in_alphabet(t) {
            added_tokens.push(added(id, t, true));
        }
    }
    for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if *ty == 4 && vocab.contains_key(*t) {
            added_tokens.push(added(id, t, false));
        }
    }
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre_tokenizer_split(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        None => byte_level(true),
    };
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let add_bos = h.get("tokenizer.ggml.add_bos_token") == Some(&Value::Bool(true));
    let bos = h
        .get("tokenizer.ggml.bos_token_id")
        .and_then(Value::as_u64)
        .and_then(|i| Some((i, *tokens.get(i as usize)?)));
    let post_processor = match (add_bos, bos) {
        (true, Some((id, t))) => {
            let special = |type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
            json!({"type": "TemplateProcessing",
                   "single": [special(0), seq("A", 0)],
                   "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                   "special_tokens": {t: {"id": t, "ids": [id], "tokens": [t]}}})
        }
        _ => json!({"type": "TemplateProcessing", "single": [seq("A", 0)],
                    "pair": [seq("A", 0), seq("B", 1)], "special_tokens": {}}),
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Ok(tj.to_string())
}

/// The tokenizer of a GGUF checkpoint: `tokenizer.json` beside the file when there is one (it
/// wins), else the one its metadata describes ([`tokenizer_json`]).
pub fn tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let beside = path
        .parent()
        .unwrap_or(Path::new("."))
        .join("tokenizer.json");
    if beside.exists() {
        return tokenizers::Tokenizer::from_file(&beside)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", beside.display())));
    }
    let (_, h) = read(path)?;
    let json = tokenizer_json(&h).map_err(|m| {
        EngineError::Tokenizer(format!(
            "{}: no tokenizer.json beside it, and {m}",
            path.display()
        ))
    })?;
    json.parse::<tokenizers::Tokenizer>()
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
}

/// The chat template a GGUF carries (`tokenizer.chat_template`), if any.
pub fn chat_template(h: &Header) -> Option<&str> {
    h.get("tokenizer.chat_template").and_then(Value::as_str)
}

/// The `tokenizer_config.json` content `transformers` derives from a GGUF's metadata: its
/// `chat_template` and the text of its special tokens (`bos_token`, `eos_token`, `unk_token`,
/// `pad_token` from the `tokenizer.ggml.*_token_id` ids), for code that reads a model folder's
/// tokenizer_config.json (chat templates) to read from a GGUF instead.
pub fn tokenizer_config(h: &Header) -> serde_json::Value {
    let mut cfg = serde_json::Map::new();
    if let Some(t) = chat_template(h) {
        cfg.insert("chat_template".into(), t.into());
    }
    let tokens = h.get("tokenizer.ggml.tokens").and_then(Value::as_array);
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        let text = h
            .get(&format!("tokenizer.ggml.{key}"))
            .and_then(Value::as_u64)
            .and_then(|id| tokens?.get(id as usize)?.as_str());
        if let Some(t) = text {
            cfg.insert(name.into(), t.into());
        }
    }
    serde_json::Value::Object(cfg)
}
