//! `<tool_call>...</tool_call>` parser (Hermes / Qwen JSON bodies and Qwen3-Coder XML
//! bodies; a bare `<function=...>...</function>` outside a wrapper is accepted too).

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
    Text,
    BodyStart,
    Json { obj: CallObject, started: bool },
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
            state: State::Text,
            index: 0,
            raw: String::new(),
        }
    }

    fn run(&mut self, out: &mut Vec<ToolEvent>) {
        loop {
            match &mut self.state {
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
                State::Json { obj, started } => {
                    let mut consumed = 0;
                    let mut outcome = OPush::Consumed;
                    for c in self.buf.chars() {
                        outcome = obj.push(c);
                        if outcome != OPush::Consumed {
                            break;
                        }
                        consumed += c.len_utf8();
                    }
                    self.raw.extend(self.buf.drain(..consumed));
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
                            self.state = State::Discard;
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
            State::Text => push_event(&mut out, ToolEvent::Text(buf)),
            State::BodyStart => {
                let raw = std::mem::take(&mut self.raw) + &buf;
                push_event(&mut out, ToolEvent::Text(raw));
            }
            State::Json { mut obj, started } => {
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
