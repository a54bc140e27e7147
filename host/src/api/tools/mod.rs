//! Streaming tool-call parsers for the formats models emit.
//!
//! A [`ToolParser`] takes the model's answer text (after reasoning has been split off) in
//! arbitrary deltas and turns it into [`ToolEvent`]s: plain text, and tool calls whose
//! arguments stream as JSON text. Text outside calls is passed through as soon as it cannot
//! be the start of a call marker; only a possible marker prefix is held back.
//!
//! Formats ([`ToolFormat`]), picked from the chat template's source by [`detect_format`]:
//! - Hermes / Qwen 2.5 / Qwen 3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
//! - Qwen3-Coder XML: `<tool_call>\n<function=name>\n<parameter=x>\nvalue\n</parameter>\n</function>\n</tool_call>`
//!   (both bodies are understood by both parsers: the `<tool_call>` parser looks at the body)
//! - Llama 3.x JSON: `{"name": ..., "parameters": {...}}` at the start of the answer or after
//!   `<|python_tag|>` (several calls separated by `;`); `<|python_tag|>name.call(k="v")`.
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3) and
//!   `[TOOL_CALLS]name[ARGS]{...}` (v11+, optionally `[CALL_ID]id` before `[ARGS]`).
//! - Gemma: Gemma 3's templates have no tool support; Google's function-calling guide has
//!   the model answer with a fenced `` ```tool_code `` block holding Python calls
//!   (`get_weather(city="Paris")`). FunctionGemma's `<start_function_call>call:name{k:<escape>v<escape>}<end_function_call>`
//!   and Gemma 4's `<|tool_call>call:name{k:<|"|>v<|"|>}<tool_call|>` are understood too.
//!
//! Feed the parser text decoded with special tokens kept (`skip_special = false`): several
//! markers (`<|python_tag|>`, `[TOOL_CALLS]`, `<start_function_call>`) are special tokens.

mod gemma;
mod hermes;
mod ids;
mod json_scan;
mod llama3;
mod mistral;
mod pyargs;
mod template_check;
mod xml;

#[cfg(test)]
mod tests;

use serde_json::Value;

pub use gemma::GemmaParser;
pub use hermes::HermesParser;
pub use llama3::Llama3Parser;
pub use ids::{anthropic_id, is_anthropic_id, template_call_id, with_anthropic_ids};
pub use mistral::MistralParser;
pub use template_check::{report_unrendered_tools, template_renders_tools};

/// One piece of parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Ordinary answer text (outside any tool call).
    Text(String),
    /// A tool call begins. `index` counts calls from 0 within one response.
    CallStart { index: usize, id: String, name: String },
    /// More of the call's arguments, as JSON text (concatenated: one JSON object).
    CallArgs { index: usize, delta: String },
    /// The call's arguments are complete.
    CallEnd { index: usize },
}

/// The tool-call syntax a model was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolFormat {
    /// `<tool_call>{"name": .., "arguments": ..}</tool_call>` (Hermes, Qwen 2.5, Qwen 3).
    Hermes,
    /// `<tool_call><function=name><parameter=k>v</parameter></function></tool_call>`.
    Qwen3Coder,
    /// `{"name": .., "parameters": ..}` (Llama 3.1/3.2/3.3 JSON tool calling).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": .., "arguments": ..}]` (Mistral v3 tokenizers).
    MistralV3,
    /// `[TOOL_CALLS]name[ARGS]{..}` (Mistral v11+ tokenizers).
    Mistral,
    /// `` ```tool_code\nname(k="v")\n``` `` (Gemma 3, prompt-defined).
    GemmaToolCode,
    /// `<start_function_call>call:name{k:<escape>v<escape>}<end_function_call>`.
    FunctionGemma,
    /// `<|tool_call>call:name{k:<|"|>v<|"|>}<tool_call|>`.
    Gemma4,
}

impl ToolFormat {
    /// A parser for this format.
    pub fn parser(self) -> Box<dyn ToolParser + Send> {
        match self {
            ToolFormat::Hermes => Box::new(HermesParser::new(ToolFormat::Hermes)),
            ToolFormat::Qwen3Coder => Box::new(HermesParser::new(ToolFormat::Qwen3Coder)),
            ToolFormat::Llama3Json => Box::new(Llama3Parser::new()),
            ToolFormat::MistralV3 | ToolFormat::Mistral => Box::new(MistralParser::new(self)),
            ToolFormat::GemmaToolCode | ToolFormat::FunctionGemma | ToolFormat::Gemma4 => {
                Box::new(GemmaParser::new(self))
            }
        }
    }
}

/// Picks the tool-call format from a chat template's source text. Templates without any
/// tool markers get [`ToolFormat::Hermes`] (the most widely trained format), except Gemma
/// templates (`<start_of_turn>`), which get [`ToolFormat::GemmaToolCode`].
pub fn detect_format(template_source: &str) -> ToolFormat {
    let t = template_source;
    if t.contains("<|tool_call>") && t.contains("<tool_call|>") {
        ToolFormat::Gemma4
    } else if t.contains("<start_function_call>") {
        ToolFormat::FunctionGemma
    } else if t.contains("<function=") {
        ToolFormat::Qwen3Coder
    } else if t.contains("[TOOL_CALLS]") {
        if t.contains("[ARGS]") {
            ToolFormat::Mistral
        } else {
            ToolFormat::MistralV3
        }
    } else if t.contains("<tool_call>") {
        ToolFormat::Hermes
    } else if t.contains("<|python_tag|>") || t.contains("ipython") {
        ToolFormat::Llama3Json
    } else if t.contains("<start_of_turn>") {
        ToolFormat::GemmaToolCode
    } else {
        ToolFormat::Hermes
    }
}

