//! Adapts `constrain` (token masks for JSON, JSON Schema, regex, grammars and
//! forced tool calls) and the thinking budget to the engine's logits hook.
use super::errors::ApiError;
use super::reasoning_adapter::ReasoningGate;
use super::types::openai::{ResponseFormat, ToolChoiceMode};
use crate::constrain::{Constraint, ConstraintFactory, ConstraintSpec};
use crate::engine::worker::{LogitsHook, ModelEntry};
use serde_json::{json, Value};

/// What may constrain a request's output.
#[derive(Default)]
pub struct HookSpec<'a> {
    pub tools: Option<&'a Value>,
    pub mode: Option<ToolChoiceMode>,
    /// tool_choice naming one function.
    pub named: Option<&'a str>,
    pub parallel_tool_calls: Option<bool>,
    pub format: Option<&'a ResponseFormat>,
    pub thinking_budget: Option<u32>,
    pub template_source: &'a str,
    pub rendered_prompt: &'a str,
}

struct Constrained(Constraint);

impl LogitsHook for Constrained {
    fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        self.0.try_apply(logits)
    }
    fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        self.0.commit(token)
    }
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

fn spec(s: &HookSpec<'_>) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    if matches!(s.mode, Some(ToolChoiceMode::Required)) {
        let tools = s.tools.cloned().unwrap_or(json!([]));
        let format = super::tools::detect_format(s.template_source);
        return Ok(Some((
            ConstraintSpec::ToolCall { format, tools, name: s.named.map(str::to_string), parallel: s.parallel_tool_calls.unwrap_or(false) },
            "tool_choice",
        )));
    }
    Ok(match s.format {
        None | Some(ResponseFormat::Text(_)) => None,
        Some(ResponseFormat::JsonObject(_)) => Some((ConstraintSpec::JsonObject, "response_format")),
        Some(ResponseFormat::JsonSchema(j)) => Some((
            ConstraintSpec::JsonSchema {
                schema: j.json_schema.schema.clone().unwrap_or(json!({})),
                strict: j.json_schema.strict.unwrap_or(false),
            },
            "response_format",
        )),
        Some(ResponseFormat::Regex(r)) => Some((ConstraintSpec::Regex(r.regex.clone()), "response_format")),
        Some(ResponseFormat::Grammar(g)) => Some((ConstraintSpec::Lark(g.grammar.clone()), "response_format")),
    })
}

/// The logits hook a request needs (None: unconstrained). Bad schemas or
/// grammars are a 400 naming the field. With a thinking model (its template
/// writes `<think>` and the prompt leaves thinking on) the constraint starts
/// after the thinking block, and a thinking budget closes the block; see
/// [`ReasoningGate`].
pub fn hook(entry: &ModelEntry, s: HookSpec<'_>) -> Result<Option<Box<dyn LogitsHook>>, ApiError> {
    let need = spec(&s)?;
    if need.is_none() && s.thinking_budget.is_none() {
        return Ok(None);
    }
    let text = entry.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let tok = text.tokenizer.as_ref();
    let mut inner: Option<Box<dyn LogitsHook>> = None;
    if let Some((cs, field)) = need {
        let tok = tok.ok_or_else(|| ApiError::bad_request(field, "constrained output needs a model with a tokenizer"))?;
        let factory = ConstraintFactory::for_tokenizer(tok, &text.eos_ids).map_err(|e| ApiError::internal(format!("{e:#}")))?;
        let c = factory.constraint(&cs).map_err(|e| ApiError::bad_request(field, format!("{e:#}")))?;
        inner = Some(Box::new(Constrained(c)));
    }
    let Some(tok) = tok else { return Ok(inner) };
    Ok(match ReasoningGate::new(s.template_source, s.rendered_prompt, tok, &text.eos_ids, s.thinking_budget, inner) {
        Ok(gate) => Some(Box::new(gate)),
        Err(inner) => inner,
    })
}
