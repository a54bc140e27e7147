//! Qwen3-Coder's XML call body: `<function=name>\n<parameter=k>\nvalue\n</parameter>\n</function>`,
//! converted to a JSON arguments object as it streams. String-typed parameters (per the
//! tool schema) stream character by character; other values are typed when complete.

use serde_json::Value;

use super::{new_call_id, params_of, partial_marker_len, push_event, ToolEvent, ToolFormat};

const FUNC_OPEN: &str = "<function=";
const FUNC_CLOSE: &str = "</function>";
const PARAM_OPEN: &str = "<parameter=";
const PARAM_CLOSE: &str = "</parameter>";

#[derive(Debug, Clone, PartialEq, Eq)]
enum XState {
    ExpectFunction,
    InFunction,
    ParamStart,
    ParamValue,
    Done,
}

/// Outcome of [`XmlBody::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XStep {
    /// Needs more input.
    Wait,
    /// `</function>` consumed: call complete.
    Done,
    /// Not an XML call (nothing was emitted).
    Error,
}

#[derive(Debug, Clone)]
pub(crate) struct XmlBody {
    state: XState,
    name: Option<String>,
    index: usize,
    nparams: usize,
    key: String,
    streaming: bool,
    param_type: Option<String>,
}

impl XmlBody {
    pub(crate) fn new(index: usize) -> Self {
        Self {
            state: XState::ExpectFunction,
            name: None,
            index,
            nparams: 0,
            key: String::new(),
            streaming: false,
            param_type: None,
        }
    }

    fn args(&self, out: &mut Vec<ToolEvent>, s: String) {
        push_event(
            out,
            ToolEvent::CallArgs {
                index: self.index,
                delta: s,
            },
        );
    }

    /// Consumes what it can of `buf`.
    pub(crate) fn step(
        &mut self,
        buf: &mut String,
        out: &mut Vec<ToolEvent>,
        format: ToolFormat,
        tools: &[(String, Value)],
    ) -> XStep {
        loop {
            match self.state {
                XState::ExpectFunction => {
                    let t = buf.trim_start();
                    let skipped = buf.len() - t.len();
                    buf.drain(..skipped);
                    if buf.is_empty() {
                        return XStep::Wait;
                    }
                    if !buf.starts_with(FUNC_OPEN) {
                        return if FUNC_OPEN.starts_with(buf.as_str()) {
                            XStep::Wait
                        } else {
                            XStep::Error
                        };
                    }
                    let Some(gt) = buf.find('>') else {
                        // A name runs to '>'; a newline first means this is not a call.
                        return if buf.contains('\n') || buf.len() > 256 {
                            XStep::Error
                        } else {
                            XStep::Wait
                        };
                    };
                    let name = buf[FUNC_OPEN.len()..gt].trim().to_owned();
                    buf.drain(..=gt);
                    push_event(
                        out,
                        ToolEvent::CallStart {
                            index: self.index,
                            id: new_call_id(format),
                            name: name.clone(),
                        },
                    );
                    self.args(out, "{".into());
                    self.name = Some(name);
                    self.state = XState::InFunction;
                }
                XState::InFunction => {
                    // Skip anything up to the next tag.
                    match buf.find('<') {
                        Some(p) => {
                            buf.drain(..p);
                        }
                        None => {
                            buf.clear();
                            return XStep::Wait;
                        }
                    }
                    if buf.starts_with(FUNC_CLOSE) {
                        buf.drain(..FUNC_CLOSE.len());
                        self.args(out, "}".into());
                        push_event(out, ToolEvent::CallEnd { index: self.index });
                        self.state = XState::Done;
                        return XStep::Done;
                    }
                    if buf.starts_with(PARAM_OPEN) {
                        let Some(gt) = buf.find('>') else {
                            return XStep::Wait;
                        };
                        self.key = buf[PARAM_OPEN.len()..gt].trim().to_owned();
                        buf.drain(..=gt);
                        let props = self.name.as_deref().and_then(|n| params_of(tools, n));
                        self.param_type = props
                            .and_then(|p| p.get(&self.key))
                            .and_then(param_type);
                        self.streaming = self.param_type.as_deref() == Some("string");
                        let mut prefix = String::new();
                        if self.nparams > 0 {
                            prefix.push_str(", ");
                        }
                        prefix.push_str(&serde_json::to_string(&self.key).unwrap());
                        prefix.push_str(": ");
                        if self.streaming {
                            prefix.push('"');
                        }
                        self.nparams += 1;
                        self.args(out, prefix);
                        self.state = XState::ParamStart;
                        continue;
                    }
                    if FUNC_CLOSE.starts_with(buf.as_str()) || PARAM_OPEN.starts_with(buf.as_str())
                    {
                        return XStep::Wait;
                    }
                    // A stray '<': drop it and go on.
                    buf.drain(..1);
                }
                XState::ParamStart => {
                    if buf.is_empty() {
                        return XStep::Wait;
                    }
                    if buf.starts_with('\n') {
                        buf.drain(..1);
                    }
                    self.state = XState::ParamValue;
                }
                XState::ParamValue => {
                    let end = [PARAM_CLOSE, FUNC_CLOSE]
                        .iter()
                        .filter_map(|m| buf.find(m).map(|p| (p, *m)))
                        .min();
                    match end {
                        Some((p, m)) => {
                            let mut v = &buf[..p];
                            if let Some(s) = v.strip_suffix('\n') {
                                v = s;
                            }
                            let v = v.to_owned();
                            self.finish_param(&v, out);
                            let drain = if m == PARAM_CLOSE { p + m.len() } else { p };
                            buf.drain(..drain);
                            self.state = XState::InFunction;
                        }
                        None => {
                            if self.streaming {
                                let hold = partial_marker_len(
                                    buf,
                                    &["\n</parameter>", PARAM_CLOSE, "\n</function>", FUNC_CLOSE],
                                );
                                let cut = buf.len() - hold;
                                if cut > 0 {
                                    let chunk: String = buf.drain(..cut).collect();
                                    let esc = serde_json::to_string(&chunk).unwrap();
                                    self.args(out, esc[1..esc.len() - 1].to_owned());
                                }
                            }
                            return XStep::Wait;
                        }
                    }
                }
                XState::Done => return XStep::Done,
            }
        }
    }

