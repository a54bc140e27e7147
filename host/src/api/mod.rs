//! The HTTP API: OpenAI- and Anthropic-compatible routes on poem +
//! poem-openapi, one file per resource. [`app`] builds the routes from an
//! [`AppState`] (tests bind it on port 0); `rmlx serve` binds it.
//!
//! Layers: `types/` are the APIs' own shapes (never engine types); the route
//! files translate them into engine requests (`engine::worker`) through
//! `generation.rs`; `errors.rs` renders failures in each API's shape.
pub mod access_log;
pub mod audio;
pub mod chat;
pub mod constraint_adapter;
pub mod embeddings;
pub mod reasoning_adapter;
pub mod completions;
pub mod errors;
pub mod generation;
pub mod guard;
pub mod health;
pub mod images;
pub mod limits;
pub mod messages;
pub mod metrics;
pub mod models;
pub mod reasoning;
pub mod tools;
pub mod types;

use crate::engine::worker::{ModelCatalog, ModelEntry, Worker};
use errors::ApiError;
use poem::{
    http::StatusCode, Endpoint, EndpointExt, IntoResponse, Request, Response, Route,
};
use poem_openapi::OpenApiService;
use std::sync::Arc;
use types::Flavor;

/// Server-wide settings the routes need.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Required as `Authorization: Bearer KEY` or `x-api-key: KEY` on every
    /// route but /health.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// max_tokens when a chat request gives none (capped by the context).
    pub default_max_tokens: usize,
    /// Sampling defaults when a request gives none.
    pub temperature: f32,
    pub top_p: f32,
    pub prefill_chunk: usize,
    /// Host / Origin / Content-Type checks (api/guard.rs).
    pub cross_site: guard::CrossSite,
    /// Image inputs: size limits, fetch timeout, private addresses, file dirs.
    pub media: crate::media::MediaOptions,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            max_body_bytes: 16 << 20,
            default_max_tokens: 4096,
            temperature: 0.0,
            top_p: 1.0,
            prefill_chunk: 512,
            cross_site: guard::CrossSite::default(),
            media: crate::media::MediaOptions::default(),
        }
    }
}

pub struct AppState {
    pub catalog: Arc<ModelCatalog>,
    pub worker: Worker,
    pub opts: ServerOptions,
}

impl AppState {
    /// The model a request names. An empty id (`model` left out) is the one
    /// served model when there is exactly one; a model found but not
    /// servable is a 400 saying why.
    pub fn model(&self, id: &str) -> Result<Arc<ModelEntry>, ApiError> {
        if id.is_empty() {
            return self.catalog.only().ok_or_else(|| {
                ApiError::bad_request("model", format!("`model` is required: this server serves {} models (see GET /v1/models)", self.catalog.entries.len()))
            });
        }
        if let Some(u) = self.catalog.unavailable(id) {
            return Err(ApiError::bad_request("model", format!("The model `{id}` cannot be served: {}", u.reason)).with_code("model_unavailable"));
        }
        self.catalog.get(id).ok_or_else(|| ApiError::model_not_found(id))
    }

    /// [`AppState::model`] for the generation routes: an embedding model
    /// (model/pooling.rs) is a 400 pointing at /v1/embeddings, a Whisper
    /// model one pointing at the audio routes.
    pub fn generator(&self, id: &str) -> Result<Arc<ModelEntry>, ApiError> {
        let e = self.model(id)?;
        if e.embedding.is_some() {
            return Err(ApiError::bad_request(
                "model",
                format!("The model `{}` is an embedding model: it serves POST /v1/embeddings, not text generation", e.id),
            )
            .with_code("model_not_generative"));
        }
        if e.model_type == "whisper" {
            return Err(ApiError::bad_request(
                "model",
                format!("The model `{}` is a Whisper speech model: it serves POST /v1/audio/transcriptions and /v1/audio/translations, not text generation", e.id),
            )
            .with_code("model_not_generative"));
        }
        Ok(e)
    }
}

pub type State = Arc<AppState>;

pub const TITLE: &str = "rmlx";

