//! Errors: the OpenAI-style JSON error of a request, and the one-line error of a server that
//! cannot start.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A request's error, answered as OpenAI answers one:
/// `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, one line.
    pub message: String,
    /// `invalid_request_error`, `not_found_error` or `server_error`.
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if any (`model_not_found`, `unsupported_parameter`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about the field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some("invalid_value"),
        }
    }

    /// A 400 for a field lockstep does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid(param, message)
        }
    }

    /// A 400 about the request as a whole (no single field).
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            param: None,
            code: None,
            ..ApiError::invalid("", message)
        }
    }

    /// A 404: no such model or route.
    pub fn not_found(message: impl Into<String>, code: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code,
        }
    }

    /// A 500: the engine failed (e.g. non-finite logits).
    pub fn server(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model, its tokenizer or its generation settings could not be loaded.
    #[error(transparent)]
    Engine(#[from] lockstep_engine::EngineError),
    /// The address could not be bound or served.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Input(String),
}
