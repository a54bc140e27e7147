//! `<tool_call>...</tool_call>` parser (Hermes / Qwen JSON bodies and Qwen3-Coder XML
//! bodies; a bare `<function=...>...</function>` outside a wrapper is accepted too).
//!
//! When the request declares tools, an answer that *starts* with a bare call object
//! `{"name": <a declared tool>, "arguments": {...}}` (no `<tool_call>` around it) is a
//! call too: small Qwen2.5 models often leave the tags out (Qwen2.5-Coder-0.5B-Instruct
//! does, greedily, for a plain weather question), and llama.cpp's Hermes parser accepts
//! the same. A name that is not a declared tool, or another key before the name, makes
//! it ordinary text.

use serde_json::Value;

use super::json_scan::{CallObject, OPush};
use super::xml::{XStep, XmlBody};
use super::{
    emit_whole_call, find_any, new_call_id, push_event, take_safe_text, tool_schemas, ToolEvent,
    ToolFormat, ToolParser,
};

const START: &str = "<tool_call>";
const END: &str = "</tool_call>";
const FUNC: &str = "<function=";

enum State {
    /// Start of the answer: with tools declared, a `{` here may open a bare call.
    Start,
    Text,
    BodyStart,
    /// A JSON call body; `bare` when it came without `<tool_call>` (see the module doc).
    Json { obj: CallObject, started: bool, bare: bool },
    Xml { body: XmlBody, wrapped: bool },
    AfterBody,
    /// After a call: whitespace before another call is dropped.
    Between,
    /// Malformed body: capture up to `</tool_call>`, then try a lenient parse.
    Fallback,
    /// A started call went wrong: drop the rest up to `</tool_call>`.
    Discard,
}

pub struct HermesParser {
    format: ToolFormat,
    tools: Vec<(String, Value)>,
    buf: String,
    state: State,
    index: usize,
    /// Raw text of the current call (for the fallback paths).
    raw: String,
}

