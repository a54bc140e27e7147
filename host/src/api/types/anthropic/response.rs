//! The response of POST /v1/messages: a message and its content blocks.
use poem_openapi::{Enum, Object, Union};
use serde_json::Value;

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
    /// rmlx extension: draft tokens speculative decoding proposed (only
    /// when the model has a draft model and the request did not turn it off).
    #[oai(skip_serializing_if_is_none)]
    pub drafted_tokens: Option<u32>,
    /// rmlx extension: draft tokens the model kept (at most `drafted_tokens`).
    #[oai(skip_serializing_if_is_none)]
    pub accepted_tokens: Option<u32>,
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
