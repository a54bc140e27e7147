//! GET /v1/models and POST /v1/models/{id}/load.
use super::KeepAliveSpec;
use poem_openapi::{Enum, Object};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
pub enum ModelObjectKind {
    Model,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
pub enum ListObject {
    List,
}

#[derive(Debug, Clone, Object)]
pub struct Model {
    pub id: String,
    pub object: ModelObjectKind,
    pub created: u64,
    pub owned_by: String,
    /// rmlx extension: whether its weights are in memory now.
    pub loaded: bool,
    /// rmlx extension: context length from config.json.
    #[oai(nullable)]
    pub context_length: Option<u32>,
    /// rmlx extension: Unix seconds when it will be unloaded (null: loaded
    /// with no expiry, or not loaded).
    #[oai(nullable)]
    pub expires_at: Option<u64>,
    /// rmlx extension: false for a model the server found but cannot serve
    /// (an unknown `model_type`, a broken config.json); `unavailable_reason`
    /// says why.
    pub available: bool,
    /// rmlx extension: why the model cannot be served (null when it can).
    #[oai(nullable)]
    pub unavailable_reason: Option<String>,
}

#[derive(Debug, Clone, Object)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<Model>,
}

/// POST /v1/models/{id}/load (body optional).
#[derive(Debug, Clone, Object, Deserialize, Default)]
pub struct LoadRequest {
    #[serde(default)]
    #[oai(nullable)]
    pub keep_alive: Option<KeepAliveSpec>,
}
