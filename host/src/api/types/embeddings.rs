//! OpenAI's embeddings shapes (POST /v1/embeddings), field for field.
pub use super::openai::ListObject;
use super::openai::KeepAliveSpec;
use super::schema::{int_items, untagged_union};
use poem_openapi::{registry::{MetaSchema, MetaSchemaRef}, Enum, Object};
use serde::{Deserialize, Serialize};

/// Inputs one request may hold (strings or token-id arrays); OpenAI allows 2048.
pub const MAX_INPUTS: usize = 2048;

/// `input`: a string, strings, token ids, lists of token ids, or documents.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
    Items(Vec<EmbeddingItem>),
}

/// One document of an `input` array in Jina's form (rmlx extension, for
/// multi-task embedders that take images: jina-embeddings-v4):
/// `{"text": "..."}` or `{"image": "..."}`, exactly one of them.
#[derive(Debug, Clone, Object, Deserialize, Serialize)]
pub struct EmbeddingItem {
    /// A text: embedded as a string input is (with the task's prompt prefix).
    #[serde(default)]
    #[oai(skip_serializing_if_is_none)]
    pub text: Option<String>,
    /// An image: a `data:` URL, an http(s) URL or a `file://` path, under
    /// the rules of chat's `image_url` (rmlx.toml `[server.images]`: no
    /// private addresses, files only under the allowed directories).
    /// Embedded as the model's image document (no prompt prefix).
    #[serde(default)]
    #[oai(skip_serializing_if_is_none)]
    pub image: Option<String>,
}

untagged_union!(EmbeddingInput, "EmbeddingInput",
    "`input`: a string, an array of strings, an array of token ids, an array of arrays of token ids, or (multi-task embedders that take images) an array of `{\"text\": ...}` / `{\"image\": ...}` documents (none empty; at most 2048 inputs; token ids below the model's vocabulary size).", { Text(String), Texts(Vec<String>), Tokens(Vec<i64>), TokenLists(Vec<Vec<i64>>), Items(Vec<EmbeddingItem>) }, [
    String::schema_ref().merge(MetaSchema { min_length: Some(1), ..MetaSchema::ANY }),
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        items: Some(Box::new(String::schema_ref().merge(MetaSchema { min_length: Some(1), ..MetaSchema::ANY }))),
        min_items: Some(1),
        max_items: Some(MAX_INPUTS),
        ..MetaSchema::new("array")
    })),
    int_items(0.0, u32::MAX as f64, 1),
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        items: Some(Box::new(int_items(0.0, u32::MAX as f64, 1))),
        min_items: Some(1),
        max_items: Some(MAX_INPUTS),
        ..MetaSchema::new("array")
    })),
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        items: Some(Box::new(<EmbeddingItem as poem_openapi::types::Type>::schema_ref())),
        min_items: Some(1),
        max_items: Some(MAX_INPUTS),
        ..MetaSchema::new("array")
    })),
]);

#[derive(Debug, Clone, Copy, Enum, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[oai(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// An array of numbers.
    Float,
    /// Little-endian float32 bytes in base64.
    Base64,
}

/// POST /v1/embeddings
#[derive(Debug, Clone, Object, Deserialize)]
pub struct EmbeddingRequest {
    pub input: EmbeddingInput,
    /// A model id from GET /v1/models; may be left out when the server
    /// serves exactly one model.
    #[oai(default)]
    #[serde(default)]
    pub model: String,
    // `float` (the default) or `base64` (no doc comment: it would wrap the
    // reference in an allOf that generated clients cannot read).
    #[serde(default)]
    #[oai(nullable)]
    pub encoding_format: Option<EncodingFormat>,
    /// Keep the first `dimensions` values (normalised again when the model
    /// normalises). Only for models that declare Matryoshka truncation
    /// (`truncate_dim` in config_sentence_transformers.json), up to it; or
    /// the model's full size. For a multi-task embedder (jina-embeddings-v4),
    /// one of its `matryoshka_dims`.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "65536")))]
    pub dimensions: Option<u32>,
    /// Accepted and ignored.
    #[serde(default)]
    #[oai(nullable)]
    pub user: Option<String>,
    // rmlx extension: how long the model stays loaded afterwards.
    #[serde(default)]
    #[oai(nullable)]
    pub keep_alive: Option<KeepAliveSpec>,
    /// rmlx extension for multi-task embedders (jina-embeddings-v4): the
    /// task whose adapters embed the inputs, one of the model's
    /// `task_names` (`retrieval`, `text-matching`, `code`); default
    /// `retrieval`. `retrieval.query` / `retrieval.passage` (Jina's API
    /// form) set `prompt_name` too. Refused for other models.
    #[serde(default)]
    #[oai(nullable)]
    pub task: Option<String>,
    /// rmlx extension for multi-task embedders: `query` (default) or
    /// `passage`; text inputs get the prefix `Query: ` or `Passage: `
    /// (`Query: ` for both under `text-matching`). Token-id inputs are
    /// used as given. Refused for other models.
    #[serde(default)]
    #[oai(nullable)]
    pub prompt_name: Option<String>,
}

/// One embedding: numbers, or base64 of little-endian float32.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

untagged_union!(EmbeddingValue, "EmbeddingValue",
    "The vector: an array of numbers (`encoding_format: float`), or a base64 string of its little-endian float32 bytes (`base64`).", { Float(Vec<f32>), Base64(String) }, [
    <Vec<f32>>::schema_ref(),
    String::schema_ref(),
]);

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
pub enum EmbeddingObject {
    #[oai(rename = "embedding")]
    Embedding,
}

#[derive(Debug, Clone, Object)]
pub struct Embedding {
    pub object: EmbeddingObject,
    /// The input's position in `input`.
    pub index: u32,
    pub embedding: EmbeddingValue,
}

#[derive(Debug, Clone, Object)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Object)]
pub struct CreateEmbeddingResponse {
    pub object: ListObject,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}
