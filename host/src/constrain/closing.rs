//! Finishing within the token budget: a short way to complete the output from the
//! current parser state (a "closing plan"), which the constraint forces once the tokens
//! left run low, so that even a model that has no idea what JSON is ends with output
//! that parses and validates.
//!
//! The plan is greedy, on a clone of the matcher: tokens the grammar forces; else the
//! first of a few candidate texts (chosen from where a JSON scanner says the output is:
//! in a string, after a key, after a value, ...) that the grammar accepts whole; else the
//! shortest allowed token, closing punctuation first.

use llguidance::toktrie::{TokTrie, TokenId};
use llguidance::Matcher;

use crate::model::tokenizer::Tokenizer;

/// Lexical position in JSON text (as far as a scanner without the schema can tell).
#[derive(Debug, Clone, Default)]
pub(super) struct JsonLex {
    /// Open `{` and `[`.
    stack: Vec<u8>,
    in_str: bool,
    /// The open string is an object key.
    key: bool,
    esc: bool,
    /// The last byte outside strings that is not whitespace (`"` for a closed string).
    last: u8,
    /// In a number: its digits before any exponent, and the exponent's digits.
    num: Option<(u16, u16, bool)>,
}

/// Longest number mantissa (digits) and exponent the output may write: beyond these a
/// number no longer fits a double (and a weak model could write digits forever).
const MAX_MANTISSA: u16 = 20;
const MAX_EXPONENT: u16 = 2;

impl JsonLex {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &c in bytes {
            if self.in_str {
                if self.esc {
                    self.esc = false;
                } else if c == b'\\' {
                    self.esc = true;
                } else if c == b'"' {
                    self.in_str = false;
                    // `K`: a key closed, its `:` and value pending.
                    self.last = if self.key { b'K' } else { b'"' };
                }
                continue;
            }
            if let Some((m, e, in_exp)) = self.num.as_mut() {
                match c {
                    b'0'..=b'9' if *in_exp => *e += 1,
                    b'0'..=b'9' => *m += 1,
                    b'e' | b'E' => *in_exp = true,
                    b'.' | b'+' | b'-' => {}
                    _ => self.num = None,
                }
            } else if matches!(c, b'-' | b'0'..=b'9') {
                self.num = Some(((c != b'-') as u16, 0, false));
            }
            match c {
                b'"' => {
                    self.in_str = true;
                    self.key = self.stack.last() == Some(&b'{') && matches!(self.last, b'{' | b',');
                    self.last = b'"';
                }
                b'{' | b'[' => {
                    if self.stack.len() < 4096 {
                        self.stack.push(c);
                    }
                    self.last = c;
                }
                b'}' | b']' => {
                    self.stack.pop();
                    self.last = c;
                }
                b' ' | b'\t' | b'\n' | b'\r' => {}
                _ => self.last = c,
            }
        }
    }

    pub fn in_str(&self) -> bool {
        self.in_str
    }

    /// Whether `bytes` would make the number being written longer than a double holds.
    pub fn number_too_long(&self, bytes: &[u8]) -> bool {
        if self.in_str || !matches!(bytes.first(), Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')) {
            return false;
        }
        let mut l = JsonLex { stack: Vec::new(), in_str: false, key: false, esc: false, last: self.last, num: self.num };
        for &c in bytes {
            l.feed(&[c]);
            match l.num {
                Some((m, e, _)) if m > MAX_MANTISSA || e > MAX_EXPONENT => return true,
                None => return false,
                _ => {}
            }
        }
        false
    }

    /// A rough count of what is open (strings, objects, arrays, a pending key or value):
    /// what closing costs at least. Used near the end of the budget to mask tokens that
    /// would open more.
    pub fn cost(&self) -> usize {
        let pending = match self.last {
            b',' if self.stack.last() == Some(&b'{') => 3,
            b'K' => 2,
            b',' | b':' | b'-' | b'.' | b'E' | b'+' => 1,
            _ => 0,
        };
        let key = if self.in_str && self.key { 2 } else { 0 };
        self.in_str as usize + key + self.esc as usize + self.stack.len() + pending
    }

    /// [`cost`](Self::cost) after `bytes`.
    pub fn cost_after(&self, bytes: &[u8]) -> usize {
        let mut l = JsonLex {
            stack: Vec::new(),
            in_str: self.in_str,
            key: self.key,
            esc: self.esc,
            last: self.last,
            num: self.num,
        };
        if bytes.iter().any(|c| matches!(c, b'{' | b'[' | b'}' | b']')) {
            l.stack = self.stack.clone();
            l.feed(bytes);
            return l.cost();
        }
        // No brackets: the stack is unchanged; only its top matters.
        l.stack.extend(self.stack.last());
        l.feed(bytes);
        l.cost() - l.stack.len() + self.stack.len()
    }

    /// Candidate texts to try next, most closing first.
    fn candidates(&self) -> &'static [&'static str] {
        const VALUE: &[&str] = &["0", "\"\"", "\"", "null", "false", "true", "[]", "{}", "[", "{", "-0"];
        if self.esc {
            return &["n"];
        }
        if self.in_str {
            return &["\""];
        }
        match self.last {
            b'{' => &["}", "\""],
            b'[' => &["]", "0", "\"\"", "\"", "null", "false", "true", "[]", "{}", "[", "{"],
            b':' => VALUE,
            b',' if self.stack.last() == Some(&b'{') => &["\""],
            b',' => VALUE,
            b'-' | b'.' | b'E' | b'+' => &["0", "}", "]", ","],
            0 => &["{", "[", "0", "\"\"", "\"", "null"],
            _ => &["}", "]", ",", "0"],
        }
    }
}

