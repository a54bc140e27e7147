//! A chat request's messages: content (a string or parts) and the turns by
//! `role`.
use super::tools::ToolCall;
use crate::api::types::schema::{tagged_union, untagged_union};
use poem_openapi::{Object, Union};
use serde::Deserialize;

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
