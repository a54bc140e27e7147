//! A `tokenizer.json` (Hugging Face tokenizers, byte-level BPE) built from a
//! CTranslate2 Whisper vocabulary alone, for packages that ship no
//! tokenizer.json.
//!
//! The vocabulary is GPT-2's byte-level alphabet (`Ġ` for a space), ordered
//! as Whisper's tiktoken ranks: ids 0..255 are the single bytes, and each
//! later regular token is one merge, in merge order. The vocabulary carries
//! no merges, so each token's merge is recovered as tiktoken (and Hugging
//! Face's `TikTokenConverter`) does: run byte-pair merging on the token's
//! bytes with only the ranks below its own; the two parts left are the
//! merge. Tokens from `<|endoftext|>` on (`<|startoftranscript|>`, the
//! languages, the tasks, `<|notimestamps|>`, the timestamps `<|0.00|>`..)
//! are added tokens, all special (`<|endoftext|>` is also in the BPE
//! vocabulary, as in Hugging Face's Whisper files).
use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};

/// The result of [`build`].
pub struct BuiltTokenizer {
    pub json: String,
    /// Regular (BPE) tokens.
    pub regular: usize,
    pub merges: usize,
    pub warnings: Vec<String>,
}

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte.
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    out
}

/// A byte-level token's bytes, or None if it has a character outside the alphabet.
fn token_bytes(t: &str, inv: &HashMap<char, u8>) -> Option<Vec<u8>> {
    t.chars().map(|c| inv.get(&c).copied()).collect()
}

/// The two parts that byte-pair merging with ranks below `max_rank` leaves
/// of `bytes` (None if it ends with another number of parts).
fn last_merge<'a>(bytes: &'a [u8], ranks: &HashMap<&[u8], usize>, max_rank: usize) -> Option<(&'a [u8], &'a [u8])> {
    // part boundaries: parts[i] = bytes[cuts[i]..cuts[i + 1]]
    let mut cuts: Vec<usize> = (0..=bytes.len()).collect();
    loop {
        let mut best: Option<(usize, usize)> = None; // (rank, index)
        for i in 0..cuts.len().saturating_sub(2) {
            if let Some(&r) = ranks.get(&bytes[cuts[i]..cuts[i + 2]]) {
                if r < max_rank && best.is_none_or(|(br, _)| r < br) {
                    best = Some((r, i));
                }
            }
        }
        match best {
            Some((_, i)) => {
                cuts.remove(i + 1);
            }
            None => break,
        }
    }
    (cuts.len() == 3).then(|| (&bytes[cuts[0]..cuts[1]], &bytes[cuts[1]..cuts[2]]))
}

