//! The CLI's error: one line on stderr and an exit code (1 is a failed verification, not an
//! error): 2 for bad input or environment, [`REFERENCE_FAILED`] when the Python reference failed.

use crate::harness::HarnessError;
use std::fmt;

/// Exit code of a run whose Python reference (transformers) failed: not the user's input.
pub const REFERENCE_FAILED: u8 = 3;

/// An error the CLI reports and exits with.
#[derive(Debug)]
pub struct CliError {
    msg: String,
    code: u8,
}

impl CliError {
    /// Bad input or environment (exit 2).
    pub fn input(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: 2,
        }
    }

    /// The Python reference failed (exit [`REFERENCE_FAILED`]).
    pub fn reference(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: REFERENCE_FAILED,
        }
    }

    /// The model computed something wrong, e.g. non-finite logits (exit 1, like a failed
    /// comparison).
    pub fn failure(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: 1,
        }
    }

    /// The exit code.
    pub fn exit_code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Always one line.
        f.write_str(&self.msg.replace('\n', " "))
    }
}

impl From<lockstep_engine::EngineError> for CliError {
    fn from(e: lockstep_engine::EngineError) -> Self {
        match e {
            lockstep_engine::EngineError::NonFinite(_) => CliError::failure(e.to_string()),
            e => CliError::input(e.to_string()),
        }
    }
}

impl From<HarnessError> for CliError {
    fn from(e: HarnessError) -> Self {
        match e {
            HarnessError::Reference(_) => CliError::reference(e.to_string()),
            e => CliError::input(e.to_string()),
        }
    }
}

impl From<lockstep_trace::TraceError> for CliError {
    fn from(e: lockstep_trace::TraceError) -> Self {
        CliError::input(e.to_string())
    }
}

/// Result alias for commands.
pub type CliResult<T> = Result<T, CliError>;
