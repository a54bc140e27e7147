//! The bytes of each token id, read from the tokenizer's vocabulary and decoder (byte-level,
//! byte-fallback and SentencePiece-space vocabularies), for llguidance's token trie.

use anyhow::Result;
use llguidance::toktrie::TokTrie;
use serde_json::Value;

use crate::model::tokenizer::Tokenizer;

/// GPT-2 byte-level alphabet: the char standing for each byte.
fn byte_level_map() -> std::collections::HashMap<char, u8> {
    let self_mapped =
        |c: u32| matches!(c, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut m = std::collections::HashMap::new();
    let mut k = 0x100u32;
    for b in 0..=255u32 {
        if self_mapped(b) {
            m.insert(char::from_u32(b).unwrap(), b as u8);
        } else {
            m.insert(char::from_u32(k).unwrap(), b as u8);
            k += 1;
        }
    }
    m
}

/// How the tokenizer's decoder turns token strings into bytes.
#[derive(Default, Debug)]
struct DecoderKind {
    byte_level: bool,
    byte_fallback: bool,
    /// The char that stands for a space (`▁` for SentencePiece models).
    space: Option<char>,
}

fn scan_decoder(d: &Value, k: &mut DecoderKind) {
    match d.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => k.byte_level = true,
        Some("ByteFallback") => k.byte_fallback = true,
        Some("Metaspace") => {
            let r = d.get("replacement").and_then(Value::as_str).unwrap_or("▁");
            k.space = r.chars().next();
        }
        Some("Replace") if d.get("content").and_then(Value::as_str) == Some(" ") => {
            if let Some(s) = d.pointer("/pattern/String").and_then(Value::as_str) {
                let mut cs = s.chars();
                if let (Some(c), None) = (cs.next(), cs.next()) {
                    k.space = Some(c);
                }
            }
        }
        Some("Sequence") => {
            for sub in d.get("decoders").and_then(Value::as_array).into_iter().flatten() {
                scan_decoder(sub, k);
            }
        }
        _ => {}
    }
}

/// The bytes of every token id (special tokens prefixed with the trie's special marker).
pub(super) fn token_bytes(tokenizer: &Tokenizer) -> Result<Vec<Vec<u8>>> {
    let inner = tokenizer.inner();
    let dec = match inner.get_decoder() {
        Some(d) => serde_json::to_value(d)?,
        None => Value::Null,
    };
    let mut kind = DecoderKind::default();
    scan_decoder(&dec, &mut kind);
    let n = tokenizer.vocab_size();
    let added = inner.get_added_tokens_decoder();
    let map = byte_level_map();
    let mut out = Vec::with_capacity(n);
    for id in 0..n as u32 {
        if let Some(a) = added.get(&id) {
            if a.special {
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend_from_slice(a.content.as_bytes());
                out.push(b);
            } else {
                out.push(a.content.as_bytes().to_vec());
            }
            continue;
        }
        let Some(s) = inner.id_to_token(id) else {
            out.push(Vec::new());
            continue;
        };
        let b = if kind.byte_level {
            match s.chars().map(|c| map.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                Some(b) => b,
                None => s.into_bytes(),
            }
        } else if kind.byte_fallback
            && s.len() == 6
            && s.starts_with("<0x")
            && s.ends_with('>')
        {
            vec![u8::from_str_radix(&s[3..5], 16)?]
        } else if let Some(sp) = kind.space {
            s.replace(sp, " ").into_bytes()
        } else {
            s.into_bytes()
        };
        out.push(b);
    }
    Ok(out)
}