/// Build tokenizer.json from the CT2 vocabulary (`tokens[id]`).
pub fn build(tokens: &[String]) -> Result<BuiltTokenizer> {
    let chars = byte_chars();
    let inv: HashMap<char, u8> = chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
    let regular = tokens
        .iter()
        .position(|t| t == "<|endoftext|>")
        .ok_or_else(|| anyhow!("the vocabulary has no <|endoftext|>: not a Whisper vocabulary"))?;
    if regular < 256 {
        bail!("the vocabulary has {regular} tokens before <|endoftext|>; a byte-level vocabulary has at least 256");
    }
    let mut bytes: Vec<Vec<u8>> = Vec::with_capacity(regular);
    for (i, t) in tokens[..regular].iter().enumerate() {
        // (Whisper's multilingual vocabulary has one empty token, 50256: kept, never produced.)
        let b = token_bytes(t, &inv).ok_or_else(|| anyhow!("token {i} {t:?} is not in GPT-2's byte-level alphabet"))?;
        bytes.push(b);
    }
    if let Some(i) = (0..256).find(|&i| bytes[i].len() != 1) {
        bail!("token {i} {:?} should be a single byte", tokens[i]);
    }
    let ranks: HashMap<&[u8], usize> =
        bytes.iter().enumerate().filter(|(_, b)| !b.is_empty()).map(|(i, b)| (b.as_slice(), i)).collect();
    if ranks.len() != bytes.iter().filter(|b| !b.is_empty()).count() {
        bail!("the vocabulary has duplicate tokens");
    }
    let mut merges = Vec::with_capacity(regular - 256);
    let mut unreachable = 0usize;
    for (r, b) in bytes.iter().enumerate().skip(256).filter(|(_, b)| !b.is_empty()) {
        match last_merge(b, &ranks, r) {
            Some((x, y)) => {
                let s = |p: &[u8]| p.iter().map(|&c| chars[c as usize]).collect::<String>();
                merges.push(Value::String(format!("{} {}", s(x), s(y))));
            }
            None => unreachable += 1,
        }
    }
    let mut warnings = Vec::new();
    if unreachable > 0 {
        warnings.push(format!("{unreachable} vocabulary tokens have no merge that forms them (kept, never produced)"));
    }
    // The BPE vocabulary also holds <|endoftext|>, as Hugging Face's Whisper tokenizers do.
    let vocab: Map<String, Value> = tokens[..=regular].iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .skip(regular)
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let id = |t: &str| tokens.iter().position(|v| v == t);
    let post = match (id("<|startoftranscript|>"), id("<|notimestamps|>"), id("<|endoftext|>")) {
        (Some(sot), Some(nt), Some(eot)) => {
            let sp = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
            let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
            json!({
                "type": "TemplateProcessing",
                "single": [sp("<|startoftranscript|>", 0), sp("<|notimestamps|>", 0), seq("A", 0), sp("<|endoftext|>", 0)],
                "pair": [sp("<|startoftranscript|>", 0), sp("<|notimestamps|>", 0), seq("A", 0), seq("B", 1), sp("<|endoftext|>", 1)],
                "special_tokens": {
                    "<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot], "tokens": ["<|endoftext|>"]},
                    "<|notimestamps|>": {"id": "<|notimestamps|>", "ids": [nt], "tokens": ["<|notimestamps|>"]},
                    "<|startoftranscript|>": {"id": "<|startoftranscript|>", "ids": [sot], "tokens": ["<|startoftranscript|>"]},
                }
            })
        }
        _ => Value::Null,
    };
    let n_merges = merges.len();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    let json = serde_json::to_string(&tok)?;
    // The file must load.
    tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| anyhow!("the built tokenizer.json does not load: {e}"))?;
    Ok(BuiltTokenizer { json, regular, merges: n_merges, warnings })
}

/// The merges of a BPE tokenizer.json, as "a b" strings.
fn merges_of(tokenizer_json: &str) -> Option<Vec<String>> {
    let v: Value = serde_json::from_str(tokenizer_json).ok()?;
    v["model"]["merges"]
        .as_array()?
        .iter()
        .map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => Some(format!("{} {}", a.first()?.as_str()?, a.get(1)?.as_str()?)),
            _ => None,
        })
        .collect()
}

/// A warning when a package's own tokenizer.json lacks merges that its
/// vocabulary's ranks imply. Hugging Face's multilingual Whisper files lack
/// the first, `Ġ t` (merges.txt's first line was read as a header), so they
/// encode " t" as two tokens where Whisper's tiktoken has one; faster-whisper
/// uses that file, so it is kept as is.
pub fn missing_merges(own_json: &str, built_json: &str) -> Option<String> {
    let (own, built) = (merges_of(own_json)?, merges_of(built_json)?);
    let have: std::collections::HashSet<&String> = own.iter().collect();
    let missing: Vec<&String> = built.iter().filter(|m| !have.contains(m)).collect();
    if missing.is_empty() {
        return None;
    }
    let shown: Vec<String> = missing.iter().take(3).map(|m| format!("{m:?}")).collect();
    Some(format!(
        "the package's tokenizer.json lacks {} merge(s) that the vocabulary's ranks imply ({}): it encodes some text \
         differently from Whisper's own tokenizer (tiktoken); copied as is, as faster-whisper uses it",
        missing.len(),
        shown.join(", ")
    ))
}
