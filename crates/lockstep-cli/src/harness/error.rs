//! What can go wrong while driving the implementations, by side: the user's input, the Python
//! reference, lockstep's engine, the file system. The CLI turns each into its exit code: 2 for the
//! user's input (and environment), 3 when the reference failed.

use lockstep_verify::PolicyError;

/// An error of the harness, saying which side failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The input is unusable: model, prompts, port traces, options.
    #[error("{0}")]
    BadInput(String),
    /// The Python reference (transformers) failed or answered something unexpected.
    #[error("the reference (transformers) failed: {0}")]
    Reference(String),
    /// lockstep's engine refused the model or the input.
    #[error(transparent)]
    Engine(#[from] lockstep_engine::EngineError),
    /// A port's trace cannot be read or says too little to be judged.
    #[error(transparent)]
    PortTrace(#[from] lockstep_verify::PortTraceError),
    /// Two traces cannot be judged together (dtype metadata, oracle).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A file or folder could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl HarnessError {
    /// A failure of the Python reference.
    pub fn reference(msg: impl Into<String>) -> Self {
        HarnessError::Reference(msg.into())
    }

    /// Unusable input.
    pub fn input(msg: impl Into<String>) -> Self {
        HarnessError::BadInput(msg.into())
    }

    /// A file-system failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias of the harness.
pub type HarnessResult<T> = Result<T, HarnessError>;
