//! OpenAI's error shape.
use poem_openapi::Object;

#[derive(Debug, Clone, Object)]
pub struct ErrorDetail {
    pub message: String,
    /// invalid_request_error, authentication_error, not_found_error,
    /// rate_limit_error, server_error ...
    #[oai(rename = "type")]
    pub r#type: String,
    /// The request field at fault.
    #[oai(nullable)]
    pub param: Option<String>,
    #[oai(nullable)]
    pub code: Option<String>,
}

/// OpenAI's error shape.
#[derive(Debug, Clone, Object)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}
