//! Anthropic's Messages API shapes, field for field (requests also derive
//! `Deserialize`, for errors that name the failing field).
use super::schema::untagged_union;
use poem_openapi::{Enum, Object, Union};
use serde::Deserialize;
use serde_json::Value;

// ------------------------------------------------------------------ request

#[derive(Debug, Clone, Copy, Enum, Deserialize, PartialEq)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
#[oai(rename = "AnthropicRole")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicTextBlockParam")]
pub struct TextBlockParam {
    pub text: String,
    #[serde(default)]
    #[oai(nullable)]
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicImageBlockParam")]
pub struct ImageBlockParam {
    pub source: Value,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicToolUseBlockParam")]
pub struct ToolUseBlockParam {
    pub id: String,
    pub name: String,
    pub input: Value,
}

/// `tool_result` content: a string or text blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolResultContent {
    Text(String),
    Blocks(Vec<ContentBlockParam>),
}

untagged_union!(ToolResultContent, "AnthropicToolResultContent", "`tool_result` content: a string or content blocks.", { Text(String), Blocks(Vec<ContentBlockParam>) }, [
    String::schema_ref(),
    <Vec<ContentBlockParam>>::schema_ref(),
]);

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicToolResultBlockParam")]
pub struct ToolResultBlockParam {
    pub tool_use_id: String,
    #[serde(default)]
    #[oai(nullable)]
    pub content: Option<ToolResultContent>,
    #[serde(default)]
    #[oai(nullable)]
    pub is_error: Option<bool>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicThinkingBlockParam")]
pub struct ThinkingBlockParam {
    pub thinking: String,
    #[serde(default)]
    #[oai(nullable)]
    pub signature: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicRedactedThinkingBlockParam")]
pub struct RedactedThinkingBlockParam {
    pub data: String,
}

/// A content block of a request message.
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type")]
#[oai(rename = "AnthropicContentBlockParam")]
pub enum ContentBlockParam {
    #[oai(mapping = "text")]
    #[serde(rename = "text")]
    Text(TextBlockParam),
    #[oai(mapping = "image")]
    #[serde(rename = "image")]
    Image(ImageBlockParam),
    #[oai(mapping = "tool_use")]
    #[serde(rename = "tool_use")]
    ToolUse(ToolUseBlockParam),
    #[oai(mapping = "tool_result")]
    #[serde(rename = "tool_result")]
    ToolResult(ToolResultBlockParam),
    #[oai(mapping = "thinking")]
    #[serde(rename = "thinking")]
    Thinking(ThinkingBlockParam),
    #[oai(mapping = "redacted_thinking")]
    #[serde(rename = "redacted_thinking")]
    RedactedThinking(RedactedThinkingBlockParam),
}

/// A string or content blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContentParam {
    Text(String),
    Blocks(Vec<ContentBlockParam>),
}

untagged_union!(MessageContentParam, "AnthropicMessageContentParam", "A string or content blocks.", { Text(String), Blocks(Vec<ContentBlockParam>) }, [
    String::schema_ref(),
    <Vec<ContentBlockParam>>::schema_ref(),
]);

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicMessageParam")]
pub struct MessageParam {
    pub role: Role,
    pub content: MessageContentParam,
}

/// `system`: a string or text blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SystemParam {
    Text(String),
    Blocks(Vec<TextBlockParamTyped>),
}

untagged_union!(SystemParam, "AnthropicSystemParam", "`system`: a string or text blocks.", { Text(String), Blocks(Vec<TextBlockParamTyped>) }, [
    String::schema_ref(),
    <Vec<TextBlockParamTyped>>::schema_ref(),
]);

/// A `{"type": "text", "text": ...}` block (for `system`).
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type")]
#[oai(rename = "AnthropicTextBlockParamTyped")]
pub enum TextBlockParamTyped {
    #[oai(mapping = "text")]
    #[serde(rename = "text")]
    Text(TextBlockParam),
}

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
    #[serde(default, deserialize_with = "super::schema::bounded::unit")]
    #[oai(nullable, validator(minimum(value = "0"), maximum(value = "1")))]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[oai(nullable, validator(minimum(value = "0")))]
    pub top_k: Option<i64>,
    #[serde(default, deserialize_with = "super::schema::bounded::unit_open")]
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
    pub keep_alive: Option<super::openai::KeepAliveSpec>,
    // rmlx extension: the KV-cache families of this request (`KvCacheSpec`; a
    // doc comment here would wrap the union in an allOf that generated
    // clients cannot read).
    #[serde(default)]
    #[oai(nullable)]
    pub kv_cache: Option<super::kv_cache::KvCacheSpec>,
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

// ------------------------------------------------------------------ response

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicTextBlock")]
pub struct TextBlock {
    pub text: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicThinkingBlock")]
pub struct ThinkingBlock {
    pub thinking: String,
    pub signature: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicToolUseBlock")]
pub struct ToolUseBlock {
    pub id: String,
    pub name: String,
    pub input: Value,
}

/// A content block of a response.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
#[oai(rename = "AnthropicContentBlock")]
pub enum ContentBlock {
    #[oai(mapping = "text")]
    Text(TextBlock),
    #[oai(mapping = "thinking")]
    Thinking(ThinkingBlock),
    #[oai(mapping = "tool_use")]
    ToolUse(ToolUseBlock),
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "snake_case")]
#[oai(rename = "AnthropicStopReason")]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageUsage")]
pub struct MessageUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    #[oai(nullable)]
    pub cache_creation_input_tokens: Option<u32>,
    #[oai(nullable)]
    pub cache_read_input_tokens: Option<u32>,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "AnthropicMessageType")]
