//! Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}` as the whole answer
//! (several separated by `;`), or after `<|python_tag|>`; `<|python_tag|>` followed by Python
//! calls (`brave_search.call(query="...")`) is parsed when the answer ends.

use serde_json::Value;

use super::json_scan::{CallObject, OPush};
use super::{
    emit_whole_call, new_call_id, push_event, take_safe_text, tool_schemas, ToolEvent,
    ToolFormat, ToolParser,
};

const TAG: &str = "<|python_tag|>";

enum State {
    /// Beginning of the answer: a `{` here may open a call.
    Start,
    Text,
    /// After `<|python_tag|>` or `;`: a JSON call or Python calls follow.
    Tag,
    Json {
        obj: CallObject,
        started: bool,
        tentative: bool,
    },
    AfterCall,
    Pythonic,
}

pub struct Llama3Parser {
    tools: Vec<(String, Value)>,
    buf: String,
    state: State,
    index: usize,
    raw: String,
}

impl Default for Llama3Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Llama3Parser {
    pub fn new() -> Self {
        Self {
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
                    if t.is_empty() {
                        return;
                    }
                    if t.starts_with(TAG) {
                        self.buf.drain(..skipped + TAG.len());
                        self.state = State::Tag;
                    } else if t.starts_with('{') {
                        self.raw = self.buf.drain(..skipped).collect();
                        let mut obj = CallObject::new();
                        obj.strict_keys = true;
                        self.state = State::Json {
                            obj,
                            started: false,
                            tentative: true,
                        };
                    } else if TAG.starts_with(t) {
                        return;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Text => match self.buf.find(TAG) {
                    Some(p) => {
                        let text: String = self.buf.drain(..p).collect();
                        push_event(out, ToolEvent::Text(text));
                        self.buf.drain(..TAG.len());
                        self.state = State::Tag;
                    }
                    None => {
                        let t = take_safe_text(&mut self.buf, &[TAG]);
                        push_event(out, ToolEvent::Text(t));
                        return;
                    }
                },
                State::Tag => {
                    let t = self.buf.trim_start();
                    let skipped = self.buf.len() - t.len();
                    if t.is_empty() {
                        return;
                    }
                    self.buf.drain(..skipped);
                    self.raw.clear();
                    if self.buf.starts_with('{') {
                        self.state = State::Json {
                            obj: CallObject::new(),
                            started: false,
                            tentative: false,
                        };
                    } else {
                        self.state = State::Pythonic;
                    }
                }
                State::Json {
                    obj,
                    started,
                    tentative,
                } => {
                    let mut consumed = 0;
                    let mut outcome = OPush::Consumed;
                    for c in self.buf.chars() {
                        outcome = obj.push(c);
                        if outcome != OPush::Consumed {
                            break;
                        }
                        consumed += c.len_utf8();
                        if !*started && obj.name().is_some() {
                            break;
                        }
                    }
                    self.raw.extend(self.buf.drain(..consumed));
                    if !*started && outcome != OPush::Error {
                        if let Some(name) = obj.name() {
                            let known = self.tools.is_empty()
                                || self.tools.iter().any(|(n, _)| n == name);
                            if *tentative && !known {
                                // A JSON answer that happens to have a "name" key.
                                let raw = std::mem::take(&mut self.raw);
                                push_event(out, ToolEvent::Text(raw));
                                self.state = State::Text;
                                continue;
                            }
                            let name = obj.take_name().unwrap();
                            *started = true;
                            push_event(
                                out,
                                ToolEvent::CallStart {
                                    index: self.index,
                                    id: new_call_id(ToolFormat::Llama3Json),
                                    name,
                                },
                            );
                            continue;
                        }
                    }
                    let args = obj.take_args();
                    push_event(
                        out,
                        ToolEvent::CallArgs {
                            index: self.index,
                            delta: args,
                        },
                    );
                    if obj.is_done() && *started {
                        push_event(out, ToolEvent::CallEnd { index: self.index });
                        self.index += 1;
                        self.state = State::AfterCall;
                    } else if obj.is_done() || outcome == OPush::Error {
                        if *started {
                            push_event(out, ToolEvent::CallEnd { index: self.index });
                            self.index += 1;
                        } else {
                            let raw = std::mem::take(&mut self.raw);
                            push_event(out, ToolEvent::Text(raw));
                        }
                        self.state = State::Text;
                    } else {
                        return;
                    }
                }
                State::AfterCall => {
                    let t = self.buf.trim_start();
                    let skipped = self.buf.len() - t.len();
                    if t.is_empty() {
                        return;
                    }
                    if t.starts_with(';') {
                        self.buf.drain(..skipped + 1);
                        self.state = State::Tag;
                    } else if t.starts_with(TAG) {
                        self.buf.drain(..skipped + TAG.len());
                        self.state = State::Tag;
                    } else if TAG.starts_with(t) {
                        return;
                    } else {
                        self.buf.drain(..skipped);
                        self.state = State::Text;
                    }
                }
                State::Pythonic => return,
            }
        }
    }
}

impl ToolParser for Llama3Parser {
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
            State::Tag | State::AfterCall => {}
            State::Json {
                mut obj, started, ..
            } => {
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
                    push_event(&mut out, ToolEvent::Text(raw));
                }
            }
            State::Pythonic => match super::pyargs::parse_calls(buf.trim()) {
                Ok(calls) => {
                    for (name, args) in calls {
                        emit_whole_call(&mut out, ToolFormat::Llama3Json, self.index, name, &args);
                        self.index += 1;
                    }
                }
                Err(_) => push_event(&mut out, ToolEvent::Text(format!("{TAG}{buf}"))),
            },
        }
        out
    }

    fn set_tools(&mut self, tools: &Value) {
        self.tools = tool_schemas(tools);
    }

    fn format(&self) -> ToolFormat {
        ToolFormat::Llama3Json
    }
}
