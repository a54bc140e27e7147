//! Mistral tool calls: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]` (v3 tokenizers)
//! and `[TOOL_CALLS]name[ARGS]{..}` (v11+; `[TOOL_CALLS]name[CALL_ID]id[ARGS]{..}` too).
//! Both are understood whichever format the template implies.

use super::json_scan::{CallObject, OPush, VPush, ValueScanner};
use super::{new_call_id, push_event, take_safe_text, ToolEvent, ToolFormat, ToolParser};

const MARK: &str = "[TOOL_CALLS]";
const ARGS: &str = "[ARGS]";
const CALL_ID: &str = "[CALL_ID]";

enum State {
    Text,
    AfterMark,
    ArrayItem,
    Obj {
        obj: CallObject,
        started: bool,
        in_array: bool,
    },
    Name,
    CallId { name: String },
    Args { scan: ValueScanner },
}

pub struct MistralParser {
    format: ToolFormat,
    buf: String,
    state: State,
    index: usize,
    raw: String,
}

impl MistralParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            buf: String::new(),
            state: State::Text,
            index: 0,
            raw: String::new(),
        }
    }

    fn start_call(&mut self, out: &mut Vec<ToolEvent>, name: String, id: Option<String>) {
        push_event(
            out,
            ToolEvent::CallStart {
                index: self.index,
                id: id
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| new_call_id(self.format)),
                name,
            },
        );
    }

    fn end_call(&mut self, out: &mut Vec<ToolEvent>) {
        push_event(out, ToolEvent::CallEnd { index: self.index });
        self.index += 1;
    }

    fn run(&mut self, out: &mut Vec<ToolEvent>) {
        loop {
            match &mut self.state {
                State::Text => match self.buf.find(MARK) {
                    Some(p) => {
                        let text: String = self.buf.drain(..p).collect();
                        push_event(out, ToolEvent::Text(text));
                        self.buf.drain(..MARK.len());
                        self.state = State::AfterMark;
                    }
                    None => {
                        let t = take_safe_text(&mut self.buf, &[MARK]);
                        push_event(out, ToolEvent::Text(t));
                        return;
                    }
                },
                State::AfterMark => {
                    let t = self.buf.trim_start();
                    let skipped = self.buf.len() - t.len();
                    if t.is_empty() {
                        return;
                    }
                    self.buf.drain(..skipped);
                    self.raw = MARK.to_owned();
                    if self.buf.starts_with('[') {
                        self.buf.drain(..1);
                        self.state = State::ArrayItem;
                    } else if self.buf.starts_with('{') {
                        self.state = State::Obj {
                            obj: CallObject::new(),
                            started: false,
                            in_array: false,
                        };
                    } else {
                        self.state = State::Name;
                    }
                }
                State::ArrayItem => {
                    let t = self.buf.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
                    let skipped = self.buf.len() - t.len();
                    self.buf.drain(..skipped);
                    if self.buf.is_empty() {
                        return;
                    }
                    if self.buf.starts_with(']') {
                        self.buf.drain(..1);
                        self.state = State::Text;
                    } else if self.buf.starts_with('{') {
                        self.raw.clear();
                        self.state = State::Obj {
                            obj: CallObject::new(),
                            started: false,
                            in_array: true,
                        };
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Obj {
                    obj,
                    started,
                    in_array,
                } => {
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
                    let name = obj.take_name();
                    let args = obj.take_args();
                    let done = obj.is_done();
                    let in_array = *in_array;
                    let was_started = *started;
                    if name.is_some() {
                        *started = true;
                    }
                    let started = was_started || name.is_some();
                    if let Some(name) = name {
                        self.start_call(out, name, None);
                    }
                    push_event(
                        out,
                        ToolEvent::CallArgs {
                            index: self.index,
                            delta: args,
                        },
                    );
                    if done || outcome == OPush::Error {
                        if started {
                            self.end_call(out);
                        } else {
                            let raw = std::mem::take(&mut self.raw);
                            push_event(out, ToolEvent::Text(raw));
                        }
                        self.state = if done && in_array {
                            State::ArrayItem
                        } else {
                            State::Text
                        };
                    } else {
                        return;
                    }
                }
                State::Name => {
                    let found = [ARGS, CALL_ID]
                        .iter()
                        .filter_map(|m| self.buf.find(m).map(|p| (p, *m)))
                        .min();
                    let limit = self.buf.find(|c: char| c.is_whitespace() || c == '{');
                    match found {
                        Some((p, m)) if limit.is_none_or(|l| l > p) => {
                            let name = self.buf[..p].trim().to_owned();
                            self.buf.drain(..p + m.len());
                            if m == CALL_ID {
                                self.state = State::CallId { name };
                            } else {
                                self.start_call(out, name, None);
                                self.state = State::Args {
                                    scan: ValueScanner::new(),
                                };
                            }
                        }
                        _ if limit.is_some() || self.buf.len() > 256 => {
                            // Not a call after all.
                            push_event(out, ToolEvent::Text(MARK.to_owned()));
                            self.state = State::Text;
                        }
                        _ => return,
                    }
                }
                State::CallId { name } => match self.buf.find(ARGS) {
                    Some(p) => {
                        let id = self.buf[..p].trim().to_owned();
                        let name = std::mem::take(name);
                        self.buf.drain(..p + ARGS.len());
                        self.start_call(out, name, Some(id));
                        self.state = State::Args {
                            scan: ValueScanner::new(),
                        };
                    }
                    None => return,
                },
                State::Args { scan } => {
                    if !scan.started() {
                        let t = self.buf.trim_start();
                        let skipped = self.buf.len() - t.len();
                        self.buf.drain(..skipped);
                    }
                    let mut consumed = 0;
                    let mut done = false;
                    for c in self.buf.chars() {
                        match scan.push(c) {
                            VPush::Consumed => consumed += c.len_utf8(),
                            VPush::Done => {
                                consumed += c.len_utf8();
                                done = true;
                                break;
                            }
                            VPush::Rejected => {
                                done = true;
                                break;
                            }
                        }
                    }
                    let delta: String = self.buf.drain(..consumed).collect();
                    push_event(
                        out,
                        ToolEvent::CallArgs {
                            index: self.index,
                            delta,
                        },
                    );
                    if done {
                        self.end_call(out);
                        self.state = State::Text;
                    } else {
                        return;
                    }
                }
            }
        }
    }
}

impl ToolParser for MistralParser {
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
            State::AfterMark | State::ArrayItem => {}
            State::Name => push_event(&mut out, ToolEvent::Text(format!("{MARK}{buf}"))),
            State::CallId { name } => {
                self.start_call(&mut out, name, None);
                push_event(
                    &mut out,
                    ToolEvent::CallArgs {
                        index: self.index,
                        delta: "{}".into(),
                    },
                );
                self.end_call(&mut out);
            }
            State::Args { scan } => {
                if !scan.started() {
                    push_event(
                        &mut out,
                        ToolEvent::CallArgs {
                            index: self.index,
                            delta: "{}".into(),
                        },
                    );
                }
                self.end_call(&mut out);
            }
            State::Obj {
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
                    self.end_call(&mut out);
                } else {
                    let raw = std::mem::take(&mut self.raw) + &buf;
                    push_event(&mut out, ToolEvent::Text(raw));
                }
            }
        }
        out
    }

    fn format(&self) -> ToolFormat {
        self.format
    }
}
