//! Adapts `constrain` (token masks for JSON, JSON Schema, regex, grammars and
//! forced tool calls) and the thinking budget to the engine's logits hook.
use super::errors::ApiError;
use super::types::openai::{ResponseFormat, ToolChoiceMode};
use crate::engine::worker::{LogitsHook, ModelEntry};
use serde_json::Value;

/// What may constrain a request's output.
#[derive(Default)]
pub struct HookSpec<'a> {
    pub tools: Option<&'a Value>,
    pub mode: Option<ToolChoiceMode>,
    /// tool_choice naming one function.
    pub named: Option<&'a str>,
    pub format: Option<&'a ResponseFormat>,
    pub thinking_budget: Option<u32>,
    pub template_source: &'a str,
}

/// The logits hook a request needs (None: unconstrained).
pub fn hook(entry: &ModelEntry, spec: HookSpec<'_>) -> Result<Option<Box<dyn LogitsHook>>, ApiError> {
    let _ = entry;
    if spec.mode == Some(ToolChoiceMode::Required) {
        return Err(ApiError::bad_request("tool_choice", "`tool_choice: required` and named tools are not available yet"));
    }
    match spec.format {
        None | Some(ResponseFormat::Text(_)) => Ok(None),
        Some(_) => Err(ApiError::bad_request("response_format", "structured output is not available yet")),
    }
}