/// The parser for the tool-call format that a chat template implies ([`detect_format`]).
pub fn parser_for_template(template_source: &str) -> Box<dyn ToolParser + Send> {
    detect_format(template_source).parser()
}

/// A streaming tool-call parser. Feed answer text as it is generated; call
/// [`finish`](ToolParser::finish) once at the end. Events of one `feed` are coalesced
/// (adjacent `Text`, adjacent `CallArgs` of one call).
pub trait ToolParser {
    /// Parses more output text.
    fn feed(&mut self, delta: &str) -> Vec<ToolEvent>;
    /// End of output: flushes held-back text and closes an unterminated call.
    fn finish(&mut self) -> Vec<ToolEvent>;
    /// The tools of the request (the OpenAI `tools` array, or an array of bare function
    /// objects / Anthropic tools with `input_schema`): used to type XML parameter values
    /// and to tell a Llama JSON call from a JSON answer.
    fn set_tools(&mut self, _tools: &Value) {}
    /// The format this parser reads.
    fn format(&self) -> ToolFormat;
}

/// A tool call id: `call_` + 24 alphanumerics (OpenAI style); Mistral wants exactly 9.
/// The Anthropic API puts its own (`toolu_...`) on calls: [`with_anthropic_ids`].
pub(crate) fn new_call_id(format: ToolFormat) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    let mut rng = rand::rng();
    match format {
        ToolFormat::Mistral | ToolFormat::MistralV3 => Alphanumeric.sample_string(&mut rng, 9),
        _ => format!("call_{}", Alphanumeric.sample_string(&mut rng, 24)),
    }
}

/// The tool definitions of a request as `(name, parameters schema)`, accepting OpenAI
/// `{"type":"function","function":{..}}`, bare `{"name","parameters"}` and Anthropic
/// `{"name","input_schema"}` entries.
pub fn tool_schemas(tools: &Value) -> Vec<(String, Value)> {
    let Some(arr) = tools.as_array() else {
        return Vec::new();
    };
    arr.iter()
        .filter_map(|t| {
            let f = t.get("function").unwrap_or(t);
            let name = f.get("name")?.as_str()?.to_owned();
            let params = f
                .get("parameters")
                .or_else(|| f.get("input_schema"))
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
            Some((name, params))
        })
        .collect()
}

/// Appends `ev`, merging it into the previous event when both are text or args of one call.
pub(crate) fn push_event(out: &mut Vec<ToolEvent>, ev: ToolEvent) {
    match (out.last_mut(), ev) {
        (_, ToolEvent::Text(t)) if t.is_empty() => {}
        (_, ToolEvent::CallArgs { delta, .. }) if delta.is_empty() => {}
        (Some(ToolEvent::Text(prev)), ToolEvent::Text(t)) => prev.push_str(&t),
        (Some(ToolEvent::CallArgs { index: i, delta: prev }), ToolEvent::CallArgs { index, delta })
            if *i == index =>
        {
            prev.push_str(&delta)
        }
        (_, ev) => out.push(ev),
    }
}

/// Length in bytes of the longest suffix of `buf` that is a proper prefix of one of
/// `markers` (text that must be held back because a marker may be starting).
pub(crate) fn partial_marker_len(buf: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        let max = (m.len() - 1).min(buf.len());
        for k in (best + 1..=max).rev() {
            if buf.is_char_boundary(buf.len() - k) && m.is_char_boundary(k) && buf.ends_with(&m[..k])
            {
                best = k;
                break;
            }
        }
    }
    best
}

/// First occurrence of any marker: `(position, marker index)`, earliest position first.
pub(crate) fn find_any(buf: &str, markers: &[&str]) -> Option<(usize, usize)> {
    markers
        .iter()
        .enumerate()
        .filter_map(|(i, m)| buf.find(m).map(|p| (p, i)))
        .min_by_key(|&(p, i)| (p, std::cmp::Reverse(markers[i].len())))
}

/// Splits text for the scan state: everything that cannot start a marker is emitted, the
/// rest is kept in `buf`. Returns the emitted text.
pub(crate) fn take_safe_text(buf: &mut String, markers: &[&str]) -> String {
    let hold = partial_marker_len(buf, markers);
    let cut = buf.len() - hold;
    let text = buf[..cut].to_owned();
    buf.drain(..cut);
    text
}

/// Properties (name -> schema) of the named tool's parameters.
pub(crate) fn params_of<'a>(tools: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    tools
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, p)| p.get("properties"))
}

/// Emits a complete call (start, arguments, end) at once.
pub(crate) fn emit_whole_call(
    out: &mut Vec<ToolEvent>,
    format: ToolFormat,
    index: usize,
    name: String,
    args: &Value,
) {
    push_event(
        out,
        ToolEvent::CallStart {
            index,
            id: new_call_id(format),
            name,
        },
    );
    push_event(
        out,
        ToolEvent::CallArgs {
            index,
            delta: serde_json::to_string(args).unwrap_or_else(|_| "{}".into()),
        },
    );
    push_event(out, ToolEvent::CallEnd { index });
}
