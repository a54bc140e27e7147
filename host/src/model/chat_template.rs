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

// ---------------------------------------------------------------------------------------
// Output formatting as Jinja2/Python prints values.

fn py_formatter(out: &mut Output, state: &State, value: &JValue) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(Error::from),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(Error::from),
        ValueKind::Number if !value.is_integer() => {
            let mut s = String::new();
            push_number(value, &mut s);
            out.write_str(&s).map_err(Error::from)
        }
        ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            if py_repr(value, &mut s).is_ok() {
                out.write_str(&s).map_err(Error::from)
            } else {
                minijinja::escape_formatter(out, state, value)
            }
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn py_repr(v: &JValue, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => push_number(v, out),
        ValueKind::String => py_str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, k) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&k, out)?;
                out.push_str(": ");
                py_repr(&v.get_item(&k)?, out)?;
            }
            out.push('}');
        }
        ValueKind::Undefined => return Err(Error::new(ErrorKind::UndefinedError, "undefined")),
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa1).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() || matches!(c as u32, 0xad | 0x2028 | 0x2029 | 0xfeff) => {
                let n = c as u32;
                if n <= 0xffff {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

// ---------------------------------------------------------------------------------------
// tojson = json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn tojson_filter(value: &JValue, args: Rest<JValue>) -> Result<JValue, Error> {
    // positional order of transformers' tojson(x, ensure_ascii, indent, separators, sort_keys)
    type Args = (
        Option<JValue>,
        Option<JValue>,
        Option<JValue>,
        Option<JValue>,
        Kwargs,
    );
    let (ensure_ascii, indent, separators, sort_keys, kwargs): Args = from_args(&args)?;
    let pick = |pos: Option<JValue>, name: &str| -> Result<Option<JValue>, Error> {
        let kw: Option<JValue> = kwargs.get(name)?;
        Ok(kw.or(pos))
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an int or a string",
                    )
                })?;
                " ".repeat(n.max(0) as usize)
            }
        }),
    };
    let (mut item_sep, mut key_sep) = if indent.is_some() {
        (",".to_owned(), ": ".to_owned())
    } else {
        (", ".to_owned(), ": ".to_owned())
    };
    if let Some(seps) = pick(separators, "separators")? {
        if !seps.is_none() && !seps.is_undefined() {
            let parts: Vec<JValue> = seps.try_iter()?.collect();
            if parts.len() != 2 {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair",
                ));
            }
            item_sep = parts[0].as_str().unwrap_or_default().to_owned();
            key_sep = parts[1].as_str().unwrap_or_default().to_owned();
        }
    }
    let sort_keys = pick(sort_keys, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(JValue::from(out))
}

fn newline_indent(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(v: &JValue, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => push_number(v, out),
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Bytes => json_str(
            &String::from_utf8_lossy(v.as_bytes().unwrap_or_default()),
            opts.ensure_ascii,
            out,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JValue> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, JValue)> = Vec::new();
            for k in v.try_iter()? {
                let item = v.get_item(&k)?;
                entries.push((json_key(&k)?, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(opts, level + 1, out);
                json_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        ValueKind::Undefined => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "Object of type Undefined is not JSON serializable",
            ))
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {} is not JSON serializable", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's json key coercion: str as is, True/False/None -> true/false/null, numbers repr.
fn json_key(k: &JValue) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number => {
            let mut s = String::new();
            push_number(k, &mut s);
            s
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "keys must be str, int, float, bool or None, not {}",
                    k.kind()
                ),
            ))
        }
    })
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python `repr` of an int / float (`1.0`, `1e-05`, `1e+16`, `inf`).
fn push_number(v: &JValue, out: &mut String) {
    if v.is_integer() {
        out.push_str(&v.to_string());
        return;
    }
    match f64::try_from(v.clone()) {
        Ok(f) => out.push_str(&py_float_repr(f)),
        Err(_) => out.push_str(&v.to_string()),
    }
}

pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Shortest round-trip digits and decimal exponent from Rust's `{:e}`.
    let sci = format!("{:e}", f.abs());
    let (mant, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if f < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

// ---------------------------------------------------------------------------------------
// strftime_now(fmt): Python's datetime.now().strftime(fmt), in UTC.

fn strftime_now(fmt: String) -> Result<JValue, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JValue::from(strftime_utc(
        &fmt,
        now.as_secs() as i64,
        now.subsec_micros(),
    )))
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days -> (y, m, d)
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub(crate) fn strftime_utc(fmt: &str, unix_secs: i64, micros: u32) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + u32::from(is_leap && m > 2);
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |n: i64, w: usize| {
            if no_pad {
                n.to_string()
            } else {
                format!("{n:0w$}")
            }
        };
        let s = match spec {
            'Y' => y.to_string(),
            'y' => num(y.rem_euclid(100), 2),
            'm' => num(m as i64, 2),
            'd' => num(d as i64, 2),
            'e' => format!("{d:>2}"),
            'H' => num(hh, 2),
            'I' => num(h12, 2),
            'M' => num(mm, 2),
            'S' => num(ss, 2),
            'f' => format!("{micros:06}"),
            'j' => num(yday as i64, 3),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_owned(),
            'b' | 'h' => MONTHS[(m - 1) as usize][..3].to_owned(),
            'B' => MONTHS[(m - 1) as usize].to_owned(),
            'a' => DAYS[wd][..3].to_owned(),
            'A' => DAYS[wd].to_owned(),
            'w' => ((wd + 1) % 7).to_string(),
            'u' => (wd + 1).to_string(),
            'Z' => "UTC".to_owned(),
            'z' => "+0000".to_owned(),
            'F' => format!("{y}-{m:02}-{d:02}"),
            'D' => format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            'T' => format!("{hh:02}:{mm:02}:{ss:02}"),
            'R' => format!("{hh:02}:{mm:02}"),
            'c' => format!(
                "{} {} {d:>2} {hh:02}:{mm:02}:{ss:02} {y}",
                &DAYS[wd][..3],
                &MONTHS[(m - 1) as usize][..3]
            ),
            'x' => format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            'X' => format!("{hh:02}:{mm:02}:{ss:02}"),
            '%' => "%".to_owned(),
            other => format!("%{}{other}", if no_pad { "-" } else { "" }),
        };
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
    }

    fn expected() -> Value {
        let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn render_str(src: &str, ctx: Value) -> Result<String, ChatTemplateError> {
        let t = ChatTemplate::from_source(src, Map::new()).unwrap();
        let mut opts = RenderOptions::default();
        if let Value::Object(m) = ctx {
            opts.extra = m;
        }
        t.render(
            &[serde_json::json!({"role": "user", "content": "x"})],
            &opts,
        )
    }

    #[test]
    fn json_key_order_is_preserved() {
        // Byte-identical tool renders need insertion-ordered JSON objects end to end.
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": 2}"#).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["b", "a"],
            "enable serde_json's `preserve_order` feature"
        );
        let out = render_str("{{ x | tojson }}", serde_json::json!({"x": v})).unwrap();
        assert_eq!(
            out, r#"{"b": 1, "a": 2}"#,
            "enable minijinja's `preserve_order` feature"
        );
    }

    #[test]
    fn renders_match_transformers() {
        let exp = expected();
        let mut n = 0;
        for (model, m) in exp["models"].as_object().unwrap() {
            let dir = fixtures().join(model);
            let t = ChatTemplate::from_model_dir(&dir)
                .unwrap()
                .expect("template");
            let tok = super::super::tokenizer::test_tokenizer(model);
            for case in m["chat"].as_array().unwrap() {
                let name = case["name"].as_str().unwrap();
                let messages = case["messages"].as_array().unwrap();
                let opts = RenderOptions {
                    add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                    tools: case.get("tools").filter(|t| !t.is_null()).cloned(),
                    extra: case
                        .get("kwargs")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                };
                let got = if case.get("template").and_then(Value::as_str)
                    == Some("tokenizer_config.json")
                {
                    // render the tokenizer_config.json template that chat_template.jinja shadows
                    let cfg = read_json_opt(&dir.join("tokenizer_config.json"))
                        .unwrap()
                        .unwrap();
                    let src = cfg["chat_template"].as_str().unwrap();
                    ChatTemplate::from_source(src, t.special_tokens().clone())
                        .unwrap()
                        .render(messages, &opts)
                } else {
                    t.render(messages, &opts)
                };
                if let Some(want) = case.get("expected").and_then(Value::as_str) {
                    let got = got.unwrap_or_else(|e| panic!("{model}/{name}: {e}"));
                    assert_eq!(got, want, "{model}/{name}");
                    let ids = tok.encode(&got, false).unwrap();
                    let want_ids: Vec<u32> = case["expected_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect();
                    assert_eq!(ids, want_ids, "{model}/{name} ids");
                } else {
                    let want = case["expected_error"].as_str().unwrap();
                    match got {
                        Err(ChatTemplateError::Raised(msg)) => {
                            assert_eq!(msg, want, "{model}/{name}")
                        }
                        other => panic!("{model}/{name}: expected raise_exception, got {other:?}"),
                    }
                }
                n += 1;
            }
        }
        assert!(n >= 13, "only {n} cases");
    }

    #[test]
    fn template_sources() {
        // chat_template.jinja wins over tokenizer_config.json (llama3_1 fixture has both).
        let t = ChatTemplate::from_model_dir(fixtures().join("llama3_1"))
            .unwrap()
            .unwrap();
        let out = t
            .render(
                &[serde_json::json!({"role": "user", "content": "hi"})],
                &RenderOptions::new(true),
            )
            .unwrap();
        assert!(out.contains("Cutting Knowledge Date"), "{out}");
        assert_eq!(t.special_tokens()["bos_token"], "<|begin_of_text|>");

        let tmp = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_model_dir(tmp.path()).unwrap().is_none());
        std::fs::write(
            tmp.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
                "chat_template": [
                  {"name": "default", "template": "D{{ bos_token }}{{ messages|length }}"},
                  {"name": "tool_use", "template": "T{{ tools|length }}{{ eos_token }}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(tmp.path()).unwrap().unwrap();
        let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "D<s>1");
        let opts = RenderOptions::default().with_tools(serde_json::json!([{"a": 1}, {"b": 2}]));
        assert_eq!(t.render(&msgs, &opts).unwrap(), "T2</s>");

        // processor-style chat_template.json as a last resort
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("chat_template.json"),
            r#"{"chat_template": "J{{ messages[0].content }}"}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(tmp.path()).unwrap().unwrap();
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "Jhi");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let v = serde_json::json!({
            "s": "é \"q\" \\ \n\t\u{1} 中 🙂 </script>", "i": 1, "f": 21.5, "small": 0.00001,
            "big": 1e16, "whole": 3.0, "neg": -2, "n": null, "t": true, "l": [], "d": {}, "nested": [1, [2, {"k": "v"}]]
        });
        let ctx = serde_json::json!({"v": v});
        // json.dumps(v, ensure_ascii=False)
        assert_eq!(
            render_str("{{ v | tojson }}", ctx.clone()).unwrap(),
            r#"{"s": "é \"q\" \\ \n\t\u0001 中 🙂 </script>", "i": 1, "f": 21.5, "small": 1e-05, "big": 1e+16, "whole": 3.0, "neg": -2, "n": null, "t": true, "l": [], "d": {}, "nested": [1, [2, {"k": "v"}]]}"#
        );
        // json.dumps(v["nested"], indent=2)
        assert_eq!(
            render_str("{{ v.nested | tojson(indent=2) }}", ctx.clone()).unwrap(),
            "[\n  1,\n  [\n    2,\n    {\n      \"k\": \"v\"\n    }\n  ]\n]"
        );
        // ensure_ascii / separators / sort_keys
        assert_eq!(
            render_str(
                "{{ {'b': 'é🙂', 'a': 1} | tojson(ensure_ascii=true, separators=(',', ':'), sort_keys=true) }}",
                ctx.clone()
            )
            .unwrap(),
            r#"{"a":1,"b":"\u00e9\ud83d\ude42"}"#
        );
        assert_eq!(py_float_repr(1e15), "1000000000000000.0");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(
            py_float_repr(123456789012345678.0),
            "1.2345678901234568e+17"
        );
        assert_eq!(py_float_repr(-0.5), "-0.5");
    }

    #[test]
    fn python_compat_features() {
        let ctx = serde_json::json!({"s": "  a,b,c  ", "flag": false, "items": [1, 2, 3, 4], "m": {"x": 1, "y": null}});
        let r = |src: &str| render_str(src, ctx.clone()).unwrap();
        assert_eq!(
            r("{{ s.strip().split(',')[-1] }}|{{ s.lstrip() }}|{{ s.startswith('  a') }}"),
            "c|a,b,c  |True"
        );
        assert_eq!(
            r("{{ 'x'.upper() }}{{ 'AbC'.lower() }}{{ 'a-b'.replace('-', '+') }}"),
            "Xabca+b"
        );
        assert_eq!(
            r("{{ none }}|{{ true }}|{{ flag }}|{{ [1, 'a', none] }}|{{ m }}"),
            "None|True|False|[1, 'a', None]|{'x': 1, 'y': None}"
        );
        assert_eq!(
            r("{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}"),
            "x=1;y=None;"
        );
        assert_eq!(r("{{ m.get('x') }}{{ m.get('z', 'd') }}"), "1d");
        assert_eq!(
            r("{% for i in items %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"),
            "12"
        );
        assert_eq!(r("{% for i in items %}{% if i is even %}{% continue %}{% endif %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}"), "1,3,");
        assert_eq!(r("{{ items[::-1] }}{{ items[1:3] }}"), "[4, 3, 2, 1][2, 3]");
        assert_eq!(r("{% if flag is false %}F{% endif %}{% if undefined_thing is not defined %}U{% endif %}"), "FU");
        assert_eq!(r("{% set ns = namespace(n=0) %}{% for i in items %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"), "10");
        // trim_blocks + lstrip_blocks
        assert_eq!(r("a\n    {% if true %}\nb\n    {% endif %}\nc"), "a\nb\nc");
        // trailing newline of the template is dropped, as in Jinja2
        assert_eq!(r("x\n"), "x");
        // {% generation %} blocks render their body
        assert_eq!(
            r("A{% generation %}B{% endgeneration %}C{%- generation -%} D {%- endgeneration %}"),
            "ABCD"
        );
    }

    #[test]
    fn raise_exception_is_a_clean_error() {
        let err = render_str(
            "{{ raise_exception('Only user and assistant roles are supported!') }}",
            Value::Null,
        )
        .unwrap_err();
        assert!(matches!(err, ChatTemplateError::Raised(_)));
        assert_eq!(
            err.to_string(),
            "Only user and assistant roles are supported!"
        );
        let err = ChatTemplate::from_source("{{ foo( }}", Map::new()).unwrap_err();
        assert!(err.to_string().contains("syntax error"), "{err}");
        let err = render_str("{{ 1 + 'a' }}", Value::Null).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
        let t = ChatTemplate::from_source("x", Map::new()).unwrap();
        assert!(matches!(
            t.render(&[], &RenderOptions::default()),
            Err(ChatTemplateError::InvalidInput(_))
        ));
    }

    #[test]
    fn message_normalisation() {
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{{ m.role }}:{{ m.content is defined }}:{{ m.reasoning_content }}|{{ m.thinking }};{% endfor %}",
            Map::new(),
        )
        .unwrap();
        let msgs = [
            serde_json::json!({"role": "user", "content": "q"}),
            serde_json::json!({"role": "assistant", "content": null, "reasoning": "hmm", "tool_calls": null}),
        ];
        assert_eq!(
            t.render(&msgs, &RenderOptions::default()).unwrap(),
            "user:True:|;assistant:False:hmm|hmm;"
        );
        let t = ChatTemplate::from_source(
            "{{ tools is defined }}{{ tools is none }}{{ documents is none }}",
            Map::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs[..1], &RenderOptions::default()).unwrap(),
            "TrueTrueTrue"
        );
    }

    #[test]
    fn strftime() {
        // 2024-07-26 13:05:09 UTC, a Friday
        let ts = 1_721_999_109;
        assert_eq!(strftime_utc("%d %b %Y", ts, 0), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %A %B %j %p %I %-d %%", ts, 0),
            "2024-07-26 13:05:09 Friday July 208 PM 01 26 %"
        );
        assert_eq!(
            strftime_utc("%F %T %a %u %w", 0, 0),
            "1970-01-01 00:00:00 Thu 4 4"
        );
        let out = render_str("{{ strftime_now('%Y') }}", Value::Null).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.starts_with("20"));
    }
}
