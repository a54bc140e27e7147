//! Incremental scanners for JSON tool calls: the extent of one JSON value, and a call
//! object `{"name": "...", "arguments": {...}}` whose arguments stream out raw as they
//! arrive (after the name is known).

/// What one character did to a [`ValueScanner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VPush {
    /// Part of the value; more to come.
    Consumed,
    /// Part of the value, which is now complete.
    Done,
    /// Not part of the value: the value (a bare scalar) ended before it.
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Container,
    Str,
    Scalar,
}

/// Tracks where one JSON value ends (strings, nesting, escapes); does not validate.
#[derive(Debug, Default, Clone)]
pub(crate) struct ValueScanner {
    kind: Option<Kind>,
    depth: usize,
    in_str: bool,
    esc: bool,
}

impl ValueScanner {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Whether any character was consumed.
    pub(crate) fn started(&self) -> bool {
        self.kind.is_some()
    }

    /// Whether the value is a bare scalar (it ends only at a delimiter or end of input).
    pub(crate) fn is_scalar(&self) -> bool {
        self.kind == Some(Kind::Scalar)
    }

    pub(crate) fn push(&mut self, c: char) -> VPush {
        match self.kind {
            None => match c {
                '{' | '[' => {
                    self.kind = Some(Kind::Container);
                    self.depth = 1;
                    VPush::Consumed
                }
                '"' => {
                    self.kind = Some(Kind::Str);
                    VPush::Consumed
                }
                _ => {
                    self.kind = Some(Kind::Scalar);
                    VPush::Consumed
                }
            },
            Some(Kind::Str) => {
                if self.esc {
                    self.esc = false;
                } else if c == '\\' {
                    self.esc = true;
                } else if c == '"' {
                    return VPush::Done;
                }
                VPush::Consumed
            }
            Some(Kind::Scalar) => match c {
                ',' | '}' | ']' | ' ' | '\t' | '\r' | '\n' | ';' => VPush::Rejected,
                _ => VPush::Consumed,
            },
            Some(Kind::Container) => {
                if self.in_str {
                    if self.esc {
                        self.esc = false;
                    } else if c == '\\' {
                        self.esc = true;
                    } else if c == '"' {
                        self.in_str = false;
                    }
                    return VPush::Consumed;
                }
                match c {
                    '"' => self.in_str = true,
                    '{' | '[' => self.depth += 1,
                    '}' | ']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return VPush::Done;
                        }
                    }
                    _ => {}
                }
                VPush::Consumed
            }
        }
    }
}

/// Keys holding the function name / the arguments in JSON call objects.
const NAME_KEYS: [&str; 1] = ["name"];
const ARGS_KEYS: [&str; 2] = ["arguments", "parameters"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjState {
    Start,
    KeyOrEnd,
    Key,
    AfterKey,
    ValueStart,
    NameStr,
    ArgsRaw,
    ArgsStr,
    Skip,
    AfterValue,
    Done,
    Error,
}

/// What one character did to a [`CallObject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OPush {
    Consumed,
    /// The object is complete; the character was not part of it.
    Rejected,
    /// Not a call object (malformed, or `strict_keys` saw a foreign key).
    Error,
}

/// Incremental parser of one call object. Arguments text is released through
/// [`take_args`](Self::take_args) only once the name is known, so the owner can emit
/// `CallStart` first.
#[derive(Debug, Clone)]
pub(crate) struct CallObject {
    state: ObjState,
    key_raw: String,
    key_esc: bool,
    key: String,
    name_raw: String,
    name_esc: bool,
    name: Option<String>,
    name_taken: bool,
    value: ValueScanner,
    args_seen: bool,
    args_is_str: bool,
    args_str_raw: String,
    args_out: String,
    /// When set, a key other than name/arguments/parameters/type/id before the name is
    /// an error (used to tell a Llama JSON call from a JSON answer).
    pub(crate) strict_keys: bool,
}

