//! OpenAI's request and response shapes (chat completions, completions,
//! models, errors), field for field. Requests derive both `Object` (the
//! schema) and `Deserialize` (parsing with the failing field's path); rmlx
//! extensions are marked as such.
use super::schema::{int_items, nullable, serde_schema, tagged_union, untagged_union};
use crate::api::limits::{MAX_KEEP_ALIVE_SECS, MAX_PROMPTS, MAX_STOP, MAX_STOP_BYTES};
use poem_openapi::{registry::{MetaSchema, MetaSchemaRef}, Enum, Object, Union};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;

// ------------------------------------------------------------------ shared

/// `stop`: a string or up to 4 strings (rmlx takes any number).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

untagged_union!(StopSpec, "StopSpec", "`stop`: a string or up to 4 strings, each at most 256 bytes (UTF-8).", { One(String), Many(Vec<String>) }, [
    String::schema_ref().merge(MetaSchema { max_length: Some(MAX_STOP_BYTES), ..MetaSchema::ANY }),
    <Vec<String>>::schema_ref().merge(MetaSchema {
        max_items: Some(MAX_STOP),
        items: Some(Box::new(MetaSchemaRef::Inline(Box::new(MetaSchema { max_length: Some(MAX_STOP_BYTES), ..MetaSchema::ANY })))),
        ..MetaSchema::ANY
    }),
]);

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    #[oai(nullable)]
    pub include_usage: Option<bool>,
}

/// rmlx extension (as Ollama): how long the model stays loaded after this
/// request: seconds (0 unloads at once, negative keeps it forever) or a
/// duration string such as "10m", "1h", "30s".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum KeepAliveSpec {
    Seconds(f64),
    Duration(String),
}

untagged_union!(KeepAliveSpec, "KeepAliveSpec",
    "rmlx extension (as Ollama): how long the model stays loaded after this request: seconds \
     (0 unloads at once, -1 keeps it for good, at most ten years) or a duration string such as \
     \"10m\", \"1h30m\", \"30s\", \"-1\".", { Seconds(f64), Duration(String) }, [
    f64::schema_ref().merge(MetaSchema {
        minimum: Some(0.0),
        maximum: Some(MAX_KEEP_ALIVE_SECS as f64),
        ..MetaSchema::ANY
    }),
    MetaSchemaRef::Inline(Box::new(MetaSchema { enum_items: vec![(-1).into()], ..MetaSchema::new("number") })),
    String::schema_ref().merge(MetaSchema { pattern: Some(KEEP_ALIVE_PATTERN.into()), ..MetaSchema::ANY }),
]);

#[derive(Debug, Clone, Object)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

// ------------------------------------------------------------------ chat: request

/// A text part of a message's content.
#[derive(Debug, Clone, Object, Deserialize)]
pub struct TextPart {
    pub text: String,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default)]
    #[oai(nullable)]
    pub detail: Option<String>,
}

/// An image part (not supported by text models: 400).
#[derive(Debug, Clone, Object, Deserialize)]
pub struct ImagePart {
    pub image_url: ImageUrl,
}

/// One part of a message's content.
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type")]
pub enum ContentPart {
    #[oai(mapping = "text")]
    #[serde(rename = "text")]
    Text(TextPart),
    #[oai(mapping = "image_url")]
    #[serde(rename = "image_url")]
    ImageUrl(ImagePart),
}

/// Message content: a string or an array of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

untagged_union!(MessageContent, "MessageContent", "Message content: a string or an array of parts.", { Text(String), Parts(Vec<ContentPart>) }, [
    String::schema_ref(),
    <Vec<ContentPart>>::schema_ref(),
]);

#[derive(Debug, Clone, Object, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
}

