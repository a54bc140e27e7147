//! GET /health (never needs the API key): 200 while the engine serves, 503
//! with the reason when it cannot (its thread has stopped).
use super::types::Health;
use super::{State, Tag};
use poem_openapi::{payload::Json, ApiResponse, OpenApi};
use std::sync::atomic::Ordering;

pub struct HealthApi(pub State);

#[derive(ApiResponse)]
enum HealthResponse {
    /// The engine serves.
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// The engine cannot serve; `reason` says why.
    #[oai(status = 503)]
    Unavailable(Json<Health>),
}

#[OpenApi]
impl HealthApi {
    /// Health
    ///
    /// `{"status": "ok"}` while the engine serves, with the loaded models and
    /// the requests in flight; a 503 with `"status": "unavailable"` and a
    /// `reason` when it cannot (the engine thread has stopped).
    #[oai(path = "/health", method = "get", operation_id = "health", tag = "Tag::Health")]
    async fn health(&self) -> HealthResponse {
        let w = &self.0.worker;
        let engine = w.health();
        let body = Health {
            status: if engine.down.is_none() { "ok" } else { "unavailable" }.into(),
            loaded_models: w.loaded().into_iter().map(|l| l.id).collect(),
            in_flight: w.open_requests().load(Ordering::SeqCst) as u32,
            reason: engine.down.clone(),
            engine_restarts: engine.restarts,
        };
        match engine.down {
            None => HealthResponse::Ok(Json(body)),
            Some(_) => HealthResponse::Unavailable(Json(body)),
        }
    }
}
