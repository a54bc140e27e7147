//! The API's own types: OpenAI's and Anthropic's shapes, and two payloads
//! (a JSON body parsed with serde so errors name the field, and an SSE body
//! documented with its event schema). Engine types never appear here.
pub mod anthropic;
pub mod audio;
pub mod embeddings;
pub mod kv_cache;
pub mod openai;
pub mod schema;
pub use schema::nullable_refs;

use poem::{web::sse::Event, IntoResponse, Request, RequestBody, Response};
use poem_openapi::{
    payload::{ParsePayload, Payload},
    registry::{MetaMediaType, MetaRequest, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry},
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Object,
    types::Type,
};
use futures_util::stream::BoxStream;
use std::marker::PhantomData;

/// Which API a route belongs to (decides the error shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAI,
    Anthropic,
}

/// A JSON request body of type `T`, parsed with serde (any content type is
/// accepted as JSON). A parse failure is a 400 naming the field's path.
pub struct ApiJson<T>(pub T);

/// A body that did not parse: message and the field's path.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BodyError {
    pub message: String,
    pub param: Option<String>,
}

impl poem::error::ResponseError for BodyError {
    fn status(&self) -> poem::http::StatusCode {
        poem::http::StatusCode::BAD_REQUEST
    }
}

impl<T: Type> Payload for ApiJson<T> {
    const CONTENT_TYPE: &'static str = "application/json";

    fn check_content_type(_: &str) -> bool {
        true
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: serde::de::DeserializeOwned + Send> ParsePayload for ApiJson<T> {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let data = <Vec<u8> as poem::FromRequest>::from_request(request, body).await?;
        parse_json(&data).map(ApiJson)
    }
}

/// Parses a body, reporting the path of the field at fault.
pub fn parse_json<T: serde::de::DeserializeOwned>(data: &[u8]) -> poem::Result<T> {
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(BodyError { message: "the request body is empty (expected a JSON object)".into(), param: None }.into());
    }
    // A body is one JSON object: serde would also fill a struct from an
    // array (`[]` for a body whose fields are all optional).
    if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(BodyError { message: "the request body must be a JSON object".into(), param: None }.into());
    }
    let de = &mut serde_json::Deserializer::from_slice(data);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = (path != "." && !path.is_empty()).then_some(path);
        let message = match (&param, inner.classify()) {
            (_, serde_json::error::Category::Syntax | serde_json::error::Category::Eof) => {
                format!("the request body is not valid JSON: {inner}")
            }
            (Some(p), _) => format!("invalid `{p}`: {}", strip_position(&inner.to_string())),
            (None, _) => strip_position(&inner.to_string()),
        };
        // serde names a missing field in the message, not the path.
        let param = match (param, missing_field(&message)) {
            (Some(p), Some(f)) => Some(format!("{p}.{f}")),
            (None, Some(f)) => Some(f),
            (p, None) => p,
        };
        poem::Error::from(BodyError { message, param })
    })
}

fn strip_position(s: &str) -> String {
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn missing_field(msg: &str) -> Option<String> {
    let i = msg.find("missing field `")? + "missing field `".len();
    let j = msg[i..].find('`')?;
    Some(msg[i..i + j].to_string())
}

impl<'a, T: Type + serde::de::DeserializeOwned + Send> ApiExtractor<'a> for ApiJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType { content_type: Self::CONTENT_TYPE, schema: Self::schema_ref() }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        <Self as ParsePayload>::from_request(request, body).await
    }
}

/// A `text/event-stream` body whose events carry `E` as JSON (the schema
/// documents `E`); the events themselves are built by the route (event names,
/// `[DONE]`).
pub struct Sse<E> {
    pub stream: BoxStream<'static, Event>,
    pub keep_alive: Option<std::time::Duration>,
    _e: PhantomData<fn() -> E>,
}

impl<E> Sse<E> {
    pub fn new(stream: BoxStream<'static, Event>) -> Self {
        Self { stream, keep_alive: None, _e: PhantomData }
    }
}

impl<E: Type> Payload for Sse<E> {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    /// One event of the stream (OpenAPI 3.0 gives an event stream's `schema`
    /// per event): `data` is the JSON of `E` (a component of the document),
    /// or OpenAI's closing `[DONE]`.
    fn schema_ref() -> MetaSchemaRef {
        let string = |description: &'static str| {
            MetaSchemaRef::Inline(Box::new(MetaSchema { description: Some(description), ..MetaSchema::new("string") }))
        };
        let data = match E::name().as_ref() {
            "ChatCompletionChunk" => "A `ChatCompletionChunk` as JSON; the last event's data is `[DONE]`.",
            "Completion" => "A `Completion` as JSON; the last event's data is `[DONE]`.",
            "AnthropicStreamEvent" => "An `AnthropicStreamEvent` as JSON, whose `type` is the event's name.",
            _ => "The event as JSON.",
        };
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            description: Some("One server-sent event."),
            required: vec!["data"],
            properties: vec![("event", string("The event's name (Anthropic's streams).")), ("data", string(data))],
            ..MetaSchema::new("object")
        }))
    }

    fn register(registry: &mut Registry) {
        E::register(registry);
    }
}

impl<E: Send> IntoResponse for Sse<E> {
    fn into_response(self) -> Response {
        let mut sse = poem::web::sse::SSE::new(self.stream);
        if let Some(k) = self.keep_alive {
            sse = sse.keep_alive(k);
        }
        sse.into_response()
    }
}

/// A response that is JSON (`J`) or, with `stream: true`, server-sent events
/// carrying `E`, both with status 200.
pub enum JsonOrStream<J, E> {
    Json(J),
    Stream(Sse<E>),
}

impl<J: poem_openapi::types::ToJSON + Send, E: Send> IntoResponse for JsonOrStream<J, E> {
    fn into_response(self) -> Response {
        match self {
            JsonOrStream::Json(j) => poem::web::Json(j.to_json()).into_response(),
            JsonOrStream::Stream(s) => s.into_response(),
        }
    }
}

impl<J: poem_openapi::types::ToJSON + Send, E: Type + Send> ApiResponse for JsonOrStream<J, E> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "The result as JSON, or with `stream: true` as server-sent events.",
                status: Some(200),
                status_range: None,
                content: vec![
                    MetaMediaType { content_type: "application/json", schema: J::schema_ref() },
                    MetaMediaType { content_type: <Sse<E> as Payload>::CONTENT_TYPE, schema: <Sse<E> as Payload>::schema_ref() },
                ],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        J::register(registry);
        E::register(registry);
    }
}

/// GET /health
#[derive(Debug, Clone, Object)]
pub struct Health {
    /// "ok", or "unavailable" (with a 503) when the engine cannot serve.
    pub status: String,
    /// Models whose weights are in memory.
    pub loaded_models: Vec<String>,
    /// Requests running or waiting.
    pub in_flight: u32,
    /// Why the engine cannot serve (only with "unavailable").
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
    /// Times the engine restarted its loop after an internal error.
    pub engine_restarts: u64,
}

/// Like [`ApiJson`], but an empty body is `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<T: Type> Payload for OptionalJson<T> {
    const CONTENT_TYPE: &'static str = "application/json";
    fn check_content_type(_: &str) -> bool {
        true
    }
    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }
    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<'a, T: Type + serde::de::DeserializeOwned + Default + Send> ApiExtractor<'a> for OptionalJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType { content_type: Self::CONTENT_TYPE, schema: Self::schema_ref() }],
            required: false,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let data = <Vec<u8> as poem::FromRequest>::from_request(request, body).await?;
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Self(T::default()));
        }
        parse_json(&data).map(OptionalJson)
    }
}
