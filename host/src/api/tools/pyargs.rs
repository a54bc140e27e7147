//! Python-syntax calls and literals (`get_weather(city="Paris", days=3)`), as emitted in
//! Gemma's `tool_code` blocks and Llama's `<|python_tag|>name.call(...)`. JSON spellings
//! (`true`, `null`) are accepted besides Python's.

use serde_json::{Map, Value};

struct P<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

type R<T> = Result<T, String>;

impl<'a> P<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            s: src.as_bytes(),
            src,
            i: 0,
        }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> R<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at {}", c as char, self.i))
        }
    }

    fn ident(&mut self) -> R<String> {
        self.ws();
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-' || c >= 0x80 {
                self.i += 1;
            } else {
                break;
            }
        }
        if start == self.i {
            return Err(format!("expected a name at {start}"));
        }
        Ok(self.src[start..self.i].to_owned())
    }

    fn value(&mut self) -> R<Value> {
        self.ws();
        match self.peek().ok_or("unexpected end")? {
            b'"' | b'\'' => self.string().map(Value::String),
            b'[' => {
                self.i += 1;
                self.seq(b']').map(Value::Array)
            }
            b'(' => {
                self.i += 1;
                self.seq(b')').map(Value::Array)
            }
            b'{' => {
                self.i += 1;
                let mut m = Map::new();
                loop {
                    if self.eat(b'}') {
                        break;
                    }
                    let k = match self.value()? {
                        Value::String(s) => s,
                        v => v.to_string(),
                    };
                    self.expect(b':')?;
                    let v = self.value()?;
                    m.insert(k, v);
                    if !self.eat(b',') {
                        self.expect(b'}')?;
                        break;
                    }
                }
                Ok(Value::Object(m))
            }
            c if c == b'-' || c == b'+' || c == b'.' || c.is_ascii_digit() => self.number(),
            _ => {
                let id = self.ident()?;
                match id.as_str() {
                    "True" | "true" => Ok(Value::Bool(true)),
                    "False" | "false" => Ok(Value::Bool(false)),
                    "None" | "null" => Ok(Value::Null),
                    _ => Err(format!("unknown name {id}")),
                }
            }
        }
    }

    fn seq(&mut self, close: u8) -> R<Vec<Value>> {
        let mut v = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(v);
            }
            v.push(self.value()?);
            if !self.eat(b',') {
                self.expect(close)?;
                return Ok(v);
            }
        }
    }

    fn number(&mut self) -> R<Value> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'_') {
                self.i += 1;
            } else {
                break;
            }
        }
        let t = self.src[start..self.i].replace('_', "");
        let t = t.strip_prefix('+').unwrap_or(&t);
        if let Ok(i) = t.parse::<i64>() {
            return Ok(Value::from(i));
        }
        t.parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("bad number {t}"))
    }

    fn string(&mut self) -> R<String> {
        let q = self.s[self.i];
        let triple = self.s[self.i..].starts_with(&[q, q, q]);
        self.i += if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let rest = &self.src[self.i..];
            let c = rest.chars().next().ok_or("unterminated string")?;
            if triple && rest.as_bytes().starts_with(&[q, q, q]) {
                self.i += 3;
                return Ok(out);
            }
            if !triple && c as u32 == q as u32 {
                self.i += 1;
                return Ok(out);
            }
            self.i += c.len_utf8();
            if c != '\\' {
                out.push(c);
                continue;
            }
            let e = self.src[self.i..].chars().next().ok_or("unterminated string")?;
            self.i += e.len_utf8();
            match e {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                '\\' | '\'' | '"' => out.push(e),
                'u' | 'x' => {
                    let n = if e == 'u' { 4 } else { 2 };
                    let hex = self.src.get(self.i..self.i + n).ok_or("bad escape")?;
                    let cp = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                    self.i += n;
                    out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                }
                '\n' => {}
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }

    /// `name(k=v, ...)`; a trailing `.call` on the name (Llama built-ins) is dropped.
    fn call(&mut self) -> R<(String, Value)> {
        let mut name = self.ident()?;
        if let Some(n) = name.strip_suffix(".call") {
            name = n.to_owned();
        }
        self.expect(b'(')?;
        let mut args = Map::new();
        loop {
            if self.eat(b')') {
                break;
            }
            let k = self.ident()?;
            self.expect(b'=')?;
            let v = self.value()?;
            args.insert(k, v);
            if !self.eat(b',') {
                self.expect(b')')?;
                break;
            }
        }
        Ok((name, Value::Object(args)))
    }
}

/// One Python / JSON literal.
pub(crate) fn parse_literal(s: &str) -> Result<Value, String> {
    let mut p = P::new(s);
    let v = p.value()?;
    p.ws();
    if p.i != s.len() {
        return Err("trailing text".into());
    }
    Ok(v)
}

/// One or more calls: `f(a=1)`, `[f(a=1), g(b=2)]`, or calls on separate lines / separated by
/// `,` or `;`. Optional `print(...)` wrappers (Gemma examples) are removed.
pub(crate) fn parse_calls(s: &str) -> Result<Vec<(String, Value)>, String> {
    let mut p = P::new(s);
    let mut calls = Vec::new();
    let bracketed = p.eat(b'[');
    loop {
        p.ws();
        if p.i >= s.len() {
            break;
        }
        if bracketed && p.eat(b']') {
            break;
        }
        let save = p.i;
        if let Ok(id) = p.ident() {
            if id == "print" && p.eat(b'(') {
                let (n, a) = p.call()?;
                p.expect(b')')?;
                calls.push((n, a));
            } else {
                p.i = save;
                calls.push(p.call()?);
            }
        } else {
            return Err(format!("expected a call at {save}"));
        }
        p.ws();
        while p.eat(b',') || p.eat(b';') {}
    }
    p.ws();
    if p.i != s.len() {
        return Err("trailing text".into());
    }
    if calls.is_empty() {
        return Err("no calls".into());
    }
    Ok(calls)
}
