//! Gemma tool calls. Gemma 3's chat template has no tool support; Google's guide for it has
//! the model write Python calls in a fenced block, `` ```tool_code\nget_weather(city="Paris")\n``` ``.
//! FunctionGemma writes `<start_function_call>call:name{k:<escape>v<escape>,n:3}<end_function_call>`
//! and Gemma 4 `<|tool_call>call:name{k:<|"|>v<|"|>}<tool_call|>`. All three are recognised;
//! each call is emitted whole when its block closes.

use serde_json::{Map, Value};

use super::{emit_whole_call, find_any, push_event, take_safe_text, ToolEvent, ToolFormat, ToolParser};

/// (open, close, string delimiter for `call:` syntax; None = Python syntax)
const BLOCKS: [(&str, &str, Option<&str>); 3] = [
    ("```tool_code", "```", None),
    ("<start_function_call>", "<end_function_call>", Some("<escape>")),
    ("<|tool_call>", "<tool_call|>", Some("<|\"|>")),
];

pub struct GemmaParser {
    format: ToolFormat,
    buf: String,
    /// Inside block `i`.
    block: Option<usize>,
    index: usize,
}

impl GemmaParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            buf: String::new(),
            block: None,
            index: 0,
        }
    }

    fn opens() -> [&'static str; 3] {
        [BLOCKS[0].0, BLOCKS[1].0, BLOCKS[2].0]
    }

    fn emit_block(&mut self, b: usize, body: &str, out: &mut Vec<ToolEvent>) {
        let parsed = match BLOCKS[b].2 {
            None => super::pyargs::parse_calls(body.trim()),
            Some(delim) => parse_call_syntax(body.trim(), delim),
        };
        match parsed {
            Ok(calls) => {
                for (name, args) in calls {
                    emit_whole_call(out, self.format, self.index, name, &args);
                    self.index += 1;
                }
            }
            Err(_) => {
                let (open, close, _) = BLOCKS[b];
                push_event(out, ToolEvent::Text(format!("{open}{body}{close}")));
            }
        }
    }

    fn run(&mut self, out: &mut Vec<ToolEvent>) {
        loop {
            match self.block {
                None => match find_any(&self.buf, &Self::opens()) {
                    Some((p, b)) => {
                        let text: String = self.buf.drain(..p).collect();
                        push_event(out, ToolEvent::Text(text));
                        self.buf.drain(..BLOCKS[b].0.len());
                        self.block = Some(b);
                    }
                    None => {
                        let t = take_safe_text(&mut self.buf, &Self::opens());
                        push_event(out, ToolEvent::Text(t));
                        return;
                    }
                },
                Some(b) => match self.buf.find(BLOCKS[b].1) {
                    Some(p) => {
                        let body: String = self.buf.drain(..p).collect();
                        self.buf.drain(..BLOCKS[b].1.len());
                        self.block = None;
                        self.emit_block(b, &body, out);
                    }
                    None => return,
                },
            }
        }
    }
}

impl ToolParser for GemmaParser {
    fn feed(&mut self, delta: &str) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.buf.push_str(delta);
        self.run(&mut out);
        out
    }

    fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.run(&mut out);
        let buf = std::mem::take(&mut self.buf);
        match self.block.take() {
            None => push_event(&mut out, ToolEvent::Text(buf)),
            Some(b) => {
                let parsed = match BLOCKS[b].2 {
                    None => super::pyargs::parse_calls(buf.trim()),
                    Some(delim) => parse_call_syntax(buf.trim(), delim),
                };
                match parsed {
                    Ok(calls) => {
                        for (name, args) in calls {
                            emit_whole_call(&mut out, self.format, self.index, name, &args);
                            self.index += 1;
                        }
                    }
                    Err(_) => {
                        push_event(&mut out, ToolEvent::Text(format!("{}{buf}", BLOCKS[b].0)))
                    }
                }
            }
        }
        out
    }

    fn format(&self) -> ToolFormat {
        self.format
    }
}

/// `call:name{k:v,...}` (one or more), with strings wrapped in `delim`.
pub(crate) fn parse_call_syntax(s: &str, delim: &str) -> Result<Vec<(String, Value)>, String> {
    let mut calls = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        rest = rest.strip_prefix("call:").ok_or("expected call:")?;
        let brace = rest.find('{').ok_or("expected {")?;
        let name = rest[..brace].trim().to_owned();
        let mut i = brace;
        let v = value(rest, &mut i, delim)?;
        calls.push((name, v));
        rest = rest[i..].trim_start_matches(|c: char| c.is_whitespace() || c == ',' || c == ';');
    }
    if calls.is_empty() {
        return Err("no calls".into());
    }
    Ok(calls)
}

fn value(s: &str, i: &mut usize, delim: &str) -> Result<Value, String> {
    let skip_ws = |i: &mut usize| {
        while s[*i..].starts_with(char::is_whitespace) {
            *i += s[*i..].chars().next().unwrap().len_utf8();
        }
    };
    skip_ws(i);
    let r = &s[*i..];
    if let Some(after) = r.strip_prefix(delim) {
        let end = after.find(delim).ok_or("unterminated string")?;
        *i += delim.len() + end + delim.len();
        return Ok(Value::String(after[..end].to_owned()));
    }
    if r.starts_with('{') {
        *i += 1;
        let mut m = Map::new();
        loop {
            skip_ws(i);
            if s[*i..].starts_with('}') {
                *i += 1;
                break;
            }
            let r = &s[*i..];
            let colon = r.find(':').ok_or("expected :")?;
            let key = r[..colon].trim().trim_matches('"').to_owned();
            *i += colon + 1;
            let v = value(s, i, delim)?;
            m.insert(key, v);
            skip_ws(i);
            if s[*i..].starts_with(',') {
                *i += 1;
            }
        }
        return Ok(Value::Object(m));
    }
    if r.starts_with('[') {
        *i += 1;
        let mut a = Vec::new();
        loop {
            skip_ws(i);
            if s[*i..].starts_with(']') {
                *i += 1;
                break;
            }
            a.push(value(s, i, delim)?);
            skip_ws(i);
            if s[*i..].starts_with(',') {
                *i += 1;
            }
        }
        return Ok(Value::Array(a));
    }
    let end = r.find([',', '}', ']']).unwrap_or(r.len());
    if end == 0 {
        return Err("expected a value".into());
    }
    let tok = r[..end].trim();
    *i += end;
    Ok(serde_json::from_str(tok).unwrap_or_else(|_| Value::String(tok.to_owned())))
}
