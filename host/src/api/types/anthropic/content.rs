//! A request's messages: roles, content blocks (text, image, tool use and
//! result, thinking), message content and `system`.
use crate::api::types::schema::untagged_union;
use poem_openapi::{Enum, Object, Union};
use serde::Deserialize;
use serde_json::Value;

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
