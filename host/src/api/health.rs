//! GET /health (never needs the API key).
use super::types::Health;
use super::{State, Tag};
use poem_openapi::{payload::Json, OpenApi};
use std::sync::atomic::Ordering;

pub struct HealthApi(pub State);

#[OpenApi]
impl HealthApi {
    /// Health
    ///
    /// `{"status": "ok"}` while the server runs, with the loaded models and
    /// the requests in flight.
    #[oai(path = "/health", method = "get", operation_id = "health", tag = "Tag::Health")]
    async fn health(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
            loaded_models: self.0.worker.loaded().into_iter().map(|l| l.id).collect(),
            in_flight: self.0.worker.in_flight().load(Ordering::SeqCst) as u32,
        })
    }
}