#[derive(Debug, Clone, Enum, Deserialize, PartialEq)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum FunctionType {
    Function,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[oai(rename = "type")]
    pub r#type: FunctionType,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct SystemMessage {
    pub content: MessageContent,
    #[serde(default)]
    #[oai(nullable)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct UserMessage {
    pub content: MessageContent,
    #[serde(default)]
    #[oai(nullable)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct AssistantMessage {
    #[serde(default)]
    #[oai(nullable)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    #[oai(nullable)]
    pub name: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The model's earlier reasoning (rmlx/vLLM field).
    #[serde(default)]
    #[oai(nullable)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct ToolMessage {
    pub content: MessageContent,
    pub tool_call_id: String,
}

/// A conversation turn, by `role`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "role")]
pub enum ChatMessage {
    #[serde(rename = "system")]
    System(SystemMessage),
    #[serde(rename = "developer")]
    Developer(SystemMessage),
    #[serde(rename = "user")]
    User(UserMessage),
    #[serde(rename = "assistant")]
    Assistant(AssistantMessage),
    #[serde(rename = "tool")]
    Tool(ToolMessage),
}

// A union by hand: `system` and `developer` share a Rust type, which
// poem-openapi's derive would give one component (and one role) for both.
tagged_union!(ChatMessage, "ChatMessage", "A conversation turn, by `role`.", "role", {
    System(SystemMessage) = "system",
    Developer(SystemMessage) = "developer",
    User(UserMessage) = "user",
    Assistant(AssistantMessage) = "assistant",
    Tool(ToolMessage) = "tool",
});

#[derive(Debug, Clone, Object, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    #[oai(nullable)]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    #[serde(default)]
    #[oai(nullable)]
    pub parameters: Option<Value>,
    #[serde(default)]
    #[oai(nullable)]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct ChatTool {
    #[oai(rename = "type")]
    pub r#type: FunctionType,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct FunctionName {
    pub name: String,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct NamedToolChoice {
    #[oai(rename = "type")]
    pub r#type: FunctionType,
    pub function: FunctionName,
}

#[derive(Debug, Clone, Copy, Enum, Deserialize, PartialEq)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

/// `none`, `auto`, `required`, or a named function.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named(NamedToolChoice),
}

untagged_union!(ToolChoice, "ToolChoice", "`none`, `auto`, `required`, or a named function.", { Mode(ToolChoiceMode), Named(NamedToolChoice) }, [
    ToolChoiceMode::schema_ref(),
    NamedToolChoice::schema_ref(),
]);

#[derive(Debug, Clone, Object, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    #[oai(nullable)]
    pub description: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub schema: Option<Value>,
    #[serde(default)]
    #[oai(nullable)]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct ResponseFormatText {}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct ResponseFormatJsonSchema {
    pub json_schema: JsonSchemaFormat,
}

/// rmlx extension: output matching a regular expression.
#[derive(Debug, Clone, Object, Deserialize)]
pub struct ResponseFormatRegex {
    pub regex: String,
}

/// rmlx extension: output matching a Lark grammar (llguidance's dialect).
#[derive(Debug, Clone, Object, Deserialize)]
pub struct ResponseFormatGrammar {
    pub grammar: String,
}

/// `text`, `json_object`, `json_schema`; rmlx adds `regex` and `grammar` (Lark).
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type")]
pub enum ResponseFormat {
    #[oai(mapping = "text")]
    #[serde(rename = "text")]
    Text(ResponseFormatText),
    #[oai(mapping = "json_object")]
    #[serde(rename = "json_object")]
    JsonObject(ResponseFormatText),
    #[oai(mapping = "json_schema")]
    #[serde(rename = "json_schema")]
    JsonSchema(ResponseFormatJsonSchema),
    #[oai(mapping = "regex")]
    #[serde(rename = "regex")]
    Regex(ResponseFormatRegex),
    #[oai(mapping = "grammar")]
    #[serde(rename = "grammar")]
    Grammar(ResponseFormatGrammar),
}

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
    #[serde(default, deserialize_with = "super::schema::bounded::temperature2")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::unit_open")]
    #[oai(nullable, validator(minimum(value = "0", exclusive), maximum(value = "1")))]
    pub top_p: Option<f32>,
    /// rmlx extension (as vLLM): keep the k most likely tokens; 0 = off.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0")))]
    pub top_k: Option<i64>,
    /// rmlx extension: drop tokens below min_p times the top probability.
    #[serde(default, deserialize_with = "super::schema::bounded::unit")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "1")))]
    pub min_p: Option<f32>,
    /// rmlx extension (as mlx-lm): >1 discourages the last 20 tokens.
    #[serde(default, deserialize_with = "super::schema::bounded::positive")]
    #[oai(nullable, validator(minimum(value = "0", exclusive)))]
    pub repetition_penalty: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub presence_penalty: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) -> bias added to its logit (-100..100).
    #[serde(default, deserialize_with = "super::schema::bounded::logit_bias")]
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
    pub kv_cache: Option<super::kv_cache::KvCacheSpec>,
}