pub enum MessageType {
    Message,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "AnthropicAssistantRole")]
pub enum AssistantRole {
    Assistant,
}

/// A message (the response of POST /v1/messages).
#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessage")]
pub struct Message {
    pub id: String,
    #[oai(rename = "type")]
    pub r#type: MessageType,
    pub role: AssistantRole,
    pub content: Vec<ContentBlock>,
    pub model: String,
    #[oai(nullable)]
    pub stop_reason: Option<StopReason>,
    #[oai(nullable)]
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

// ------------------------------------------------------------------ stream events

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageStartEvent")]
pub struct MessageStartEvent {
    pub message: Message,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicContentBlockStartEvent")]
pub struct ContentBlockStartEvent {
    pub index: u32,
    pub content_block: ContentBlock,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicPingEvent")]
pub struct PingEvent {}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicTextDelta")]
pub struct TextDelta {
    pub text: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicThinkingDelta")]
pub struct ThinkingDelta {
    pub thinking: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicSignatureDelta")]
pub struct SignatureDelta {
    pub signature: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicInputJsonDelta")]
pub struct InputJsonDelta {
    pub partial_json: String,
}

#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
#[oai(rename = "AnthropicBlockDelta")]
pub enum BlockDelta {
    #[oai(mapping = "text_delta")]
    Text(TextDelta),
    #[oai(mapping = "thinking_delta")]
    Thinking(ThinkingDelta),
    #[oai(mapping = "signature_delta")]
    Signature(SignatureDelta),
    #[oai(mapping = "input_json_delta")]
    InputJson(InputJsonDelta),
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicContentBlockDeltaEvent")]
pub struct ContentBlockDeltaEvent {
    pub index: u32,
    pub delta: BlockDelta,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicContentBlockStopEvent")]
pub struct ContentBlockStopEvent {
    pub index: u32,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDeltaBody")]
pub struct MessageDeltaBody {
    #[oai(nullable)]
    pub stop_reason: Option<StopReason>,
    #[oai(nullable)]
    pub stop_sequence: Option<String>,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDeltaUsage")]
pub struct MessageDeltaUsage {
    pub output_tokens: u32,
    #[oai(nullable)]
    pub input_tokens: Option<u32>,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDeltaEvent")]
pub struct MessageDeltaEvent {
    pub delta: MessageDeltaBody,
    pub usage: MessageDeltaUsage,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageStopEvent")]
pub struct MessageStopEvent {}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorEvent")]
pub struct ErrorEvent {
    pub error: ErrorBody,
}

/// One server-sent event of a streamed message: `event: <type>` then
/// `data: {"type": <type>, ...}`. Order: message_start, then per block
/// content_block_start, content_block_delta..., content_block_stop (a ping
/// after the first start), message_delta, message_stop.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
#[oai(rename = "AnthropicStreamEvent")]
pub enum StreamEvent {
    #[oai(mapping = "message_start")]
    MessageStart(MessageStartEvent),
    #[oai(mapping = "content_block_start")]
    ContentBlockStart(ContentBlockStartEvent),
    #[oai(mapping = "ping")]
    Ping(PingEvent),
    #[oai(mapping = "content_block_delta")]
    ContentBlockDelta(ContentBlockDeltaEvent),
    #[oai(mapping = "content_block_stop")]
    ContentBlockStop(ContentBlockStopEvent),
    #[oai(mapping = "message_delta")]
    MessageDelta(MessageDeltaEvent),
    #[oai(mapping = "message_stop")]
    MessageStop(MessageStopEvent),
    #[oai(mapping = "error")]
    Error(ErrorEvent),
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart(_) => "message_start",
            StreamEvent::ContentBlockStart(_) => "content_block_start",
            StreamEvent::Ping(_) => "ping",
            StreamEvent::ContentBlockDelta(_) => "content_block_delta",
            StreamEvent::ContentBlockStop(_) => "content_block_stop",
            StreamEvent::MessageDelta(_) => "message_delta",
            StreamEvent::MessageStop(_) => "message_stop",
            StreamEvent::Error(_) => "error",
        }
    }
}

// ------------------------------------------------------------------ errors

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorBody")]
pub struct ErrorBody {
    /// invalid_request_error, authentication_error, not_found_error,
    /// request_too_large, rate_limit_error, api_error, overloaded_error
    #[oai(rename = "type")]
    pub r#type: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Enum, PartialEq)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "AnthropicErrorType")]
pub enum ErrorType {
    Error,
}

/// Anthropic's error shape.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorResponse")]
pub struct ErrorResponse {
    #[oai(rename = "type")]
    pub r#type: ErrorType,
    pub error: ErrorBody,
}
