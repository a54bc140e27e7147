//! GET /v1/models, GET /v1/models/{id}, POST /v1/models/{id}/load|unload.
use super::errors::{OaiResult, OpenAIError};
use super::generation as g;
use super::types::openai::*;
use super::types::OptionalJson;
use super::{State, Tag};
use crate::engine::worker::ModelEntry;
use poem_openapi::{param::Path, payload::Json, OpenApi};

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
    }
}

#[OpenApi]
impl ModelsApi {
    /// List models
    ///
    /// Every model the server can serve, loaded or not.
    #[oai(path = "/v1/models", method = "get", operation_id = "listModels", tag = "Tag::Models")]
    async fn list(&self) -> OaiResult<Json<ModelList>> {
        let data = self.0.catalog.entries.iter().map(|e| describe(&self.0, e)).collect();
        Ok(Json(ModelList { object: ListObject::List, data }))
    }

    /// Retrieve a model
    #[oai(path = "/v1/models/:id", method = "get", operation_id = "retrieveModel", tag = "Tag::Models")]
    async fn get(&self, id: Path<String>) -> OaiResult<Json<Model>> {
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
    /// Frees the model's weights (a later request loads it again).
    #[oai(path = "/v1/models/:id/unload", method = "post", operation_id = "unloadModel", tag = "Tag::Models")]
    async fn unload(&self, id: Path<String>) -> OaiResult<Json<Model>> {
        let e = self.0.model(&id.0).map_err(OpenAIError::from)?;
        self.0.worker.unload(&e.id).await.map_err(|e| OpenAIError::from(g::worker_error(e)))?;
        Ok(Json(describe(&self.0, &e)))
    }
}