// ------------------------------------------------------------------ chat: response

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
    #[oai(serialize_with = "super::schema::finite_logprob")]
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    #[oai(nullable)]
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Object)]
pub struct TokenLogprob {
    pub token: String,
    /// -9999 when the model gives the token no probability (as OpenAI).
    #[oai(serialize_with = "super::schema::finite_logprob")]
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

// ------------------------------------------------------------------ chat: stream

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

// ------------------------------------------------------------------ completions

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// What `limits::keep_alive` accepts as a string, kept inside its ten-year
/// bound: `-1` in any unit, a bare number of seconds (up to 8 digits), or up
/// to four number+unit parts of up to 4 digits each.
const KEEP_ALIVE_PATTERN: &str = r"^[ \t\r\n]*(-1(ms|s|m|h)?|\+?([0-9]{1,8}(\.[0-9]{0,6})?|\.[0-9]{1,6})|(([0-9]{1,4}(\.[0-9]{0,6})?|\.[0-9]{1,6})(ns|us|µs|ms|s|m|h)){1,4})[ \t\r\n]*$";

untagged_union!(PromptSpec, "PromptSpec",
    "`prompt`: a string, strings, token ids, or lists of token ids (none empty; token ids below the model's vocabulary size).", { Text(String), Texts(Vec<String>), Tokens(Vec<i64>), TokenLists(Vec<Vec<i64>>) }, [
    String::schema_ref(),
    <Vec<String>>::schema_ref().merge(MetaSchema { min_items: Some(1), max_items: Some(MAX_PROMPTS), ..MetaSchema::ANY }),
    int_items(0.0, u32::MAX as f64, 1),
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        items: Some(Box::new(int_items(0.0, u32::MAX as f64, 1))),
        min_items: Some(1),
        max_items: Some(MAX_PROMPTS),
        ..MetaSchema::new("array")
    })),
]);