impl HermesParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            tools: Vec::new(),
            buf: String::new(),
            state: State::Start,
            index: 0,
            raw: String::new(),
        }
    }

    fn run(&mut self, out: &mut Vec<ToolEvent>) {
        loop {
            match &mut self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    let skipped = self.buf.len() - t.len();
                    if self.tools.is_empty() || !(t.is_empty() || t.starts_with('{')) {
                        self.state = State::Text;
                    } else if t.is_empty() {
                        return;
                    } else {
                        self.raw = self.buf.drain(..skipped).collect();
                        let mut obj = CallObject::new();
                        obj.strict_keys = true;
                        self.state = State::Json { obj, started: false, bare: true };
                    }
                }
                State::Text => match find_any(&self.buf, &[START, FUNC]) {
                    Some((p, m)) => {
                        let text: String = self.buf.drain(..p).collect();
                        push_event(out, ToolEvent::Text(text));
                        if m == 0 {
                            self.buf.drain(..START.len());
                            self.raw = START.to_owned();
                            self.state = State::BodyStart;
                        } else {
                            self.raw.clear();
                            self.state = State::Xml {
                                body: XmlBody::new(self.index),
                                wrapped: false,
                            };
                        }
                    }
                    None => {
                        let t = take_safe_text(&mut self.buf, &[START, FUNC]);
                        push_event(out, ToolEvent::Text(t));
                        return;
                    }
                },
                State::BodyStart => {
                    let t = self.buf.trim_start();
                    let skipped = self.buf.len() - t.len();
                    self.raw.extend(self.buf.drain(..skipped));
                    if self.buf.is_empty() {
                        return;
                    }
                    if self.buf.starts_with('{') {
                        self.state = State::Json {
                            obj: CallObject::new(),
                            started: false,
                            bare: false,
                        };
                    } else if self.buf.starts_with(FUNC) {
                        self.state = State::Xml {
                            body: XmlBody::new(self.index),
                            wrapped: true,
                        };
                    } else if self.buf.starts_with(END) {
                        self.buf.drain(..END.len());
                        self.state = State::Text;
                    } else if FUNC.starts_with(self.buf.as_str()) || END.starts_with(self.buf.as_str())
                    {
                        return;
                    } else {
                        self.state = State::Fallback;
                    }
                }
                State::Json { obj, started, bare } => {
                    let bare = *bare;
                    let mut consumed = 0;
                    let mut outcome = OPush::Consumed;
                    for c in self.buf.chars() {
                        outcome = obj.push(c);
                        if outcome != OPush::Consumed {
                            break;
                        }
                        consumed += c.len_utf8();
                        if bare && !*started && obj.name().is_some() {
                            break;
                        }
                    }
                    self.raw.extend(self.buf.drain(..consumed));
                    let not_a_call = bare
                        && !*started
                        && (outcome == OPush::Error
                            || obj.is_done() && obj.name().is_none()
                            || obj.name().is_some_and(|n| !self.tools.iter().any(|(t, _)| t == n)));
                    if not_a_call {
                        // A JSON answer, not a call: pass it on as text.
                        let raw = std::mem::take(&mut self.raw);
                        push_event(out, ToolEvent::Text(raw));
                        self.state = State::Text;
                        continue;
                    }
                    if let Some(name) = obj.take_name() {
                        *started = true;
                        push_event(
                            out,
                            ToolEvent::CallStart {
                                index: self.index,
                                id: new_call_id(self.format),
                                name,
                            },
                        );
                    }
                    let args = obj.take_args();
                    push_event(
                        out,
                        ToolEvent::CallArgs {
                            index: self.index,
                            delta: args,
                        },
                    );
                    if obj.is_done() {
                        if *started {
                            push_event(out, ToolEvent::CallEnd { index: self.index });
                            self.index += 1;
                            self.state = State::AfterBody;
                        } else {
                            // An object without a name: not a call.
                            self.state = State::Fallback;
                        }
                    } else if outcome == OPush::Error {
                        if *started {
                            push_event(out, ToolEvent::CallEnd { index: self.index });
                            self.index += 1;
                            // A bare call has no `</tool_call>` to discard up to.
                            self.state = if bare { State::Text } else { State::Discard };
                        } else {
                            self.state = State::Fallback;
                        }
                    } else {
                        return;
                    }
                }
                State::Xml { body, wrapped } => {
                    let wrapped = *wrapped;
                    let before = self.buf.clone();
                    match body.step(&mut self.buf, out, self.format, &self.tools) {
                        XStep::Wait => return,
                        XStep::Done => {
                            self.index += 1;
                            self.state = if wrapped { State::AfterBody } else { State::Text };
                        }
                        XStep::Error => {
                            if wrapped {
                                self.state = State::Fallback;
                            } else {
                                // `<function=` in plain text that is not a call.
                                push_event(out, ToolEvent::Text(FUNC.to_owned()));
                                self.buf = before;
                                self.buf.drain(..FUNC.len().min(self.buf.len()));
                                self.state = State::Text;
                            }
                        }
                    }
                }
                State::AfterBody => {
                    let t = self.buf.trim_start();
                    let skipped = self.buf.len() - t.len();
                    if self.buf[skipped..].starts_with(END) {
                        self.buf.drain(..skipped + END.len());
                        self.state = State::Between;
                    } else if END.starts_with(&self.buf[skipped..]) {
                        return;
                    } else {
                        self.state = State::Between;
                    }
                }
                State::Between => {
                    let t = &self.buf[self.buf.len() - self.buf.trim_start().len()..];
                    if t.is_empty() {
                        return;
                    }
                    if t.starts_with(START) || t.starts_with(FUNC) {
                        let skipped = self.buf.len() - t.len();
                        self.buf.drain(..skipped);
                    } else if START.starts_with(t) || FUNC.starts_with(t) {
                        return;
                    }
                    self.state = State::Text;
                }
                State::Fallback => match self.buf.find(END) {
                    Some(p) => {
                        self.raw.extend(self.buf.drain(..p + END.len()));
                        let raw = std::mem::take(&mut self.raw);
                        self.lenient(raw, out);
                        self.state = State::Text;
                    }
                    None => {
                        let keep = super::partial_marker_len(&self.buf, &[END]);
                        let cut = self.buf.len() - keep;
                        self.raw.extend(self.buf.drain(..cut));
                        return;
                    }
                },
                State::Discard => match self.buf.find(END) {
                    Some(p) => {
                        self.buf.drain(..p + END.len());
                        self.state = State::Text;
                    }
                    None => {
                        let keep = super::partial_marker_len(&self.buf, &[END]);
                        let cut = self.buf.len() - keep;
                        self.buf.drain(..cut);
                        return;
                    }
                },
            }
        }
    }

    /// A call that did not stream cleanly: parse it whole if possible, else pass it on as
    /// text.
    fn lenient(&mut self, raw: String, out: &mut Vec<ToolEvent>) {
        let body = raw
            .strip_prefix(START)
            .unwrap_or(&raw)
            .trim_end()
            .strip_suffix(END)
            .unwrap_or(raw.as_str())
            .trim();
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(body) {
            if let Some(name) = m.get("name").and_then(Value::as_str) {
                let args = m
                    .get("arguments")
                    .or_else(|| m.get("parameters"))
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({}));
                let args = match args {
                    Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
                    v => v,
                };
                emit_whole_call(out, self.format, self.index, name.to_owned(), &args);
                self.index += 1;
                return;
            }
        }
        push_event(out, ToolEvent::Text(raw));
    }
}