impl CallObject {
    pub(crate) fn new() -> Self {
        Self {
            state: ObjState::Start,
            key_raw: String::new(),
            key_esc: false,
            key: String::new(),
            name_raw: String::new(),
            name_esc: false,
            name: None,
            name_taken: false,
            value: ValueScanner::new(),
            args_seen: false,
            args_is_str: false,
            args_str_raw: String::new(),
            args_out: String::new(),
            strict_keys: false,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == ObjState::Done
    }

    /// The function name, once, when it first becomes known.
    pub(crate) fn take_name(&mut self) -> Option<String> {
        if self.name_taken {
            return None;
        }
        let n = self.name.clone()?;
        self.name_taken = true;
        Some(n)
    }

    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Arguments text ready to emit (empty until the name is known).
    pub(crate) fn take_args(&mut self) -> String {
        if self.name.is_none() {
            return String::new();
        }
        std::mem::take(&mut self.args_out)
    }

    fn fail(&mut self) -> OPush {
        self.state = ObjState::Error;
        OPush::Error
    }

    fn finish_value(&mut self) {
        if ARGS_KEYS.contains(&self.key.as_str()) && self.args_is_str {
            // Arguments given as a JSON string holding JSON: emit the decoded content.
            let s: String =
                serde_json::from_str(&format!("\"{}\"", self.args_str_raw)).unwrap_or_default();
            let s = s.trim();
            self.args_out
                .push_str(if s.is_empty() { "{}" } else { s });
        }
        self.state = ObjState::AfterValue;
    }

    fn close(&mut self) {
        if !self.args_seen {
            self.args_out.push_str("{}");
        }
        self.state = ObjState::Done;
    }

    /// Closes an object cut off at end of input where that is unambiguous (arguments as a
    /// bare scalar that ended with the input). Returns whether the object is done.
    pub(crate) fn finish_input(&mut self) -> bool {
        if self.state == ObjState::ArgsRaw && self.value.is_scalar() {
            self.close();
        }
        self.is_done()
    }

    pub(crate) fn push(&mut self, c: char) -> OPush {
        let ws = c.is_whitespace();
        match self.state {
            ObjState::Start => {
                if ws {
                } else if c == '{' {
                    self.state = ObjState::KeyOrEnd;
                } else {
                    return self.fail();
                }
            }
            ObjState::KeyOrEnd => {
                if ws || c == ',' {
                } else if c == '"' {
                    self.key_raw.clear();
                    self.key_esc = false;
                    self.state = ObjState::Key;
                } else if c == '}' {
                    self.close();
                } else {
                    return self.fail();
                }
            }
            ObjState::Key => {
                if self.key_esc {
                    self.key_esc = false;
                    self.key_raw.push(c);
                } else if c == '\\' {
                    self.key_esc = true;
                    self.key_raw.push(c);
                } else if c == '"' {
                    self.key = serde_json::from_str(&format!("\"{}\"", self.key_raw))
                        .unwrap_or_else(|_| self.key_raw.clone());
                    if self.strict_keys
                        && self.name.is_none()
                        && !(NAME_KEYS.contains(&self.key.as_str())
                            || ARGS_KEYS.contains(&self.key.as_str())
                            || self.key == "type"
                            || self.key == "id")
                    {
                        return self.fail();
                    }
                    self.state = ObjState::AfterKey;
                } else {
                    self.key_raw.push(c);
                }
            }
            ObjState::AfterKey => {
                if ws {
                } else if c == ':' {
                    self.state = ObjState::ValueStart;
                } else {
                    return self.fail();
                }
            }
            ObjState::ValueStart => {
                if ws {
                    return OPush::Consumed;
                }
                self.value = ValueScanner::new();
                if NAME_KEYS.contains(&self.key.as_str()) && self.name.is_none() {
                    if c != '"' {
                        return self.fail();
                    }
                    self.name_raw.clear();
                    self.state = ObjState::NameStr;
                } else if ARGS_KEYS.contains(&self.key.as_str()) && !self.args_seen {
                    self.args_seen = true;
                    self.value.push(c);
                    if c == '"' {
                        self.args_is_str = true;
                        self.state = ObjState::ArgsStr;
                    } else {
                        self.args_out.push(c);
                        self.state = ObjState::ArgsRaw;
                    }
                } else {
                    self.value.push(c);
                    self.state = ObjState::Skip;
                }
            }
            ObjState::NameStr => {
                if self.name_esc {
                    self.name_esc = false;
                    self.name_raw.push(c);
                } else if c == '\\' {
                    self.name_esc = true;
                    self.name_raw.push(c);
                } else if c == '"' {
                    let n: String = serde_json::from_str(&format!("\"{}\"", self.name_raw))
                        .unwrap_or_else(|_| self.name_raw.clone());
                    self.name = Some(n);
                    self.state = ObjState::AfterValue;
                } else {
                    self.name_raw.push(c);
                }
            }
            ObjState::ArgsRaw => match self.value.push(c) {
                VPush::Consumed => self.args_out.push(c),
                VPush::Done => {
                    self.args_out.push(c);
                    self.finish_value();
                }
                VPush::Rejected => {
                    self.finish_value();
                    return self.push(c);
                }
            },
            ObjState::ArgsStr => match self.value.push(c) {
                VPush::Consumed => self.args_str_raw.push(c),
                VPush::Done => self.finish_value(),
                VPush::Rejected => unreachable!("strings end at a quote"),
            },
            ObjState::Skip => match self.value.push(c) {
                VPush::Consumed => {}
                VPush::Done => self.state = ObjState::AfterValue,
                VPush::Rejected => {
                    self.state = ObjState::AfterValue;
                    return self.push(c);
                }
            },
            ObjState::AfterValue => {
                if ws {
                } else if c == ',' {
                    self.state = ObjState::KeyOrEnd;
                } else if c == '}' {
                    self.close();
                } else {
                    return self.fail();
                }
            }
            ObjState::Done => return OPush::Rejected,
            ObjState::Error => return OPush::Error,
        }
        OPush::Consumed
    }
}
