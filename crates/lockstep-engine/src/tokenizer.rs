//! The checkpoint's `tokenizer.json`, through Hugging Face's own `tokenizers` crate.

use crate::error::{EngineError, Result};
use std::path::Path;

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model folder. For a GGUF checkpoint (a `.gguf` file, or a
    /// folder holding one and no safetensors): the `tokenizer.json` beside it, else the tokenizer
    /// its metadata describes ([`crate::gguf::tokenizer`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_source(&crate::source::ModelSource::resolve(dir)?)
    }

    /// [`Self::from_dir`] for a resolved source.
    pub fn from_source(source: &crate::source::ModelSource) -> Result<Self> {
        let dir = match source {
            crate::source::ModelSource::Gguf { file, .. } => {
                let inner = crate::gguf::tokenizer(file);
                crate::allocator::release_freed_heap();
                return Ok(Tokenizer::for_prompts(inner?));
            }
            crate::source::ModelSource::Folder(dir) => dir.as_path(),
        };
        if !dir.is_dir() {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                what: "the model folder".into(),
            });
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::MissingFile {
                path,
                what: "the model's tokenizer".into(),
            });
        }
        let bad = |msg: String| EngineError::Tokenizer(format!("{}: {msg}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        // The tokenizers crate panics (`expect("Helper")`) on some files that are not JSON, so
        // the text is checked as JSON first (found by fuzzing tokenizer_json); a panic left in
        // its parser is still an error, not a crash.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let parsed = without_panic_output(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| bad("the tokenizers library could not read it (it panicked)".into()))?;
        let inner = parsed.map_err(|e| bad(crate::config::json::one_line(&e.to_string())))?;
        Ok(Tokenizer::for_prompts(inner))
    }

    /// Turns off the file's `truncation` and `padding`, as `transformers` does whenever it
    /// encodes a prompt (`set_truncation_and_padding` with `DO_NOT_TRUNCATE` / `DO_NOT_PAD`): a
    /// file asking for `max_length 8` must not cut prompts, a stride at or beyond the length must
    /// not reach the crate's assertion, and `Fixed` padding of 2^40 must not become an allocation.
    fn for_prompts(mut inner: tokenizers::Tokenizer) -> Self {
        inner.with_padding(None);
        // Removing truncation cannot fail (only a stride check on new parameters can).
        let _ = inner.with_truncation(None);
        Tokenizer { inner }
    }

    /// Token ids of `text`, without adding special tokens (what `transformers` gives with
    /// `add_special_tokens=False`; Qwen2 adds none by default anyway).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Runs `f`, turning a panic into `Err` without the panic message on stderr (the error the caller
/// makes of it is the one line). The panic hook is process-wide: this is for loading, which
/// happens before any other thread uses the tokenizer (the tokenizers crate panics on some
/// malformed files: found by fuzzing, e.g. a BPE `continuing_subword_prefix` longer than a token).
fn without_panic_output<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz/ tokenizer_json): tokenizer.json files that are not JSON inside
    /// `decoder` made the tokenizers crate panic (`expect("Helper")`); they are one-line errors.
    #[test]
    fn a_tokenizer_file_that_is_not_json_is_an_error_not_a_panic() {
        for data in [
            &include_bytes!("testdata/tokenizer-decoder-not-json.json")[..],
            &include_bytes!("testdata/tokenizer-decoder-not-json-2.json")[..],
        ] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("tokenizer.json"), data).unwrap();
            let e = Tokenizer::from_dir(d.path())
                .err()
                .expect("an error")
                .to_string();
            assert!(e.contains("not valid JSON") && !e.contains('\n'), "{e}");
        }
    }

    /// Found by fuzzing: a BPE whose `continuing_subword_prefix` is longer than its tokens makes
    /// the tokenizers crate panic while loading (a string index out of bounds); an error instead.
    #[test]
    fn a_tokenizer_the_library_panics_on_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("tokenizer.json"),
            include_bytes!("testdata/tokenizer-bpe-prefix-longer-than-token.json"),
        )
        .unwrap();
        let e = Tokenizer::from_dir(d.path())
            .err()
            .expect("an error")
            .to_string();
        assert!(e.contains("panicked") && !e.contains('\n'), "{e}");
    }
}