    /// Input ended inside the body: closes what was started. Returns false if nothing was
    /// emitted yet (the caller should treat the text as plain text).
    pub(crate) fn finish(&mut self, buf: &mut String, out: &mut Vec<ToolEvent>) -> bool {
        if self.name.is_none() {
            return false;
        }
        match self.state {
            XState::ParamStart | XState::ParamValue => {
                let mut v = buf.as_str();
                if self.state == XState::ParamStart {
                    v = v.strip_prefix('\n').unwrap_or(v);
                }
                let v = v.strip_suffix('\n').unwrap_or(v).to_owned();
                buf.clear();
                self.finish_param(&v, out);
            }
            XState::Done => return true,
            _ => {}
        }
        buf.clear();
        self.args(out, "}".into());
        push_event(out, ToolEvent::CallEnd { index: self.index });
        self.state = XState::Done;
        true
    }

    fn finish_param(&mut self, v: &str, out: &mut Vec<ToolEvent>) {
        if self.streaming {
            let esc = serde_json::to_string(v).unwrap();
            let mut s = esc[1..esc.len() - 1].to_owned();
            s.push('"');
            self.args(out, s);
        } else {
            let val = convert_param(v, self.param_type.as_deref());
            self.args(out, serde_json::to_string(&val).unwrap());
        }
    }
}

/// The JSON-schema `type` of a property (first of a list; `anyOf`/`oneOf` first branch).
fn param_type(schema: &Value) -> Option<String> {
    match schema.get("type") {
        Some(Value::String(s)) => Some(s.to_lowercase()),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .map(str::to_lowercase),
        _ => {
            if schema.get("enum").is_some() {
                return Some("string".into());
            }
            ["anyOf", "oneOf"]
                .iter()
                .filter_map(|k| schema.get(*k).and_then(Value::as_array))
                .flatten()
                .find_map(param_type)
        }
    }
}

/// Types a parameter value from its schema type (as Qwen's reference parser does):
/// `null` is null; strings stay strings; numbers, booleans, objects and arrays are parsed,
/// falling back to the raw string.
pub(crate) fn convert_param(v: &str, ty: Option<&str>) -> Value {
    if v.trim().eq_ignore_ascii_case("null") {
        return Value::Null;
    }
    let Some(ty) = ty else {
        return Value::String(v.to_owned());
    };
    let t = v.trim();
    match ty {
        "string" | "str" | "text" | "varchar" | "char" | "enum" => Value::String(v.to_owned()),
        _ if ty.starts_with("int") || ty.starts_with("uint") || ty.starts_with("long") => {
            if let Ok(i) = t.parse::<i64>() {
                return Value::from(i);
            }
            match t.parse::<f64>() {
                Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
                Ok(f) => Value::from(f),
                Err(_) => Value::String(v.to_owned()),
            }
        }
        _ if ty.starts_with("num") || ty.starts_with("float") || ty.starts_with("double") => {
            if let Ok(i) = t.parse::<i64>() {
                return Value::from(i);
            }
            t.parse::<f64>()
                .ok()
                .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                .unwrap_or_else(|| Value::String(v.to_owned()))
        }
        "boolean" | "bool" => match t.to_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => Value::String(v.to_owned()),
        },
        _ => serde_json::from_str(t)
            .ok()
            .or_else(|| super::pyargs::parse_literal(t).ok())
            .unwrap_or_else(|| Value::String(v.to_owned())),
    }
}
