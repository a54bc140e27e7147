//! POST /v1/chat/completions: the request, the response, and the streamed
//! chunks.
use super::{ChatMessage, ChatTool, FunctionType, KeepAliveSpec, ResponseFormat, StopSpec, StreamOptions, ToolChoice, Usage};
use poem_openapi::{Enum, Object};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;

/// POST /v1/chat/completions
#[derive(Debug, Clone, Object, Deserialize)]
pub struct ChatCompletionRequest {
    /// A model id from GET /v1/models; may be left out when the server
    /// serves exactly one model.
    #[oai(default)]
    #[serde(default)]
    pub model: String,
    #[oai(validator(min_items = 1))]
    pub messages: Vec<ChatMessage>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both work.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "4294967295")))]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "4294967295")))]
    pub max_completion_tokens: Option<u32>,
    /// 0 (greedy) to 2. Default: the server's (0).
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::temperature2")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::unit_open")]
    #[oai(nullable, validator(minimum(value = "0", exclusive), maximum(value = "1")))]
    pub top_p: Option<f32>,
    /// rmlx extension (as vLLM): keep the k most likely tokens; 0 = off.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0")))]
    pub top_k: Option<i64>,
    /// rmlx extension: drop tokens below min_p times the top probability.
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::unit")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "1")))]
    pub min_p: Option<f32>,
    /// rmlx extension (as mlx-lm): >1 discourages the last 20 tokens.
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::positive")]
    #[oai(nullable, validator(minimum(value = "0", exclusive)))]
    pub repetition_penalty: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub presence_penalty: Option<f32>,
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) -> bias added to its logit (-100..100).
    #[serde(default, deserialize_with = "crate::api::types::schema::bounded::logit_bias")]
    #[oai(nullable, validator(minimum(value = "-100"), maximum(value = "100"), max_properties = 300))]
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Same seed, same output.
    #[serde(default)]
    #[oai(nullable)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[oai(nullable)]
    pub stop: Option<StopSpec>,
    /// Only 1 is supported.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "1")))]
    pub n: Option<u32>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream: Option<bool>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream_options: Option<StreamOptions>,
    /// Return the log-probability of each output token.
    #[serde(default)]
    #[oai(nullable)]
    pub logprobs: Option<bool>,
    /// 0 to 20 most likely alternatives per token (needs `logprobs`).
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "20")))]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    #[oai(nullable)]
    pub tools: Option<Vec<ChatTool>>,
    #[serde(default)]
    #[oai(nullable)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    #[oai(nullable)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    #[oai(nullable)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    #[oai(nullable)]
    pub user: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub metadata: Option<HashMap<String, String>>,
    /// rmlx extension: turn the model's thinking on or off (chat template
    /// `enable_thinking`).
    #[serde(default)]
    #[oai(nullable)]
    pub enable_thinking: Option<bool>,
    /// rmlx extension: at most this many thinking tokens; the thinking block
    /// is closed when they are spent.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "4294967295")))]
    pub thinking_budget: Option<u32>,
    /// Extra chat-template variables (as vLLM).
    #[serde(default)]
    #[oai(nullable)]
    pub chat_template_kwargs: Option<HashMap<String, Value>>,
    #[serde(default)]
    #[oai(nullable)]
    pub keep_alive: Option<KeepAliveSpec>,
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


#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "snake_case")]
pub enum FinishReasonOai {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
pub enum AssistantRole {
    Assistant,
}

#[derive(Debug, Clone, Object)]
pub struct ResponseFunctionCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Object)]
pub struct ResponseToolCall {
    pub id: String,
    #[oai(rename = "type")]
    pub r#type: FunctionType,
    pub function: ResponseFunctionCall,
}

#[derive(Debug, Clone, Object)]
pub struct ResponseMessage {
    pub role: AssistantRole,
    #[oai(nullable)]
    pub content: Option<String>,
    /// The model's thinking, apart from the answer.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub reasoning_content: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub tool_calls: Option<Vec<ResponseToolCall>>,
    #[oai(nullable)]
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Object)]
pub struct TopLogprob {
    pub token: String,
    /// -9999 when the model gives the token no probability (as OpenAI).
    #[oai(serialize_with = "crate::api::types::schema::finite_logprob")]
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    #[oai(nullable)]
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Object)]
pub struct TokenLogprob {
    pub token: String,
    /// -9999 when the model gives the token no probability (as OpenAI).
    #[oai(serialize_with = "crate::api::types::schema::finite_logprob")]
    pub logprob: f32,
    #[oai(nullable)]
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Object)]
pub struct ChoiceLogprobs {
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub content: Option<Vec<TokenLogprob>>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub refusal: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone, Object)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ResponseMessage,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: FinishReasonOai,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
pub enum ChatCompletionObject {
    #[oai(rename = "chat.completion")]
    ChatCompletion,
}

/// A chat completion (non-streamed).
#[derive(Debug, Clone, Object)]
pub struct ChatCompletion {
    pub id: String,
    pub object: ChatCompletionObject,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[oai(nullable)]
    pub system_fingerprint: Option<String>,
}


#[derive(Debug, Clone, Object, Default)]
pub struct DeltaFunctionCall {
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub arguments: Option<String>,
}

#[derive(Debug, Clone, Object)]
pub struct DeltaToolCall {
    pub index: u32,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub id: Option<String>,
    #[oai(rename = "type", skip_serializing_if_is_none)]
    pub r#type: Option<FunctionType>,
    pub function: DeltaFunctionCall,
}

#[derive(Debug, Clone, Object, Default)]
pub struct ChunkDelta {
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub role: Option<AssistantRole>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub content: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub reasoning_content: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Debug, Clone, Object)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: ChunkDelta,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub logprobs: Option<ChoiceLogprobs>,
    #[oai(nullable)]
    pub finish_reason: Option<FinishReasonOai>,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
pub enum ChatCompletionChunkObject {
    #[oai(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

/// One server-sent event of a streamed chat completion (`data: {...}`); the
/// stream ends with `data: [DONE]`. The first chunk carries the role; with
/// `stream_options.include_usage` a last chunk has `usage` and no choices.
#[derive(Debug, Clone, Object)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChatCompletionChunkObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub usage: Option<Usage>,
    #[oai(nullable)]
    pub system_fingerprint: Option<String>,
}
