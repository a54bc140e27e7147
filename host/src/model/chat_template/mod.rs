//! Hugging Face chat templates rendered with minijinja, following
//! `transformers.utils.chat_template_utils` (v5):
//!
//! * template source: `chat_template.jinja` in the model dir (plus
//!   `additional_chat_templates/*.jinja` as named templates) wins over
//!   `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`);
//!   `chat_template.json` (processor format, `{"chat_template": ...}`) is a last resort.
//!   With several templates, `tool_use` is used when tools are given and it exists, else
//!   `default`.
//! * environment: `trim_blocks` + `lstrip_blocks`, no autoescape, no trailing newline kept,
//!   Python string/dict methods via minijinja-contrib `pycompat`, loop controls
//!   (`break`/`continue`), `raise_exception(msg)`, `strftime_now(fmt)` (UTC), and a `tojson`
//!   filter equal to `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)`. `{% generation %}` blocks render their body. `{{ x }}` prints
//!   `None`/`True`/`False` and Python reprs of lists and dicts, as Jinja2 does.
//! * variables: the tokenizer's named special tokens (`bos_token`, `eos_token`, ...), then
//!   the caller's extra kwargs (e.g. `enable_thinking`), then `messages`, `tools` (None when
//!   absent, so `tools is defined` holds as in HF), `documents` and
//!   `add_generation_prompt`. Messages get HF's normalisation: keys whose value is `null`
//!   are dropped and reasoning is aliased (`reasoning_content` / `thinking` / `reasoning`).
//!
//! JSON key order matters for byte-identical renders (tool schemas go through `tojson`):
//! the `preserve_order` features of `serde_json` and `minijinja` keep insertion order.

use std::path::Path;

use anyhow::{Context, Result};
use minijinja::value::{from_args, Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, Value as JValue};
use serde_json::{Map, Value};

use super::tokenizer::{named_special_tokens, read_json_opt};

/// Errors from rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template called `raise_exception(msg)` (e.g. "Conversation roles must alternate").
    #[error("{0}")]
    Raised(String),
    /// The caller's input cannot be rendered (e.g. no messages).
    #[error("{0}")]
    InvalidInput(String),
    /// Any other template failure (syntax, type error, undefined value, ...).
    #[error("chat template error: {0}")]
    Render(String),
}

/// Options of one render. `extra` holds additional template kwargs (`enable_thinking`,
/// `date_string`, `tools_in_user_message`, `documents`, ...).
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub tools: Option<Value>,
    pub extra: Map<String, Value>,
}

impl RenderOptions {
    pub fn new(add_generation_prompt: bool) -> Self {
        Self {
            add_generation_prompt,
            ..Self::default()
        }
    }
    pub fn with_tools(mut self, tools: Value) -> Self {
        self.tools = Some(tools);
        self
    }
    pub fn with_kwarg(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }
}

/// A compiled chat template (one or several named ones) plus the special-token variables.
pub struct ChatTemplate {
    env: Environment<'static>,
    names: Vec<String>,
    special_tokens: Map<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("names", &self.names)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

const RAISE_MARKER: &str = "\u{1}raise_exception\u{1}";

impl ChatTemplate {
    /// Loads the chat template(s) of a model dir; `Ok(None)` if it has none.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Option<ChatTemplate>> {
        let dir = dir.as_ref();
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let stm = read_json_opt(&dir.join("special_tokens_map.json"))?;

        let mut templates: Vec<(String, String)> = Vec::new();
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let src = std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?;
            templates.push(("default".into(), src));
        }
        let extra_dir = dir.join("additional_chat_templates");
        if extra_dir.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(&extra_dir)
                .with_context(|| format!("reading {}", extra_dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                .collect();
            files.sort();
            for p in files {
                let name = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let src = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?;
                templates.push((name, src));
            }
        }
        if templates.is_empty() {
            if let Some(ct) = config.as_ref().and_then(|c| c.get("chat_template")) {
                templates = templates_from_json(ct);
            }
        }
        if templates.is_empty() {
            if let Some(ct) = read_json_opt(&dir.join("chat_template.json"))? {
                if let Some(ct) = ct.get("chat_template") {
                    templates = templates_from_json(ct);
                }
            }
        }
        if templates.is_empty() {
            return Ok(None);
        }
        let special = named_special_tokens(config.as_ref(), stm.as_ref())
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        Ok(Some(Self::from_templates(templates, special)?))
    }

