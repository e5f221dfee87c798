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
                let inner = crate::gguf::tokenizer(file)?;
                return Ok(Tokenizer::for_prompts(inner));
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
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
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