/// The poem-openapi service: every documented route.
pub fn service(
    state: State,
) -> OpenApiService<(chat::ChatApi, completions::CompletionsApi, embeddings::EmbeddingsApi, audio::AudioApi, models::ModelsApi, messages::MessagesApi, health::HealthApi), ()>
{
    OpenApiService::new(
        (
            chat::ChatApi(state.clone()),
            completions::CompletionsApi(state.clone()),
            embeddings::EmbeddingsApi(state.clone()),
            audio::AudioApi(state.clone()),
            models::ModelsApi(state.clone()),
            messages::MessagesApi(state.clone()),
            health::HealthApi(state),
        ),
        TITLE,
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "OpenAI- and Anthropic-compatible inference server for MLX-format models. \
         Point the OpenAI SDK at `/v1` and the Anthropic SDK at `/`. \
         With `--api-key`, every route but /health needs `Authorization: Bearer KEY` or `x-api-key: KEY`. \
         Streams are server-sent events: OpenAI's end with `data: [DONE]`; Anthropic's carry `event:` names.",
    )
    // No `servers` entry: clients and the /docs page use the origin they
    // fetched the document from, whatever host and port the server runs on.
}

/// The OpenAPI document (what `rmlx openapi` prints and schemas/openapi.json holds).
pub fn openapi_json() -> String {
    let state = Arc::new(AppState { catalog: Arc::new(ModelCatalog::default()), worker: Worker::detached(), opts: ServerOptions::default() });
    document(&service(state).spec())
}

/// poem-openapi's document with its nullable references rewritten so that
/// OpenAPI 3.0 validators accept `null` for them (types/schema.rs).
fn document(spec: &str) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(spec).expect("poem-openapi writes JSON");
    stream_event_schemas(&mut doc);
    types::nullable_refs(&mut doc);
    let mut s = serde_json::to_string_pretty(&doc).expect("JSON");
    s.push('\n');
    s
}

/// The JSON that each server-sent event carries (`ChatCompletionChunk`,
/// `Completion`, `AnthropicStreamEvent` and what they use), as components of
/// the document, so that generated clients get the chunk types. An event
/// stream's schema in OpenAPI 3.0 can only describe `data` as a string, and
/// poem-openapi drops the components nothing references, so they are added
/// back here from the types' own registrations.
fn stream_event_schemas(doc: &mut serde_json::Value) {
    use poem_openapi::types::Type;
    let mut reg = poem_openapi::registry::Registry::new();
    types::openai::ChatCompletionChunk::register(&mut reg);
    types::openai::Completion::register(&mut reg);
    types::anthropic::StreamEvent::register(&mut reg);
    let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(|v| v.as_object_mut()) else {
        return;
    };
    for (name, schema) in reg.schemas {
        if !schemas.contains_key(&name) {
            if let Ok(v) = serde_json::to_value(&schema) {
                schemas.insert(name, v);
            }
        }
    }
}

pub(crate) fn flavor_of(path: &str) -> Flavor {
    if path.starts_with("/v1/messages") {
        Flavor::Anthropic
    } else {
        Flavor::OpenAI
    }
}

/// All routes: the API, /openapi.json, the docs page (/docs), /metrics,
/// auth, body limit, error shapes and request metrics (api/metrics.rs).
pub fn app(state: State) -> Route {
    let api = service(state.clone());
    let doc = document(&api.spec());
    let allow = Arc::new(AllowedMethods::from_spec(&doc));
    let spec = poem::endpoint::make_sync(move |_| {
        poem::Response::builder().content_type("application/json; charset=utf-8").body(doc.clone())
    });
    let docs = api.swagger_ui();
    let key = state.opts.api_key.clone();
    let limit = state.opts.max_body_bytes;
    let catalog = state.catalog.clone();
    let counters = state.worker.metrics();
    let guarded = Route::new()
        .nest("/", api)
        .at("/openapi.json", spec)
        .at("/metrics", metrics::endpoint(state.clone()))
        .nest("/docs", docs)
        .around(move |ep, mut req: Request| {
            let key = key.clone();
            let catalog = catalog.clone();
            let allow = allow.clone();
            async move {
                let flavor = flavor_of(req.uri().path());
                let path = req.uri().path().to_string();
                if let Err(e) = limit_body(&mut req, limit).await {
                    return Ok(errors::render(e, flavor));
                }
                if let Some(k) = &key {
                    if req.uri().path() != "/health" && !authorized(&req, k) {
                        let e = ApiError::new(StatusCode::UNAUTHORIZED, "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)")
                            .flavor(flavor);
                        return Ok(errors::render(poem::Error::from(e), flavor));
                    }
                }
                metrics::note_model(&mut req, &catalog).await;
                let mut r = match ep.call(req).await {
                    Ok(r) => r.into_response(),
                    Err(e) => errors::render(e, flavor),
                };
                if r.status() == StatusCode::METHOD_NOT_ALLOWED {
                    if let Some(methods) = allow.for_path(&path) {
                        r.headers_mut().insert(poem::http::header::ALLOW, methods.parse().expect("method names"));
                    }
                }
                Ok(r)
            }
        })
        .with(guard::Guard(Arc::new(state.opts.cross_site.clone())))
        .around(|ep, req| access_log::layer(ep, req))
        .around(move |ep, req| metrics::track(ep, req, counters.clone()));
    Route::new().nest("/", guarded)
}

