//! Tool-call ids in each API's own shape: OpenAI's `call_` + 24
//! alphanumerics ([`super::new_call_id`]), Anthropic's `toolu_` + 24
//! ([`anthropic_id`], put on any parser's calls by [`with_anthropic_ids`]).
use super::{ToolEvent, ToolFormat, ToolParser};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;

/// Characters after `toolu_` (Anthropic's ids: `toolu_01A09q90qw90lq917835lq9`).
const ANTHROPIC_ID_LEN: usize = 24;

/// A tool-use id like Anthropic's: `toolu_` + 24 base62 characters.
pub fn anthropic_id() -> String {
    format!("toolu_{}", Alphanumeric.sample_string(&mut rand::rng(), ANTHROPIC_ID_LEN))
}

/// Whether `id` has the shape [`anthropic_id`] makes.
pub fn is_anthropic_id(id: &str) -> bool {
    id.strip_prefix("toolu_")
        .is_some_and(|r| r.len() == ANTHROPIC_ID_LEN && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The id a chat template is given for a tool call the client sends back:
/// an Anthropic id (`toolu_` + 24) as its last 9 characters, because
/// Mistral's templates accept only 9-character ids; any other id as it is.
/// The same id always maps to the same text, so a call and its result match.
pub fn template_call_id(id: &str) -> String {
    if is_anthropic_id(id) {
        id[id.len() - 9..].to_string()
    } else {
        id.to_string()
    }
}

/// `inner`, with every call's id replaced by an [`anthropic_id`] (the
/// Anthropic Messages API's `tool_use` blocks).
pub fn with_anthropic_ids(inner: Box<dyn ToolParser + Send>) -> Box<dyn ToolParser + Send> {
    Box::new(AnthropicIds(inner))
}

struct AnthropicIds(Box<dyn ToolParser + Send>);

fn rename(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    events
        .into_iter()
        .map(|e| match e {
            ToolEvent::CallStart { index, name, .. } => ToolEvent::CallStart { index, id: anthropic_id(), name },
            e => e,
        })
        .collect()
}

impl ToolParser for AnthropicIds {
    fn feed(&mut self, delta: &str) -> Vec<ToolEvent> {
        rename(self.0.feed(delta))
    }
    fn finish(&mut self) -> Vec<ToolEvent> {
        rename(self.0.finish())
    }
    fn set_tools(&mut self, tools: &Value) {
        self.0.set_tools(tools)
    }
    fn format(&self) -> ToolFormat {
        self.0.format()
    }
}
