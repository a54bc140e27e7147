//! Hugging Face tokenizer files from GGUF tokenizer metadata.
//!
//! Supported: `tokenizer.ggml.model == "llama"` (SentencePiece, built in
//! `gguf::spm`) and `"gpt2"` (byte-level BPE). For gpt2 the GGUF
//! already stores tokens in the byte-level alphabet and merges as `"a b"`
//! strings, so they go into `tokenizer.json` unchanged. The pre-tokenizer is
//! chosen from `tokenizer.ggml.pre` to split text the way llama.cpp does for
//! that vocabulary (llama.cpp's `llama-vocab.cpp` regex lists).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Value};

use super::gguf::{GgufFile, GgufValue};

/// GGUF token types (llama.cpp `llama_token_type`).
pub const TOKEN_TYPE_NORMAL: i64 = 1;
pub const TOKEN_TYPE_CONTROL: i64 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Everything the converter writes for the tokenizer.
pub struct TokenizerFiles {
    /// `tokenizer.json` contents.
    pub tokenizer_json: String,
    /// `tokenizer_config.json` value.
    pub tokenizer_config: Value,
    /// `special_tokens_map.json` value.
    pub special_tokens_map: Value,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    /// Extra end-of-turn ids (`eot`/`eom`) that differ from eos.
    pub extra_eos_ids: Vec<u64>,
    pub pad_token_id: Option<u64>,
    pub warnings: Vec<String>,
}

/// The vocab as a JSON object in id order (serde_json's default map sorts keys).
struct OrderedVocab<'a>(&'a [(String, u64)]);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: OrderedVocab<'a>,
    merges: &'a [String],
}

#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<Value>,
    padding: Option<Value>,
    added_tokens: Vec<Value>,
    normalizer: Option<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModel<'a>,
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let arr = v
                .as_array()
                .ok_or_else(|| anyhow!("metadata '{}' is not an array", key))?;
            arr.iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str()
                        .ok_or_else(|| anyhow!("metadata '{}'[{}] is not a string", key, i))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }
    }
}

fn int_array(g: &GgufFile, key: &str) -> Result<Option<Vec<i64>>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let arr = v
                .as_array()
                .ok_or_else(|| anyhow!("metadata '{}' is not an array", key))?;
            arr.iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_i64()
                        .ok_or_else(|| anyhow!("metadata '{}'[{}] is not an integer", key, i))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        }
    }
}

/// Pre-tokenizer (and BPE `ignore_merges`) for a llama.cpp `tokenizer.ggml.pre` value.
/// Returns `(pre_tokenizer, ignore_merges, known)`.
fn pre_tokenizer_for(pre: &str) -> (Value, bool, bool) {
    let byte_level_regex = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let byte_level_plain = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let split = |re: &str| {
        json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                byte_level_plain.clone(),
            ]
        })
    };
    match pre {
        // llama.cpp: regex_exprs = { "\p{N}", <GPT-2 regex> } -- every digit on its own,
        // which is HF's Digits(individual_digits) followed by the GPT-2 ByteLevel split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (
                json!({
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Digits", "individual_digits": true},
                        byte_level_regex,
                    ]
                }),
                false,
                true,
            )
        }
        // llama.cpp sets ignore_merges for the LLAMA3 pre-tokenizer type.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            (split(LLAMA3_SPLIT), true, true)
        }
        "dbrx" | "smaug-bpe" => (split(LLAMA3_SPLIT), false, true),
        "qwen2" | "deepseek-r1-qwen" => (split(QWEN2_SPLIT), false, true),
        "gpt-2" | "gpt2" | "default" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" => (byte_level_regex, false, true),
        _ => (byte_level_regex, false, false),
    }
}

/// The GGUF's special tokens, as ids.
pub(crate) struct SpecialIds {
    pub bos: Option<u64>,
    pub eos: Option<u64>,
    pub unk: Option<u64>,
    pub pad: Option<u64>,
}