/// POST /v1/completions
#[derive(Debug, Clone, Object, Deserialize)]
pub struct CompletionRequest {
    /// A model id from GET /v1/models; may be left out when the server
    /// serves exactly one model.
    #[oai(default)]
    #[serde(default)]
    pub model: String,
    pub prompt: PromptSpec,
    /// Default 16, as OpenAI.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "4294967295")))]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "super::schema::bounded::temperature2")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "2")))]
    pub temperature: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::unit_open")]
    #[oai(nullable, validator(minimum(value = "0", exclusive), maximum(value = "1")))]
    pub top_p: Option<f32>,
    /// rmlx extension.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0")))]
    pub top_k: Option<i64>,
    /// rmlx extension.
    #[serde(default, deserialize_with = "super::schema::bounded::unit")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "1")))]
    pub min_p: Option<f32>,
    /// rmlx extension.
    #[serde(default, deserialize_with = "super::schema::bounded::positive")]
    #[oai(nullable, validator(minimum(value = "0", exclusive)))]
    pub repetition_penalty: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub presence_penalty: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::penalty")]
    #[oai(nullable, validator(minimum(value = "-2"), maximum(value = "2")))]
    pub frequency_penalty: Option<f32>,
    #[serde(default, deserialize_with = "super::schema::bounded::logit_bias")]
    #[oai(nullable, validator(minimum(value = "-100"), maximum(value = "100"), max_properties = 300))]
    pub logit_bias: Option<HashMap<String, f32>>,
    #[serde(default)]
    #[oai(nullable)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[oai(nullable)]
    pub stop: Option<StopSpec>,
    /// Only 1.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "1")))]
    pub n: Option<u32>,
    /// Only 1.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "1")))]
    pub best_of: Option<u32>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream: Option<bool>,
    #[serde(default)]
    #[oai(nullable)]
    pub stream_options: Option<StreamOptions>,
    /// 0 to 20: the log-probability of each token and this many alternatives.
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "20")))]
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion; with `logprobs`, the prompt
    /// tokens' log-probabilities too (`max_tokens: 0` scores without generating).
    #[serde(default)]
    #[oai(nullable)]
    pub echo: Option<bool>,
    /// Not supported (400 when set).
    #[serde(default)]
    #[oai(nullable, validator(max_length = 0))]
    pub suffix: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub user: Option<String>,
    #[serde(default)]
    #[oai(nullable)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    #[oai(nullable)]
    pub keep_alive: Option<KeepAliveSpec>,
    // rmlx extension: the KV-cache families of this request (`KvCacheSpec`; a
    // doc comment here would wrap the union in an allOf that generated
    // clients cannot read).
    #[serde(default)]
    #[oai(nullable)]
    pub kv_cache: Option<super::kv_cache::KvCacheSpec>,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// null for the first echoed prompt token (it has no context).
    #[serde(serialize_with = "super::schema::finite_logprobs")]
    pub token_logprobs: Vec<Option<f32>>,
    #[serde(serialize_with = "super::schema::finite_top_logprobs")]
    pub top_logprobs: Vec<Option<HashMap<String, f32>>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<u32>,
}

// By hand: the arrays' items are nullable, which a derived `Object` cannot say.
serde_schema!(CompletionLogprobs, "CompletionLogprobs", |_registry| {
    use poem_openapi::registry::MetaSchemaRef;
    let array = |items: MetaSchemaRef| MetaSchemaRef::Inline(Box::new(MetaSchema { items: Some(Box::new(items)), ..MetaSchema::new("array") }));
    MetaSchema {
        required: vec!["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        properties: vec![
            ("tokens", array(String::schema_ref())),
            ("token_logprobs", array(nullable(f32::schema_ref())).merge(MetaSchema {
                description: Some("null for the first echoed prompt token (it has no context)."),
                ..MetaSchema::ANY
            })),
            ("top_logprobs", array(nullable(<HashMap<String, f32>>::schema_ref()))),
            ("text_offset", array(u32::schema_ref()).merge(MetaSchema {
                description: Some("Character offset of each token in the returned text."),
                ..MetaSchema::ANY
            })),
        ],
        ..MetaSchema::new("object")
    }
});

#[derive(Debug, Clone, Object)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub logprobs: Option<CompletionLogprobs>,
    #[oai(nullable)]
    pub finish_reason: Option<FinishReasonOai>,
    /// rmlx extension: the generated token ids (useful for models without a tokenizer).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
pub enum TextCompletionObject {
    #[oai(rename = "text_completion")]
    TextCompletion,
}

/// A completion; the same object is each streamed event (then `data: [DONE]`).
#[derive(Debug, Clone, Object)]
pub struct Completion {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub usage: Option<Usage>,
    #[oai(nullable)]
    pub system_fingerprint: Option<String>,
}

// ------------------------------------------------------------------ models

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

// ------------------------------------------------------------------ errors

#[derive(Debug, Clone, Object)]
pub struct ErrorDetail {
    pub message: String,
    /// invalid_request_error, authentication_error, not_found_error,
    /// rate_limit_error, server_error ...
    #[oai(rename = "type")]
    pub r#type: String,
    /// The request field at fault.
    #[oai(nullable)]
    pub param: Option<String>,
    #[oai(nullable)]
    pub code: Option<String>,
}

/// OpenAI's error shape.
#[derive(Debug, Clone, Object)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}
