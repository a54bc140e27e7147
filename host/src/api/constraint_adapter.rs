//! Adapts `constrain` (token masks for JSON, JSON Schema, regex, grammars and
//! forced tool calls) and the thinking budget to the engine's logits hook.
//!
//! The token trie and the compiled grammar come from `constrain`'s caches (per
//! model, and per model and spec text) and are built on the blocking pool,
//! never on the async runtime. The hook counts the tokens generated, so the
//! constraint knows how many of `max_tokens` are left and closes the output
//! in time (see `constrain::closing`).
use super::errors::ApiError;
use super::generation as g;
use super::reasoning_adapter::ReasoningGate;
use super::types::openai::{ResponseFormat, ToolChoiceMode};
use crate::constrain::{Constraint, ConstraintFactory, ConstraintSpec};
use crate::engine::worker::{LogitsHook, ModelEntry};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    /// The request's token budget (0: unknown, no closing in time).
    pub max_tokens: usize,
}

/// Tokens that may still be generated, as [`Counted`] (which counts every
/// token) hands it to [`Constrained`] (which may start after a thinking
/// block): `Counted` stores its own count before each `apply`, so a fork of
/// the hook (speculative decoding) shares the cell but not the count.
type Left = Arc<AtomicUsize>;

struct Constrained {
    c: Constraint,
    left: Left,
}

impl LogitsHook for Constrained {
    fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        match self.left.load(Ordering::Relaxed) {
            usize::MAX => self.c.try_apply(logits),
            left => self.c.try_apply_within(logits, left),
        }
    }
    fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        self.c.commit(token)
    }
    fn is_finished(&self) -> bool {
        self.c.is_finished()
    }
    fn fork(&self) -> Option<Box<dyn LogitsHook>> {
        Some(Box::new(Constrained { c: self.c.clone(), left: self.left.clone() }))
    }
}

/// The outermost hook: counts each generated token off the budget.
struct Counted {
    inner: Box<dyn LogitsHook>,
    left: Left,
    /// Tokens left (usize::MAX: no budget), stored into `left` before each `apply`.
    n: usize,
}

impl LogitsHook for Counted {
    fn apply(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        self.left.store(self.n, Ordering::Relaxed);
        self.inner.apply(logits)
    }
    fn commit(&mut self, token: u32) -> anyhow::Result<()> {
        if self.n != usize::MAX {
            self.n = self.n.saturating_sub(1);
        }
        self.left.store(self.n, Ordering::Relaxed);
        self.inner.commit(token)
    }
    fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
    fn fork(&self) -> Option<Box<dyn LogitsHook>> {
        Some(Box::new(Counted { inner: self.inner.fork()?, left: self.left.clone(), n: self.n }))
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

/// The logits hook a request needs (None: unconstrained). A schema, grammar
/// or tool list that cannot be used is a 400 naming the field, with a short
/// message (no parser internals). With a thinking model (its template writes
/// `<think>` and the prompt leaves thinking on) the constraint starts after
/// the thinking block, and a thinking budget closes the block; see
/// [`ReasoningGate`].
pub async fn hook(entry: &Arc<ModelEntry>, s: HookSpec<'_>) -> Result<Option<Box<dyn LogitsHook>>, ApiError> {
    let need = spec(&s)?;
    if need.is_none() && s.thinking_budget.is_none() {
        return Ok(None);
    }
    let n = if s.max_tokens == 0 { usize::MAX } else { s.max_tokens };
    let left: Left = Arc::new(AtomicUsize::new(n));
    let e = entry.clone();
    // Loading the tokenizer, building the trie and compiling block: cached, off the runtime.
    let (text, c) = g::blocking(move || {
        let text = e.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
        let Some((cs, field)) = need else { return Ok((text, None)) };
        let tok = text
            .tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad_request(field, "constrained output needs a model with a tokenizer"))?;
        let factory = ConstraintFactory::for_model(&e.id, tok, &text.eos_ids).map_err(|e| ApiError::internal(format!("{e:#}")))?;
        let c = factory.constraint_cached(&e.id, &cs).map_err(|err| {
            let param = match &cs {
                ConstraintSpec::ToolCall { .. } if !err.0.contains("tool_choice") => "tools",
                _ => field,
            };
            ApiError::bad_request(param, format!("`{param}`: {err}"))
        })?;
        Ok((text, Some(c)))
    })
    .await?;
    let mut inner: Option<Box<dyn LogitsHook>> = c.map(|c| Box::new(Constrained { c, left: left.clone() }) as Box<dyn LogitsHook>);
    if let Some(tok) = text.tokenizer.as_ref() {
        inner = match ReasoningGate::new(s.template_source, s.rendered_prompt, tok, &text.eos_ids, s.thinking_budget, inner) {
            Ok(gate) => Some(Box::new(gate)),
            Err(inner) => inner,
        };
    }
    Ok(inner.map(|inner| Box::new(Counted { inner, left, n }) as Box<dyn LogitsHook>))
}