/// tokenizer_config.json and special_tokens_map.json for a rebuilt
/// tokenizer: BOS/EOS flags, added tokens, special tokens, the chat template,
/// the context length, plus `extra` settings.
pub(crate) fn config_files(
    g: &GgufFile,
    tok: &dyn Fn(Option<u64>) -> Option<String>,
    ids: SpecialIds,
    (add_bos, add_eos): (bool, bool),
    added_decoder: serde_json::Map<String, Value>,
    context_length: Option<u64>,
    extra: &[(&str, Value)],
) -> Result<(Value, Value)> {
    let mut cfg = serde_json::Map::new();
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("added_tokens_decoder".into(), Value::Object(added_decoder));
    let mut special_map = serde_json::Map::new();
    for (name, id) in [("bos_token", ids.bos), ("eos_token", ids.eos), ("unk_token", ids.unk), ("pad_token", ids.pad)] {
        if let Some(s) = tok(id) {
            cfg.insert(name.into(), json!(s));
            special_map.insert(name.into(), json!(s));
        }
    }
    if let Some(t) = g.get_str("tokenizer.chat_template")? {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    for (k, v) in extra {
        cfg.insert((*k).into(), v.clone());
    }
    if let Some(n) = context_length {
        cfg.insert("model_max_length".into(), json!(n));
    }
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok((Value::Object(cfg), Value::Object(special_map)))
}

/// Build tokenizer files from the GGUF metadata. `context_length` goes into
/// `model_max_length`.
pub fn build(g: &GgufFile, context_length: Option<u64>) -> Result<TokenizerFiles> {
    let mut warnings = Vec::new();
    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| anyhow!("GGUF has no tokenizer.ggml.model"))?;
    if model == "llama" {
        return super::gguf::spm::build(g, context_length);
    }
    if model != "gpt2" {
        bail!(
            "unsupported tokenizer.ggml.model '{}': only 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers are supported",
            model
        );
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("GGUF has no tokenizer.ggml.tokens"))?;
    let merges: Vec<String> = string_array(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| {
            anyhow!("GGUF has no tokenizer.ggml.merges (required for a gpt2 tokenizer)")
        })?
        .into_iter()
        .map(str::to_owned)
        .collect();
    for (i, m) in merges.iter().enumerate() {
        if m.split(' ').count() != 2 {
            bail!(
                "tokenizer.ggml.merges[{}] = {:?} is not of the form \"a b\"",
                i,
                m
            );
        }
    }
    let token_type = int_array(g, "tokenizer.ggml.token_type")?;
    if let Some(tt) = &token_type {
        if tt.len() != tokens.len() {
            bail!(
                "tokenizer.ggml.token_type has {} entries but there are {} tokens",
                tt.len(),
                tokens.len()
            );
        }
    }
    let ttype = |i: usize| {
        token_type
            .as_ref()
            .map(|t| t[i])
            .unwrap_or(TOKEN_TYPE_NORMAL)
    };

    let pre = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let (pre_tokenizer, ignore_merges, known) = pre_tokenizer_for(pre);
    if !known {
        warnings.push(format!(
            "unknown tokenizer.ggml.pre '{}': using the plain GPT-2 byte-level pre-tokenizer; tokenization may differ from llama.cpp",
            pre
        ));
    }

    // Vocab in id order; a duplicated token string keeps its first id.
    let mut seen: HashMap<&str, u64> = HashMap::with_capacity(tokens.len());
    let mut vocab: Vec<(String, u64)> = Vec::with_capacity(tokens.len());
    let mut dups = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        if seen.contains_key(t) {
            dups += 1;
            continue;
        }
        seen.insert(t, i as u64);
        vocab.push((t.to_string(), i as u64));
    }
    if dups > 0 {
        warnings.push(format!(
            "{} duplicated token strings in the GGUF vocab were dropped from tokenizer.json",
            dups
        ));
    }

    let id_opt = |key: &str| -> Result<Option<u64>> {
        let id = g.get_u64(key)?;
        if let Some(id) = id {
            if id as usize >= tokens.len() {
                bail!(
                    "{} = {} is out of range for a vocab of {} tokens",
                    key,
                    id,
                    tokens.len()
                );
            }
        }
        Ok(id)
    };
    let bos = id_opt("tokenizer.ggml.bos_token_id")?;
    let eos = id_opt("tokenizer.ggml.eos_token_id")?;
    let unk = id_opt("tokenizer.ggml.unknown_token_id")?;
    let pad = id_opt("tokenizer.ggml.padding_token_id")?;
    let mut extra_eos = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = id_opt(key)? {
            if Some(id) != eos && !extra_eos.contains(&id) {
                extra_eos.push(id);
            }
        }
    }
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    // Added tokens: control tokens are special, user-defined ones are plain
    // added tokens (llama.cpp matches both whole in raw text). Special ids
    // referenced by the metadata are always included as special.
    let referenced: Vec<u64> = [bos, eos, unk, pad]
        .into_iter()
        .flatten()
        .chain(extra_eos.iter().copied())
        .collect();
    let mut added_tokens = Vec::new();
    let mut added_decoder = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = ttype(i);
        let special = ty == TOKEN_TYPE_CONTROL || referenced.contains(&(i as u64));
        if !(special || ty == TOKEN_TYPE_USER_DEFINED)
            || t.is_empty()
            || seen.get(t) != Some(&(i as u64))
        {
            continue;
        }
        added_tokens.push(json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special,
        }));
        added_decoder.insert(
            i.to_string(),
            json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": special}),
        );
    }

    let tok = |id: Option<u64>| id.map(|i| tokens[i as usize].to_string());
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = serde_json::Map::new();
        let bos_s = if add_bos { tok(bos) } else { None };
        let eos_s = if add_eos { tok(eos) } else { None };
        if add_bos && bos_s.is_none() {
            bail!(
                "tokenizer.ggml.add_bos_token is true but there is no tokenizer.ggml.bos_token_id"
            );
        }
        if add_eos && eos_s.is_none() {
            bail!(
                "tokenizer.ggml.add_eos_token is true but there is no tokenizer.ggml.eos_token_id"
            );
        }
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let target = if seq == "A" { &mut single } else { &mut pair };
            if let Some(b) = &bos_s {
                target.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            }
            target.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some(e) = &eos_s {
                target.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            }
        }
        let mut pair_full = single.clone();
        pair_full.extend(pair);
        for (s, id) in [(bos_s, bos), (eos_s, eos)] {
            if let (Some(s), Some(id)) = (s, id) {
                specials.insert(s.clone(), json!({"id": s, "ids": [id], "tokens": [s]}));
            }
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair_full, "special_tokens": specials})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };

    let tj = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        // Qwen2's own tokenizer.json normalizes to NFC before splitting.
        normalizer: matches!(pre, "qwen2" | "deepseek-r1-qwen").then(|| json!({"type": "NFC"})),
        pre_tokenizer,
        post_processor,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model: BpeModel {
            ty: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges,
            vocab: OrderedVocab(&vocab),
            merges: &merges,
        },
    };
    let tokenizer_json = serde_json::to_string_pretty(&tj)?;

    let (tokenizer_config, special_tokens_map) = config_files(
        g,
        &tok,
        SpecialIds { bos, eos, unk, pad },
        (add_bos, add_eos),
        added_decoder,
        context_length,
        &[],
    )?;
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config,
        special_tokens_map,
        bos_token_id: bos,
        eos_token_id: eos,
        extra_eos_ids: extra_eos,
        pad_token_id: pad,
        warnings,
    })
}

/// True if the GGUF carries tokenizer metadata at all.
pub fn has_tokenizer(g: &GgufFile) -> bool {
    matches!(g.get("tokenizer.ggml.model"), Some(GgufValue::String(_)))
}
