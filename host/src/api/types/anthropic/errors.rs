//! Anthropic's error shape.
use poem_openapi::{Enum, Object};

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorBody")]
pub struct ErrorBody {
    /// invalid_request_error, authentication_error, not_found_error,
    /// request_too_large, rate_limit_error, api_error, overloaded_error
    #[oai(rename = "type")]
    pub r#type: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "AnthropicErrorType")]
pub enum ErrorType {
    Error,
}

/// Anthropic's error shape.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorResponse")]
pub struct ErrorResponse {
    #[oai(rename = "type")]
    pub r#type: ErrorType,
    pub error: ErrorBody,
}