    /// A single template (named `default`) from its source.
    pub fn from_source(source: &str, special_tokens: Map<String, Value>) -> Result<Self> {
        Self::from_templates(vec![("default".into(), source.into())], special_tokens)
    }

    /// Named templates (`default`, `tool_use`, ...) and the special-token variables
    /// (`{"bos_token": "<s>", ...}`).
    pub fn from_templates(
        templates: Vec<(String, String)>,
        special_tokens: Map<String, Value>,
    ) -> Result<Self> {
        let mut env = new_environment();
        let mut names = Vec::new();
        for (name, src) in templates {
            let src = rewrite_generation_tags(&src);
            env.add_template_owned(name.clone(), src).map_err(|e| {
                anyhow::anyhow!("compiling chat template {name:?}: {}", describe(&e))
            })?;
            names.push(name);
        }
        Ok(Self {
            env,
            names,
            special_tokens,
        })
    }

    /// Names of the available templates.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The special-token variables passed to the template.
    pub fn special_tokens(&self) -> &Map<String, Value> {
        &self.special_tokens
    }

    /// Sets (or overrides) a special-token variable such as `bos_token`.
    pub fn set_special_token(&mut self, name: &str, value: &str) {
        self.special_tokens
            .insert(name.into(), Value::String(value.into()));
    }

    fn pick(&self, has_tools: bool) -> &str {
        let has = |n: &str| self.names.iter().any(|x| x == n);
        if has_tools && has("tool_use") {
            "tool_use"
        } else if has("default") {
            "default"
        } else {
            // transformers errors here; a server is better off with the only/first template.
            &self.names[0]
        }
    }

    /// Renders `messages` (OpenAI-style `{role, content, tool_calls?, ...}` objects).
    pub fn render(
        &self,
        messages: &[Value],
        opts: &RenderOptions,
    ) -> Result<String, ChatTemplateError> {
        if messages.is_empty() {
            return Err(ChatTemplateError::InvalidInput(
                "Cannot apply chat template to an empty conversation. Provide at least one message.".into(),
            ));
        }
        let msgs: Vec<Value> = messages.iter().map(normalize_message).collect();

        let mut ctx = self.special_tokens.clone();
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let tools = opts
            .tools
            .clone()
            .or_else(|| opts.extra.get("tools").cloned())
            .unwrap_or(Value::Null);
        let documents = opts.extra.get("documents").cloned().unwrap_or(Value::Null);
        ctx.insert("messages".into(), Value::Array(msgs));
        ctx.insert("tools".into(), tools.clone());
        ctx.insert("documents".into(), documents);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(opts.add_generation_prompt),
        );

        let name = self.pick(!tools.is_null());
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        tmpl.render(JValue::from_serialize(&ctx)).map_err(classify)
    }
}

fn templates_from_json(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::String(s) => vec![("default".into(), s.clone())],
        Value::Array(items) => items
            .iter()
            .filter_map(|it| {
                let name = it.get("name")?.as_str()?;
                let t = it.get("template")?.as_str()?;
                Some((name.to_owned(), t.to_owned()))
            })
            .collect(),
        Value::Object(m) => m
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|t| (k.clone(), t.to_owned())))
            .collect(),
        _ => Vec::new(),
    }
}

/// HF's per-message normalisation: drop `null` values; alias reasoning fields.
fn normalize_message(m: &Value) -> Value {
    let Value::Object(obj) = m else {
        return m.clone();
    };
    let obj: Map<String, Value> = obj
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| obj.get(*k).cloned());
    match reasoning {
        None => Value::Object(obj),
        Some(r) => {
            // {"thinking": r, **message, "reasoning_content": r}
            let mut out = Map::new();
            out.insert("thinking".into(), r.clone());
            for (k, v) in obj {
                out.insert(k, v);
            }
            out.insert("reasoning_content".into(), r);
            Value::Object(out)
        }
    }
}

fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn classify(e: Error) -> ChatTemplateError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        if let Some(me) = err.downcast_ref::<Error>() {
            if let Some(msg) = me.detail().and_then(|d| d.strip_prefix(RAISE_MARKER)) {
                return ChatTemplateError::Raised(msg.to_owned());
            }
        }
        cur = err.source();
    }
    ChatTemplateError::Render(describe(&e))
}

fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(extra_methods);
    // Jinja2's `sequence` test is "has len() and []": true for strings and dicts too.
    env.add_test("sequence", |v: &JValue| {
        matches!(
            v.kind(),
            ValueKind::Seq | ValueKind::String | ValueKind::Map | ValueKind::Bytes
        )
    });
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(py_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Python methods missing from minijinja-contrib's pycompat, then pycompat itself.
fn extra_methods(
    state: &State,
    value: &JValue,
    method: &str,
    args: &[JValue],
) -> Result<JValue, Error> {
    if let Some(s) = value.as_str() {
        match method {
            "rsplit" => {
                let (sep, maxsplit): (Option<JValue>, Option<i64>) = from_args(args)?;
                let sep = sep.filter(|v| !v.is_none()).map(|v| v.to_string());
                let max = maxsplit.filter(|n| *n >= 0).map(|n| n as usize);
                let mut parts: Vec<String> = match &sep {
                    Some(sep) if sep.is_empty() => {
                        return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"))
                    }
                    Some(sep) => match max {
                        Some(n) => s.rsplitn(n + 1, sep.as_str()).map(str::to_owned).collect(),
                        None => s.rsplit(sep.as_str()).map(str::to_owned).collect(),
                    },
                    None => {
                        let words: Vec<&str> = s.split_whitespace().collect();
                        match max {
                            Some(n) if n < words.len() => {
                                // rejoin the leading words; Python keeps the original spacing
                                let keep = &words[words.len() - n..];
                                let mut head_end = s.trim_end().len();
                                for w in keep.iter().rev() {
                                    head_end = s[..head_end].rfind(w).unwrap_or(0);
                                }
                                let head = s[..head_end].trim_end();
                                let mut v: Vec<String> =
                                    keep.iter().rev().map(|w| w.to_string()).collect();
                                if !head.trim_start().is_empty() {
                                    v.push(head.trim_start().to_owned());
                                }
                                v
                            }
                            _ => words.iter().rev().map(|w| w.to_string()).collect(),
                        }
                    }
                };
                parts.reverse();
                return Ok(JValue::from(parts));
            }
            "removeprefix" => {
                let (p,): (String,) = from_args(args)?;
                return Ok(JValue::from(s.strip_prefix(p.as_str()).unwrap_or(s)));
            }
            "removesuffix" => {
                let (p,): (String,) = from_args(args)?;
                return Ok(JValue::from(s.strip_suffix(p.as_str()).unwrap_or(s)));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn raise_exception(msg: Option<JValue>) -> Result<JValue, Error> {
    let msg = match msg {
        Some(v) => v
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string()),
        None => String::new(),
    };
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_MARKER}{msg}"),
    ))
}

// ---------------------------------------------------------------------------------------
// `{% generation %}` (transformers' AssistantTracker): keep the body, drop the tags.

fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_owned();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        if let Some((len, replacement)) = match_generation_tag(tag) {
            out.push_str(&replacement);
            rest = &tag[len..];
        } else {
            out.push_str("{%");
            rest = &tag[2..];
        }
    }
    out.push_str(rest);
    out
}

/// Matches `{%[-+]? \s* (end)?generation \s* [-+]? %}` at the start of `s`.
fn match_generation_tag(s: &str) -> Option<(usize, String)> {
    let b = s.as_bytes();
    let mut i = 2;
    let mut open = String::from("{%");
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        open.push(b[i] as char);
        i += 1;
    }
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let (kw, repl) = if s[i..].starts_with("endgeneration") {
        ("endgeneration", "endif")
    } else if s[i..].starts_with("generation") {
        ("generation", "if true")
    } else {
        return None;
    };
    i += kw.len();
    if i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
        return None;
    }
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let mut close = String::new();
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        close.push(b[i] as char);
        i += 1;
    }
    if !s[i..].starts_with("%}") {
        return None;
    }
    i += 2;
    Some((i, format!("{open} {repl} {close}%}}")))
}

mod python;
mod time;
#[cfg(test)]
mod tests;

use python::{py_formatter, tojson_filter};
use time::strftime_now;
