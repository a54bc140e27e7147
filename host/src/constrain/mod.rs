//! Constrained decoding with llguidance: token masks that make the output follow a JSON
//! schema, a regex, a Lark grammar, or a model's tool-call format.
//!
//! The token trie is built here from the host tokenizer's vocabulary (the
//! `toktrie_hf_tokenizers` adapter pins tokenizers 0.21), once per tokenizer and EOS set,
//! and cached ([`ConstraintFactory::for_tokenizer`]). Per request, [`Constraint::new`]
//! compiles the grammar (about a millisecond for typical schemas) and then, per step:
//! [`Constraint::apply`] masks the logits, [`Constraint::commit`] advances with the sampled
//! token, [`Constraint::is_finished`] says when nothing but EOS may follow.

mod cache;
mod closing;
mod constraint;
mod factory;
mod grammar;
pub mod limits;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_budget;
mod vocab;

use serde_json::Value;

use crate::api::tools::ToolFormat;

pub use constraint::Constraint;
pub use factory::ConstraintFactory;
pub use grammar::lark_for_tool_call;
pub use limits::SpecError;

/// What the output must follow.
#[derive(Debug, Clone)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against `schema`. `strict: false` ignores keywords llguidance does not
    /// support; `strict: true` rejects such schemas.
    JsonSchema { schema: Value, strict: bool },
    /// Text matching a regex (whole output).
    Regex(String),
    /// A Lark grammar (llguidance dialect: `%json {..}` and special tokens `<|x|>` allowed).
    Lark(String),
    /// One (or, with `parallel`, several) tool calls in the model's own format. `tools` is the
    /// request's tools array (OpenAI `{"type":"function","function":{..}}`, bare
    /// `{"name","parameters"}` or Anthropic `{"name","input_schema"}`); `name` fixes the
    /// function (`tool_choice` naming one), otherwise any of `tools` (`required`).
    ToolCall {
        format: ToolFormat,
        tools: Value,
        name: Option<String>,
        parallel: bool,
    },
}

impl ConstraintSpec {
    /// What the spec is, for messages ("the JSON schema", "the regex", ...).
    pub fn what(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonObject => "the JSON object format",
            ConstraintSpec::JsonSchema { .. } => "the JSON schema",
            ConstraintSpec::Regex(_) => "the regex",
            ConstraintSpec::Lark(_) => "the grammar",
            ConstraintSpec::ToolCall { .. } => "the tool call",
        }
    }

    /// The cache key: the spec's kind and options and its text as given (compact JSON,
    /// key order kept: llguidance writes properties in schema order, so a reordered schema
    /// is a different grammar).
    pub fn key(&self) -> String {
        match self {
            ConstraintSpec::JsonObject => "json_object".into(),
            ConstraintSpec::JsonSchema { schema, strict } => format!("json_schema:{strict}:{schema}"),
            ConstraintSpec::Regex(r) => format!("regex:{r}"),
            ConstraintSpec::Lark(g) => format!("lark:{g}"),
            ConstraintSpec::ToolCall { format, tools, name, parallel } => {
                format!("tool_call:{format:?}:{name:?}:{parallel}:{tools}")
            }
        }
    }
}
