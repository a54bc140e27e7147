//! GET /v1/models, GET /v1/models/{id}, POST /v1/models/{id}/load|unload.
use super::errors::{OaiResult, OpenAIError};
use super::generation as g;
use super::types::openai::*;
use super::types::OptionalJson;
use super::{State, Tag};
use crate::engine::catalog::Unavailable;
use super::errors::ApiError;
use crate::engine::worker::{ModelEntry, Unloaded};
use poem::http::StatusCode;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};

/// POST /v1/models/{id}/unload (body optional).
#[derive(Debug, Clone, Object, serde::Deserialize, Default)]
pub struct UnloadRequest {
    /// Unload even while requests use the model (they end with an error).
    #[serde(default)]
    #[oai(nullable)]
    pub force: Option<bool>,
}

pub struct ModelsApi(pub State);

fn describe(state: &State, e: &ModelEntry) -> Model {
    let loaded = state.worker.loaded();
    let me = loaded.iter().find(|l| l.id == e.id);
    Model {
        id: e.id.clone(),
        object: ModelObjectKind::Model,
        created: e.created,
        owned_by: "rmlx".into(),
        loaded: me.is_some(),
        context_length: e.context_length.map(|c| c as u32),
        expires_at: me.and_then(|m| m.expires_at),
        available: true,
        unavailable_reason: None,
    }
}

/// A model found but not servable: listed, with the reason.
fn describe_unavailable(u: &Unavailable) -> Model {
    let created = std::fs::metadata(u.path.join("config.json"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Model {
        id: u.id.clone(),
        object: ModelObjectKind::Model,
        created,
        owned_by: "rmlx".into(),
        loaded: false,
        context_length: None,
        expires_at: None,
        available: false,
        unavailable_reason: Some(u.reason.clone()),
    }
}

#[OpenApi]
impl ModelsApi {
    /// List models
    ///
    /// Every model the server can serve, loaded or not (with `--models-dir`,
    /// those loaded on demand too), then the models it found but cannot
    /// serve (`available: false`, with `unavailable_reason`).
    #[oai(path = "/v1/models", method = "get", operation_id = "listModels", tag = "Tag::Models")]
    async fn list(&self) -> OaiResult<Json<ModelList>> {
        let cat = &self.0.catalog;
        let data = cat.entries.iter().map(|e| describe(&self.0, e)).chain(cat.unavailable.iter().map(describe_unavailable)).collect();
        Ok(Json(ModelList { object: ListObject::List, data }))
    }

    /// Retrieve a model
    #[oai(path = "/v1/models/:id", method = "get", operation_id = "retrieveModel", tag = "Tag::Models")]
    async fn get(&self, id: Path<String>) -> OaiResult<Json<Model>> {
        if let Some(u) = self.0.catalog.unavailable(&id.0) {
            return Ok(Json(describe_unavailable(u)));
        }
        let e = self.0.model(&id.0).map_err(OpenAIError::from)?;
        Ok(Json(describe(&self.0, &e)))
    }

    /// Load a model
    ///
    /// Loads the model's weights now (requests load it on demand anyway).
    /// Body (optional): `{"keep_alive": "10m"}`.
    #[oai(path = "/v1/models/:id/load", method = "post", operation_id = "loadModel", tag = "Tag::Models")]
    async fn load(&self, id: Path<String>, body: OptionalJson<LoadRequest>) -> OaiResult<Json<Model>> {
        let e = self.0.model(&id.0).map_err(OpenAIError::from)?;
        let req = body.0;
        let ka = g::keep_alive(&req.keep_alive).map_err(OpenAIError::from)?;
        self.0.worker.load(e.clone(), ka).await.map_err(|e| OpenAIError::from(g::worker_error(e)))?;
        Ok(Json(describe(&self.0, &e)))
    }

    /// Unload a model
    ///
    /// Frees the model's weights (a later request loads it again). While
    /// requests use the model the answer is a 409 and nothing changes, unless
    /// `force` is given (`?force=true` or body `{"force": true}`): those
    /// requests then end with an error.
    #[oai(path = "/v1/models/:id/unload", method = "post", operation_id = "unloadModel", tag = "Tag::Models")]
    async fn unload(&self, id: Path<String>, force: Query<Option<bool>>, body: OptionalJson<UnloadRequest>) -> OaiResult<Json<Model>> {
        let e = self.0.model(&id.0).map_err(OpenAIError::from)?;
        let force = force.0.or(body.0.force).unwrap_or(false);
        let r = self.0.worker.unload(&e.id, force).await.map_err(|e| OpenAIError::from(g::worker_error(e)))?;
        if let Unloaded::Busy { requests } = r {
            let msg = format!(
                "model `{}` is serving {requests} request(s); it unloads once they finish, or now with `force` (?force=true or {{\"force\": true}}), which ends them",
                e.id
            );
            return Err(OpenAIError::from(ApiError::new(StatusCode::CONFLICT, msg).with_code("model_busy")));
        }
        Ok(Json(describe(&self.0, &e)))
    }
}
