//! Bounds on the work one constraint may cost, checked before llguidance sees it: a
//! hostile schema or grammar (huge repetition counts, deep nesting, megabytes of text)
//! is refused with a short human message instead of burning CPU and memory. llguidance's
//! own limits ([`parser_limits`]) bound the rest (grammar size, lexer states, fuel).
//!
//! Errors are [`SpecError`]s: one line, no parser state or grammar dump, so the API can
//! return them as a 400.

use llguidance::api::ParserLimits;
use serde_json::Value;

use super::ConstraintSpec;

/// Largest repetition a regex or grammar may ask for, counting nested repetitions as a
/// product (`(a{100}){100}` is 10,000).
pub const MAX_REPEAT: u64 = 10_000;
/// Largest `minItems`/`maxItems`/`minLength`/`maxLength`/`minProperties`/... of a schema.
pub const MAX_COUNT: u64 = 100_000;
/// Deepest nesting of a schema (objects and arrays of the JSON text) or of a grammar's groups.
pub const MAX_DEPTH: usize = 64;
/// Largest schema, grammar or regex, in bytes.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// A schema, grammar or tool list that cannot be used (the client's fault).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// llguidance's limits for rmlx: the defaults (which bound grammar size, lexer states and
/// per-step work), without parser state or the grammar in error messages.
pub fn parser_limits() -> ParserLimits {
    ParserLimits {
        verbose_errors: false,
        ..ParserLimits::default()
    }
}

/// One short line of an llguidance error: its first line, without the state dump that
/// verbose errors carry, at most 200 characters.
pub fn short(e: &str) -> String {
    let first = e.split("<state>").next().unwrap_or("").lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid").trim();
    let mut s: String = first.chars().take(200).collect();
    if s.len() < first.len() {
        s.push('…');
    }
    s
}

/// Checks `spec` against the bounds above.
pub fn check(spec: &ConstraintSpec) -> Result<(), SpecError> {
    match spec {
        ConstraintSpec::JsonObject => Ok(()),
        ConstraintSpec::JsonSchema { schema, .. } => check_schema(schema, "the JSON schema"),
        ConstraintSpec::Regex(rx) => {
            size(rx.len(), "the regex")?;
            check_pattern(rx, "the regex")
        }
        ConstraintSpec::Lark(g) => {
            size(g.len(), "the grammar")?;
            check_pattern(g, "the grammar")
        }
        ConstraintSpec::ToolCall { tools, .. } => check_schema(tools, "the tools' schemas"),
    }
}

fn size(n: usize, what: &str) -> Result<(), SpecError> {
    if n > MAX_SPEC_BYTES {
        return Err(SpecError(format!("{what} is {n} bytes; the limit is {MAX_SPEC_BYTES}")));
    }
    Ok(())
}

const COUNT_KEYS: [&str; 8] =
    ["minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains"];

/// Walks a schema (iteratively, so depth costs no stack): size, depth, counts, and the
/// `pattern`s' repetitions.
fn check_schema(schema: &Value, what: &str) -> Result<(), SpecError> {
    let text = serde_json::to_string(schema).unwrap_or_default();
    size(text.len(), what)?;
    let mut stack: Vec<(&Value, usize)> = vec![(schema, 0)];
    while let Some((v, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(SpecError(format!("{what} is nested more than {MAX_DEPTH} levels deep")));
        }
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if COUNT_KEYS.contains(&k.as_str()) {
                        if let Some(n) = x.as_f64() {
                            if n > MAX_COUNT as f64 {
                                return Err(SpecError(format!("{what}: `{k}` of {x} is over the limit of {MAX_COUNT}")));
                            }
                        }
                    }
                    if k == "pattern" {
                        if let Some(p) = x.as_str() {
                            check_pattern(p, &format!("{what}: `pattern`"))?;
                        }
                    }
                    if k == "patternProperties" {
                        if let Some(pm) = x.as_object() {
                            for p in pm.keys() {
                                check_pattern(p, &format!("{what}: `patternProperties`"))?;
                            }
                        }
                    }
                    stack.push((x, depth + 1));
                }
            }
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// The repetitions and group nesting of a regex or Lark grammar. Quantifiers `{n}`,
/// `{n,m}` and `{n,}` multiply through nested groups; `*`, `+` and `?` count once.
/// Character classes, escapes and (in Lark) quoted strings are skipped.
pub fn check_pattern(p: &str, what: &str) -> Result<(), SpecError> {
    // Per open group: the largest product inside it so far, and the weight of its last atom.
    let mut groups: Vec<(u64, u64)> = vec![(1, 1)];
    let b = p.as_bytes();
    let mut i = 0;
    let too_many = |n: u64| SpecError(format!("{what} repeats something {n} times; the limit is {MAX_REPEAT}"));
    while i < b.len() {
        match b[i] {
            b'\\' => {
                i += 2;
                set_atom(&mut groups, 1);
                continue;
            }
            b'[' => {
                // A class: to its closing bracket (a leading `]` or `^]` is literal).
                i += 1;
                if i < b.len() && b[i] == b'^' {
                    i += 1;
                }
                if i < b.len() && b[i] == b']' {
                    i += 1;
                }
                while i < b.len() && b[i] != b']' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                set_atom(&mut groups, 1);
            }
            b'(' => {
                groups.push((1, 1));
                if groups.len() > MAX_DEPTH {
                    return Err(SpecError(format!("{what} nests groups more than {MAX_DEPTH} deep")));
                }
            }
            b')' if groups.len() > 1 => {
                let (inner, last) = groups.pop().unwrap();
                set_atom(&mut groups, inner.max(last));
            }
            b'{' => {
                if let Some((n, end)) = quantifier(&b[i..]) {
                    let g = groups.last_mut().unwrap();
                    let w = g.1.saturating_mul(n.max(1));
                    if w > MAX_REPEAT {
                        return Err(too_many(w));
                    }
                    g.1 = w;
                    g.0 = g.0.max(w);
                    i += end;
                    continue;
                }
                set_atom(&mut groups, 1);
            }
            b'"' => {
                // A Lark string literal (in a regex, a quote is just a character).
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' && b[j] != b'\n' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                i = if j < b.len() && b[j] == b'"' { j } else { i };
                set_atom(&mut groups, 1);
            }
            b'|' => {
                let g = groups.last_mut().unwrap();
                g.1 = 1;
            }
            _ => set_atom(&mut groups, 1),
        }
        i += 1;
    }
    Ok(())
}

fn set_atom(groups: &mut [(u64, u64)], w: u64) {
    let g = groups.last_mut().unwrap();
    g.1 = w;
    g.0 = g.0.max(w);
}

/// `{n}`, `{n,}` or `{n,m}` at the start of `b`: the largest count and its length.
fn quantifier(b: &[u8]) -> Option<(u64, usize)> {
    let end = b.iter().position(|&c| c == b'}')?;
    let inner = std::str::from_utf8(&b[1..end]).ok()?;
    let (lo, hi) = match inner.split_once(',') {
        Some((lo, hi)) => (lo.trim(), Some(hi.trim())),
        None => (inner.trim(), None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(lo) || hi.is_some_and(|h| !h.is_empty() && !digits(h)) {
        return None;
    }
    let big = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
    let n = match hi {
        Some(h) if !h.is_empty() => big(lo).max(big(h)),
        _ => big(lo),
    };
    Some((n, end + 1))
}