/// The methods each documented path answers (for `Allow` on a 405), read
/// from the OpenAPI document so that it cannot drift from the routes.
struct AllowedMethods(Vec<(Vec<String>, String)>);

impl AllowedMethods {
    fn from_spec(spec: &str) -> Self {
        let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let paths = doc.get("paths").and_then(|p| p.as_object()).cloned().unwrap_or_default();
        Self(
            paths
                .into_iter()
                .map(|(path, ops)| {
                    let segs = path.split('/').map(str::to_string).collect();
                    let methods: Vec<String> = ops.as_object().map(|o| o.keys().map(|m| m.to_uppercase()).collect()).unwrap_or_default();
                    (segs, methods.join(", "))
                })
                .collect(),
        )
    }

    /// `GET, POST`-style list for a request path; `{param}` segments match any one segment.
    fn for_path(&self, path: &str) -> Option<&str> {
        let segs: Vec<&str> = path.split('/').collect();
        self.0.iter().find_map(|(tpl, methods)| {
            let hit = tpl.len() == segs.len() && tpl.iter().zip(&segs).all(|(t, s)| t == s || (t.starts_with('{') && t.ends_with('}') && !s.is_empty()));
            hit.then_some(methods.as_str())
        })
    }
}

/// 413 when the body is larger than `limit` (by Content-Length, or by
/// reading a body sent without one).
async fn limit_body(req: &mut Request, limit: usize) -> poem::Result<()> {
    let too_large = || poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE);
    match req.header("content-length").map(|v| v.parse::<usize>()) {
        Some(Ok(n)) if n > limit => {
            // Read (and drop) a moderately oversized body first, so the client
            // finishes sending and sees the 413 rather than a broken pipe.
            const DRAIN_CAP: usize = 64 << 20;
            if n <= DRAIN_CAP {
                use tokio::io::AsyncReadExt;
                let body = req.take_body().into_async_read();
                let _ = tokio::io::copy(&mut body.take(n as u64), &mut tokio::io::sink()).await;
            }
            Err(too_large())
        }
        Some(_) => Ok(()),
        None => {
            use tokio::io::AsyncReadExt;
            let body = req.take_body();
            let mut buf = Vec::new();
            body.into_async_read().take(limit as u64 + 1).read_to_end(&mut buf).await.map_err(|e| poem::Error::from_string(e.to_string(), StatusCode::BAD_REQUEST))?;
            if buf.len() > limit {
                return Err(too_large());
            }
            req.set_body(buf);
            Ok(())
        }
    }
}

fn authorized(req: &Request, key: &str) -> bool {
    let bearer = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim);
    let x = req.header("x-api-key").map(str::trim);
    bearer == Some(key) || x == Some(key)
}

/// For handlers: an error response in the right shape (unused helper kept for routes outside poem-openapi).
pub fn error_response(e: ApiError) -> Response {
    poem::error::ResponseError::as_response(&e)
}

/// Groups of routes in the documentation.
#[derive(poem_openapi::Tags)]
pub enum Tag {
    /// OpenAI-compatible: chat completions, completions and embeddings.
    OpenAI,
    /// Anthropic-compatible: messages and token counting.
    Anthropic,
    /// Served models: list, describe, load, unload.
    Models,
    /// Liveness.
    Health,
}
