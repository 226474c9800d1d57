//! Errors as they travel on the wire (broker and agent HTTP APIs): a stable code for
//! scripts, a message for people, and the field that was wrong when there is one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable, machine-readable error kinds. Each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request or spec is malformed or names an impossible value (400).
    InvalidInput,
    /// A bearer token is missing or wrong (401).
    Unauthorized,
    /// The caller may not do this (403).
    Forbidden,
    /// The named workload, node, image or migration does not exist (404).
    NotFound,
    /// The request conflicts with current state, e.g. the name is taken (409).
    Conflict,
    /// The move or placement is impossible for the nodes involved (422).
    Incompatible,
    /// A daemon or node needed for the request is unreachable (503).
    Unavailable,
    /// A bug or an unexpected failure on our side (500).
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidInput => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Incompatible => 422,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// The JSON body of every error answer: `{"code": "...", "message": "...", "field": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Dotted path of the offending field (`resources.memory`), when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Line of the offending field in the submitted document, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), field: None, line: None }
    }
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field {field}")?;
            if let Some(line) = self.line {
                write!(f, ", line {line}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl From<crate::SpecError> for ApiError {
    fn from(e: crate::SpecError) -> Self {
        let first = e.errors.first();
        ApiError {
            code: ErrorCode::InvalidInput,
            message: e.to_string(),
            field: first.map(|f| f.field.clone()).filter(|f| !f.is_empty()),
            line: first.and_then(|f| f.line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape_is_stable() {
        let e = ApiError::new(ErrorCode::NotFound, "no workload named \"x\"").with_field("name");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "not_found", "message": "no workload named \"x\"", "field": "name"})
        );
        assert_eq!(e.code.http_status(), 404);
    }
}
