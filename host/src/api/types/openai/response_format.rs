//! `response_format`: text, JSON (object or schema), and rmlx's regex and
//! grammar constraints.
use poem_openapi::{Object, Union};
use serde::Deserialize;
use serde_json::Value;

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
