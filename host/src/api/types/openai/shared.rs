//! Shapes shared by chat completions and completions: `stop`, stream
//! options, `keep_alive` and token usage.
use crate::api::limits::{MAX_KEEP_ALIVE_SECS, MAX_STOP, MAX_STOP_BYTES};
use crate::api::types::schema::untagged_union;
use poem_openapi::{registry::{MetaSchema, MetaSchemaRef}, Object};
use serde::Deserialize;

/// `stop`: a string or up to 4 strings (rmlx takes any number).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

untagged_union!(StopSpec, "StopSpec", "`stop`: a string or up to 4 strings, each at most 256 bytes (UTF-8).", { One(String), Many(Vec<String>) }, [
    String::schema_ref().merge(MetaSchema { max_length: Some(MAX_STOP_BYTES), ..MetaSchema::ANY }),
    <Vec<String>>::schema_ref().merge(MetaSchema {
        max_items: Some(MAX_STOP),
        items: Some(Box::new(MetaSchemaRef::Inline(Box::new(MetaSchema { max_length: Some(MAX_STOP_BYTES), ..MetaSchema::ANY })))),
        ..MetaSchema::ANY
    }),
]);

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Object, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    #[oai(nullable)]
    pub include_usage: Option<bool>,
}

/// rmlx extension (as Ollama): how long the model stays loaded after this
/// request: seconds (0 unloads at once, negative keeps it forever) or a
/// duration string such as "10m", "1h", "30s".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum KeepAliveSpec {
    Seconds(f64),
    Duration(String),
}

untagged_union!(KeepAliveSpec, "KeepAliveSpec",
    "rmlx extension (as Ollama): how long the model stays loaded after this request: seconds \
     (0 unloads at once, -1 keeps it for good, at most ten years) or a duration string such as \
     \"10m\", \"1h30m\", \"30s\", \"-1\".", { Seconds(f64), Duration(String) }, [
    f64::schema_ref().merge(MetaSchema {
        minimum: Some(0.0),
        maximum: Some(MAX_KEEP_ALIVE_SECS as f64),
        ..MetaSchema::ANY
    }),
    MetaSchemaRef::Inline(Box::new(MetaSchema { enum_items: vec![(-1).into()], ..MetaSchema::new("number") })),
    String::schema_ref().merge(MetaSchema { pattern: Some(KEEP_ALIVE_PATTERN.into()), ..MetaSchema::ANY }),
]);

#[derive(Debug, Clone, Object)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// rmlx extension: draft tokens speculative decoding proposed (only
    /// when the model has a draft model and the request did not turn it off).
    #[oai(skip_serializing_if_is_none)]
    pub drafted_tokens: Option<u32>,
    /// rmlx extension: draft tokens the model kept (at most `drafted_tokens`;
    /// every completion token not kept from a draft came from the model).
    #[oai(skip_serializing_if_is_none)]
    pub accepted_tokens: Option<u32>,
}

impl Usage {
    /// `prompt` and `completion` tokens, and speculative decoding's counts
    /// (drafted, accepted) when it ran.
    pub fn new(prompt: u32, completion: u32, speculation: Option<(usize, usize)>) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            drafted_tokens: speculation.map(|s| s.0 as u32),
            accepted_tokens: speculation.map(|s| s.1 as u32),
        }
    }
}

/// Speculative decoding's counts (drafted, accepted) summed over generations.
pub fn add_speculation(acc: Option<(usize, usize)>, f: Option<(usize, usize)>) -> Option<(usize, usize)> {
    match (acc, f) {
        (Some(a), Some(b)) => Some((a.0 + b.0, a.1 + b.1)),
        (a, b) => a.or(b),
    }
}


/// What `limits::keep_alive` accepts as a string, kept inside its ten-year
/// bound: `-1` in any unit, a bare number of seconds (up to 8 digits), or up
/// to four number+unit parts of up to 4 digits each.
const KEEP_ALIVE_PATTERN: &str = r"^[ \t\r\n]*(-1(ms|s|m|h)?|\+?([0-9]{1,8}(\.[0-9]{0,6})?|\.[0-9]{1,6})|(([0-9]{1,4}(\.[0-9]{0,6})?|\.[0-9]{1,6})(ns|us|µs|ms|s|m|h)){1,4})[ \t\r\n]*$";
