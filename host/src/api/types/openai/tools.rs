//! Tools: the functions a request offers, `tool_choice`, and the tool calls
//! an assistant message carries.
use crate::api::types::schema::untagged_union;
use poem_openapi::{Enum, Object};
use serde::Deserialize;
use serde_json::Value;

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
