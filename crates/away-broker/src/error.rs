//! Errors: [`BrokerError`] for starting the broker, [`Problem`] for answering requests
//! (an `away_model::ApiError` body with its status code, plus optional detail such as
//! the full placement explanation of a 422).

use away_model::{ApiError, ErrorCode};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serve http")]
    Serve(#[source] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct Problem {
    pub error: ApiError,
    /// Extra top-level key of the body (`placement`, `compatibility`, …).
    pub detail: Option<(&'static str, serde_json::Value)>,
}

impl Problem {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Problem {
        Problem { error: ApiError::new(code, message), detail: None }
    }
    pub fn field(mut self, field: impl Into<String>) -> Problem {
        self.error.field = Some(field.into());
        self
    }
    pub fn detail(mut self, key: &'static str, value: impl serde::Serialize) -> Problem {
        self.detail = serde_json::to_value(value).ok().map(|v| (key, v));
        self
    }
    pub fn invalid(message: impl Into<String>) -> Problem {
        Problem::new(ErrorCode::InvalidInput, message)
    }
    pub fn not_found(message: impl Into<String>) -> Problem {
        Problem::new(ErrorCode::NotFound, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Problem {
        Problem::new(ErrorCode::Unauthorized, message)
    }
    pub fn internal(message: impl Into<String>) -> Problem {
        Problem::new(ErrorCode::Internal, message)
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Problem {
        let e = away_model::error_chain(&e);
        tracing::error!("{e}");
        Problem::internal(format!("the broker could not save its state: {e}"))
    }
}

impl From<ApiError> for Problem {
    fn from(error: ApiError) -> Problem {
        Problem { error, detail: None }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = serde_json::to_value(&self.error).unwrap_or_default();
        if let (Some((key, value)), Some(obj)) = (self.detail, body.as_object_mut()) {
            obj.insert(key.to_string(), value);
        }
        (status, Json(body)).into_response()
    }
}