/// Texts that close things in every format, tried when nothing JSON-specific fits.
const GENERIC: [&str; 8] = ["\"", "}", "]", ")", "0", ",", ":", "\n"];

/// Per tokenizer: the token ids of candidate texts.
pub(super) struct Candidates {
    ids: std::collections::HashMap<&'static str, Vec<TokenId>>,
}

impl Candidates {
    pub fn new(tok: &Tokenizer, extra: &[&'static str]) -> Self {
        let mut ids = std::collections::HashMap::new();
        let all = ["0", "\"\"", "\"", "null", "false", "true", "[]", "{}", "[", "{", "-0", "}", "]", ",", "n", ")", ":", "\n"];
        for s in all.iter().chain(extra) {
            if let Ok(t) = tok.encode(s, false) {
                if !t.is_empty() {
                    ids.insert(*s, t);
                }
            }
        }
        Self { ids }
    }
}

/// How much a token's first byte looks like closing (lower is better) for the fallback.
fn rank(b: u8) -> u8 {
    match b {
        b'"' => 0,
        b'}' | b']' | b')' => 1,
        b'0'..=b'9' => 2,
        b',' | b':' => 3,
        b'a'..=b'z' | b'A'..=b'Z' => 5,
        b' ' | b'\n' | b'\t' => 9,
        _ => 4,
    }
}

/// A greedy completion of `m` (a clone; the caller's matcher is not touched) in at most
/// `cap` tokens. `lex` is the JSON scanner's state at `m`. An empty complete plan means
/// the output may end now. `closers` are the format's own terminators (tried first
/// outside JSON strings).
pub(super) fn plan(
    mut m: Matcher,
    mut lex: JsonLex,
    trie: &TokTrie,
    cands: &Candidates,
    closers: &[&'static str],
    vocab: usize,
    cap: usize,
) -> Plan {
    let mut out: Vec<TokenId> = Vec::new();
    let push = |m: &mut Matcher, lex: &mut JsonLex, out: &mut Vec<TokenId>, toks: &[TokenId]| -> bool {
        if m.consume_tokens(toks).is_err() {
            return false;
        }
        for &t in toks {
            feed_token(lex, trie, t);
        }
        out.extend_from_slice(toks);
        true
    };
    while out.len() < cap {
        if m.is_stopped() || m.is_accepting().unwrap_or(false) {
            return Plan { tokens: out, complete: true, error: None };
        }
        let ff = m.compute_ff_tokens();
        if !ff.is_empty() {
            let n = ff.len().min(cap - out.len());
            if !push(&mut m, &mut lex, &mut out, &ff[..n]) {
                break;
            }
            continue;
        }
        let mut texts: Vec<&'static str> = Vec::new();
        if !lex.in_str {
            texts.extend(closers);
        }
        texts.extend(lex.candidates());
        texts.extend(GENERIC);
        let mut done = false;
        for s in texts {
            let Some(toks) = cands.ids.get(s) else { continue };
            if out.len() + toks.len() > cap {
                continue;
            }
            if m.validate_tokens(toks).unwrap_or(0) == toks.len() {
                done = push(&mut m, &mut lex, &mut out, toks);
                break;
            }
        }
        if done {
            continue;
        }
        // The shortest allowed token, closing punctuation first.
        let Ok(mask) = m.compute_mask() else { break };
        let mut best: Option<(usize, u8, TokenId)> = None;
        for t in 0..vocab.min(trie.vocab_size()) as TokenId {
            if !mask.is_allowed(t) || t == trie.eos_token() {
                continue;
            }
            let b = trie.token(t);
            if b.is_empty() || b[0] == TokTrie::SPECIAL_TOKEN_MARKER {
                continue;
            }
            let key = (b.len(), rank(b[0]), t);
            if best.is_none_or(|x| key < x) {
                best = Some(key);
            }
        }
        let Some((_, _, t)) = best else { break };
        if !push(&mut m, &mut lex, &mut out, &[t]) {
            break;
        }
    }
    let complete = !m.is_error() && (m.is_stopped() || m.is_accepting().unwrap_or(false));
    Plan { tokens: out, complete, error: m.get_error() }
}

/// A closing plan.
pub(super) struct Plan {
    pub tokens: Vec<TokenId>,
    /// The grammar accepts after `tokens`.
    pub complete: bool,
    /// The parser failed on the way (a grammar that cannot be finished, limits hit).
    pub error: Option<String>,
}

/// Feeds a token's bytes (special tokens are not JSON) to the scanner.
pub(super) fn feed_token(lex: &mut JsonLex, trie: &TokTrie, t: TokenId) {
    if (t as usize) < trie.vocab_size() {
        let b = trie.token(t);
        if !b.is_empty() && b[0] != TokTrie::SPECIAL_TOKEN_MARKER {
            lex.feed(b);
        }
    }
}
