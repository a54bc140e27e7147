//! The request bodies (POST /v1/messages and /v1/messages/count_tokens) and
//! their options: tools, tool choice, thinking, metadata.
use super::{MessageParam, SystemParam};
use poem_openapi::{Enum, Object};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicTool")]
pub struct Tool {
    pub name: String,
    #[serde(default)]
    #[oai(nullable)]
    pub description: Option<String>,
    /// JSON Schema of the input.
    pub input_schema: Value,
    #[serde(default)]
    #[oai(nullable)]
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Copy, Enum, Deserialize, PartialEq)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
#[oai(rename = "AnthropicToolChoiceType")]
pub enum ToolChoiceType {
    Auto,
    Any,
    Tool,
    None,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicToolChoice")]
pub struct ToolChoice {
    #[oai(rename = "type")]
    pub r#type: ToolChoiceType,
    /// With `type: tool`.
    #[serde(default)]
    #[oai(nullable)]
    pub name: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Clone, Copy, Enum, Deserialize, PartialEq)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
#[oai(rename = "AnthropicThinkingType")]
pub enum ThinkingType {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicThinkingConfig")]
pub struct ThinkingConfig {
    #[oai(rename = "type")]
    pub r#type: ThinkingType,
    /// With `enabled`: thinking tokens at most; the block is closed when spent.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "4294967295")))]
    pub budget_tokens: Option<u32>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicMetadata")]
pub struct Metadata {
    #[serde(default)]
    #[oai(nullable)]
    pub user_id: Option<String>,
}

/// POST /v1/messages
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicMessagesRequest")]
pub struct MessagesRequest {
    /// A model id from GET /v1/models; may be left out when the server
    /// serves exactly one model.
    #[oai(default)]
    #[serde(default)]
    pub model: String,
    #[oai(validator(min_items = 1))]
    pub messages: Vec<MessageParam>,
    #[oai(validator(minimum(value = "1"), maximum(value = "4294967295")))]
    pub max_tokens: u32,
    #[serde(default)]
    #[oai(nullable)]
    pub system: Option<SystemParam>,
    #[serde(default)]
    #[oai(nullable)]
    pub metadata: Option<Metadata>,
    /// At most 16 strings of at most 256 bytes (UTF-8) each.
    #[serde(default)]
    #[oai(nullable, validator(max_items = 16, max_length = 256))]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream: Option<bool>,
    /// 0 to 1.
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::unit")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "1")))]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0")))]
    pub top_k: Option<i64>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::unit_open")]
    #[oai(nullable, validator(minimum(value = "0", exclusive), maximum(value = "1")))]
    pub top_p: Option<f32>,
    #[serde(default)]
    #[oai(nullable)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    #[oai(nullable)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    #[oai(nullable)]
    pub thinking: Option<ThinkingConfig>,
    /// rmlx extension: same seed, same output.
    #[serde(default)]
    #[oai(nullable)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[oai(nullable)]
    pub keep_alive: Option<crate::api::types::openai::KeepAliveSpec>,
    // rmlx extension: the KV-cache families of this request (`KvCacheSpec`; a
    // doc comment here would wrap the union in an allOf that generated
    // clients cannot read).
    #[serde(default)]
    #[oai(nullable)]
    pub kv_cache: Option<crate::api::types::kv_cache::KvCacheSpec>,
    /// rmlx extension: speculative decoding's draft tokens per round at first
    /// for this request (0 turns speculation off; the model's default when
    /// absent). Only a model served with a draft model speculates.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "32")))]
    pub num_draft_tokens: Option<u32>,
    /// rmlx extension: the drafter this request drafts with, by kind
    /// (`draft`, `mtp`, `eagle3`, `dflash`): one the model was served with
    /// (its first, the default, when absent). Another kind is a 400.
    #[serde(default)]
    #[oai(nullable)]
    pub draft_kind: Option<String>,
}

/// POST /v1/messages/count_tokens
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicCountTokensRequest")]
pub struct CountTokensRequest {
    /// A model id from GET /v1/models; may be left out when the server
    /// serves exactly one model.
    #[oai(default)]
    #[serde(default)]
    pub model: String,
    #[oai(validator(min_items = 1))]
    pub messages: Vec<MessageParam>,
    #[serde(default)]
    #[oai(nullable)]
    pub system: Option<SystemParam>,
    #[serde(default)]
    #[oai(nullable)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    #[oai(nullable)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    #[oai(nullable)]
    pub thinking: Option<ThinkingConfig>,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicCountTokensResponse")]
pub struct CountTokensResponse {
    pub input_tokens: u32,
}