impl ToolParser for HermesParser {
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
        match std::mem::replace(&mut self.state, State::Text) {
            State::Start | State::Text => push_event(&mut out, ToolEvent::Text(buf)),
            State::BodyStart => {
                let raw = std::mem::take(&mut self.raw) + &buf;
                push_event(&mut out, ToolEvent::Text(raw));
            }
            State::Json { mut obj, started, bare } => {
                if started {
                    obj.finish_input();
                    let args = obj.take_args();
                    push_event(
                        &mut out,
                        ToolEvent::CallArgs {
                            index: self.index,
                            delta: args,
                        },
                    );
                    push_event(&mut out, ToolEvent::CallEnd { index: self.index });
                    self.index += 1;
                } else if bare {
                    let raw = std::mem::take(&mut self.raw) + &buf;
                    push_event(&mut out, ToolEvent::Text(raw));
                } else {
                    let raw = std::mem::take(&mut self.raw) + &buf;
                    self.lenient(raw, &mut out);
                }
            }
            State::Xml { mut body, .. } => {
                let mut b = buf.clone();
                if body.finish(&mut b, &mut out) {
                    self.index += 1;
                } else {
                    let raw = std::mem::take(&mut self.raw) + &buf;
                    push_event(&mut out, ToolEvent::Text(raw));
                }
            }
            State::AfterBody | State::Between | State::Discard => {}
            State::Fallback => {
                let raw = std::mem::take(&mut self.raw) + &buf;
                self.lenient(raw, &mut out);
            }
        }
        out
    }

    fn set_tools(&mut self, tools: &Value) {
        self.tools = tool_schemas(tools);
    }

    fn format(&self) -> ToolFormat {
        self.format
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::api::tools::{ToolEvent, ToolFormat};

    /// (text, [(name, arguments)]) of `input` fed whole, char by char and split at every
    /// char boundary; all must agree.
    fn parse(tools: &Value, input: &str) -> (String, Vec<(String, Value)>) {
        let run = |chunks: &[&str]| {
            let mut p = ToolFormat::Hermes.parser();
            p.set_tools(tools);
            let mut ev: Vec<ToolEvent> = chunks.iter().flat_map(|c| p.feed(c)).collect();
            ev.extend(p.finish());
            let (mut text, mut calls) = (String::new(), Vec::<(String, String)>::new());
            for e in ev {
                match e {
                    ToolEvent::Text(t) => text.push_str(&t),
                    ToolEvent::CallStart { name, .. } => calls.push((name, String::new())),
                    ToolEvent::CallArgs { delta, .. } => calls.last_mut().unwrap().1.push_str(&delta),
                    ToolEvent::CallEnd { .. } => {}
                }
            }
            let calls: Vec<(String, Value)> =
                calls.into_iter().map(|(n, a)| (n, serde_json::from_str(&a).unwrap())).collect();
            (text, calls)
        };
        let whole = run(&[input]);
        let chars: Vec<String> = input.chars().map(String::from).collect();
        assert_eq!(run(&chars.iter().map(String::as_str).collect::<Vec<_>>()), whole, "char by char");
        for (i, _) in input.char_indices().skip(1) {
            let (a, b) = input.split_at(i);
            assert_eq!(run(&[a, b]), whole, "split at {i}");
        }
        whole
    }

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    }

    #[test]
    fn a_bare_call_object_is_a_call_when_the_tool_is_declared() {
        // What Qwen2.5-Coder-0.5B-Instruct answers greedily (no <tool_call> tags).
        let input = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}";
        let (text, calls) = parse(&tools(), input);
        assert_eq!(text, "");
        assert_eq!(calls, vec![("get_weather".to_string(), json!({"city": "Paris", "unit": "celsius"}))]);
        let (text, calls) = parse(&tools(), &format!("\n {input}\n<tool_call>\n{input}\n</tool_call>"));
        assert_eq!((text.as_str(), calls.len()), ("", 2), "a tagged call may follow");
    }

    #[test]
    fn json_answers_stay_text() {
        for input in [
            "{\"name\": \"Alice\", \"age\": 3}",          // not a declared tool
            "{\"city\": \"Paris\", \"name\": \"get_weather\"}", // another key first
            "{}",
            "{\"name\": \"get_wea",                       // cut off
            "Sure: {\"name\": \"get_weather\", \"arguments\": {}}", // not at the start
        ] {
            assert_eq!(parse(&tools(), input), (input.to_string(), vec![]), "{input}");
        }
        // Without declared tools nothing bare is a call.
        let input = "{\"name\": \"get_weather\", \"arguments\": {}}";
        assert_eq!(parse(&json!([]), input), (input.to_string(), vec![]));
    }
}
