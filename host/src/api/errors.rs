//! Errors in each API's own shape and status. Every failure inside a route is
//! an [`ApiError`]; failures before a route runs (a body that does not parse,
//! a body too large, an unknown path) are reshaped by [`render`] according to
//! the path's API.
use super::types::{anthropic, openai, BodyError, Flavor};
use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::{
    registry::{MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::{ToJSON, Type},
    ApiResponse,
};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A short machine-readable code (OpenAI's `code`).
    pub code: Option<&'static str>,
    pub flavor: Flavor,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None, flavor: Flavor::OpenAI }
    }
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn model_not_found(id: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, format!("The model `{id}` does not exist (see GET /v1/models)"))
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn flavor(mut self, f: Flavor) -> Self {
        self.flavor = f;
        self
    }

    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 | 503 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    pub fn openai_body(&self) -> openai::ErrorResponse {
        openai::ErrorResponse {
            error: openai::ErrorDetail {
                message: self.message.clone(),
                r#type: self.openai_type().into(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }

    /// Anthropic's shape has no `param`: the message names the field.
    fn anthropic_message(&self) -> String {
        match &self.param {
            Some(p) if !self.message.contains(p.as_str()) => format!("{} (field `{p}`)", self.message),
            _ => self.message.clone(),
        }
    }

    pub fn anthropic_body(&self) -> anthropic::ErrorResponse {
        anthropic::ErrorResponse {
            r#type: anthropic::ErrorType::Error,
            error: anthropic::ErrorBody { r#type: self.anthropic_type().into(), message: self.anthropic_message() },
        }
    }

    pub fn json(&self) -> serde_json::Value {
        match self.flavor {
            Flavor::OpenAI => self.openai_body().to_json(),
            Flavor::Anthropic => self.anthropic_body().to_json(),
        }
        .unwrap_or_default()
    }
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn as_response(&self) -> Response {
        let mut r = poem::web::Json(self.json()).into_response();
        r.set_status(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert("www-authenticate", "Bearer".parse().unwrap());
        }
        r
    }
}

/// Any error that reached the edge, as `flavor`'s error shape.
pub fn render(err: poem::Error, flavor: Flavor) -> Response {
    if let Some(e) = err.downcast_ref::<ApiError>() {
        return poem::error::ResponseError::as_response(&e.clone().flavor(flavor));
    }
    let status = err.status();
    let mut e = ApiError::new(status, err.to_string()).flavor(flavor);
    if let Some(b) = err.downcast_ref::<BodyError>() {
        e.param = b.param.clone();
        e.message = b.message.clone();
    } else if status == StatusCode::PAYLOAD_TOO_LARGE {
        e.message = "the request body is too large (see --max-body-bytes)".into();
    } else if status == StatusCode::NOT_FOUND {
        e.message = "no such route".into();
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        e.message = "method not allowed on this route".into();
    }
    poem::error::ResponseError::as_response(&e)
}

macro_rules! flavored_error {
    ($name:ident, $flavor:expr, $schema:ty) => {
        /// An error in this API's shape (documents 400, 401, 403, 404, 413, 415, 429, 500).
        #[derive(Debug)]
        pub struct $name(pub ApiError);

        impl From<ApiError> for $name {
            fn from(e: ApiError) -> Self {
                Self(e.flavor($flavor))
            }
        }

        impl From<$name> for poem::Error {
            fn from(e: $name) -> poem::Error {
                poem::Error::from(e.0)
            }
        }

        impl IntoResponse for $name {
            fn into_response(self) -> Response {
                poem::error::ResponseError::as_response(&self.0)
            }
        }

        impl ApiResponse for $name {
            fn meta() -> MetaResponses {
                let statuses: [(u16, &'static str); 8] = [
                    (400, "Invalid request: a field (named in the error) is wrong, or the prompt is longer than the context."),
                    (401, "Missing or wrong API key (when the server has one)."),
                    (403, "A browser request from another site (`Origin`), or a `Host` the server does not accept (see --cors-origin, --allowed-host)."),
                    (404, "Unknown model."),
                    (413, "Request body too large."),
                    (415, "The body is not sent as JSON (`Content-Type: application/json`)."),
                    (429, "The request queue is full."),
                    (500, "Internal error."),
                ];
                MetaResponses {
                    responses: statuses
                        .into_iter()
                        .map(|(s, d)| MetaResponse {
                            description: d,
                            status: Some(s),
                            status_range: None,
                            content: vec![MetaMediaType { content_type: "application/json", schema: <$schema>::schema_ref() }],
                            headers: vec![],
                        })
                        .collect(),
                }
            }

            fn register(registry: &mut Registry) {
                <$schema>::register(registry);
            }
        }
    };
}

flavored_error!(OpenAIError, Flavor::OpenAI, openai::ErrorResponse);
flavored_error!(AnthropicError, Flavor::Anthropic, anthropic::ErrorResponse);

pub type OaiResult<T> = Result<T, OpenAIError>;
pub type AnthResult<T> = Result<T, AnthropicError>;
