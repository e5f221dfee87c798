//! The engine's error type: every failure renders as one clear line.

use std::path::PathBuf;

/// Anything that can go wrong loading a checkpoint or running the model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A required file is missing from the model folder.
    #[error("{path}: not found ({what})")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What it was needed for.
        what: String,
    },
    /// config.json is not valid or asks for something unsupported.
    #[error("{path}: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// config.json or generation_config.json is not valid (a typed [`ConfigError`]).
    ///
    /// [`ConfigError`]: crate::config::ConfigError
    #[error("{path}: {source}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: crate::config::ConfigError,
    },
    /// A safetensors file is damaged (truncated, corrupt header, bad offsets).
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("checkpoint is missing tensor '{name}'")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with config.json.
    #[error("tensor '{name}' has shape {got:?} but config.json implies {want:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// Shape in the file.
        got: Vec<usize>,
        /// Shape the config implies.
        want: Vec<usize>,
    },
    /// A tensor is stored in a dtype the engine cannot read.
    #[error("tensor '{name}' has unsupported dtype {dtype} (supported: F32, BF16, F16, F64)")]
    TensorDtype {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad input to the model (token ids out of range, too long, empty).
    #[error("{0}")]
    Input(String),
    /// The model computed NaN or infinity where a finite value is needed (e.g. the logits a
    /// generation step chooses from); the message says where it first appears.
    #[error("{0}")]
    NonFinite(String),
    /// A sampling setting is out of range.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::InvalidSampling),
    /// Writing a trace failed.
    #[error(transparent)]
    Trace(#[from] lockstep_trace::TraceError),
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
