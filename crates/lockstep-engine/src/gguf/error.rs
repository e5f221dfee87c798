//! What can be wrong with a GGUF file, by class. Each renders as one line; the loader adds the
//! file's path.

/// A GGUF file's problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// The file ends before something it declares.
    #[error("truncated: {what} needs {need} bytes at offset {offset} but the file ends at {len}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Bytes it needs.
        need: u64,
        /// Where it starts.
        offset: usize,
        /// The file's length.
        len: usize,
    },
    /// The file is not GGUF at all (another format's first bytes).
    #[error("{0}")]
    NotGguf(String),
    /// A count, length or size beyond what lockstep accepts from a file (corrupt or hostile).
    #[error("{0}")]
    Limit(String),
    /// A well-formed file asking for something lockstep does not implement (a tensor type, an
    /// architecture, a tokenizer model).
    #[error("{0}")]
    Unsupported(String),
    /// Anything else inconsistent: bad magic, duplicate keys, shapes that disagree.
    #[error("{0}")]
    Corrupt(String),
}

impl From<String> for GgufError {
    fn from(msg: String) -> Self {
        GgufError::Corrupt(crate::config::json::one_line(&msg))
    }
}

impl From<&str> for GgufError {
    fn from(msg: &str) -> Self {
        GgufError::Corrupt(crate::config::json::one_line(msg))
    }
}
