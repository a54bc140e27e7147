//! Hugging Face tokenizer files for SentencePiece vocabularies
//! (`tokenizer.ggml.model = "llama"`, as Gemma and Llama 1/2 GGUFs carry).
//!
//! The GGUF stores the pieces, their scores and token types but no merges.
//! llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined
//! piece has the highest score; that is BPE with merges ranked by the joined
//! piece's score, so the merges are rebuilt from the vocab the way
//! transformers' `SentencePieceExtractor` does (every split of a normal piece
//! into two normal pieces, ordered by the piece's score, then by the ids of
//! the halves). The result is a `tokenizer.json` in the layout of Hugging
//! Face's own Gemma/Llama tokenizers: BPE with byte fallback, spaces
//! replaced by `▁` (plus a leading `▁` when `tokenizer.ggml.add_space_prefix`
//! is true, llama.cpp's default), and the matching decoder.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::{GgufFile, GgufValue};
use crate::convert::tokenizer::{
    TokenizerFiles, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED,
};

/// llama.cpp's `LLAMA_TOKEN_TYPE_UNKNOWN`.
const TOKEN_TYPE_UNKNOWN: i64 = 2;

fn array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<&'a [GgufValue]>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| anyhow!("metadata '{}' is not an array", key)),
    }
}

/// Build tokenizer files from SentencePiece GGUF metadata.
pub fn build(g: &GgufFile, context_length: Option<u64>) -> Result<TokenizerFiles> {
    let mut warnings = Vec::new();
    let tokens: Vec<&str> = array(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("GGUF has no tokenizer.ggml.tokens"))?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| anyhow!("tokenizer.ggml.tokens[{}] is not a string", i))
        })
        .collect::<Result<_>>()?;
    let n = tokens.len();
    let scores: Vec<f64> = match array(g, "tokenizer.ggml.scores")? {
        Some(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .ok_or_else(|| anyhow!("tokenizer.ggml.scores[{}] is not a number", i))
            })
            .collect::<Result<_>>()?,
        None => bail!("GGUF has no tokenizer.ggml.scores (required for a SentencePiece tokenizer)"),
    };
    let types: Vec<i64> = match array(g, "tokenizer.ggml.token_type")? {
        Some(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .ok_or_else(|| anyhow!("tokenizer.ggml.token_type[{}] is not an integer", i))
            })
            .collect::<Result<_>>()?,
        None => vec![TOKEN_TYPE_NORMAL; n],
    };
    if scores.len() != n || types.len() != n {
        bail!(
            "tokenizer.ggml.scores has {} and token_type {} entries, but there are {} tokens",
            scores.len(),
            types.len(),
            n
        );
    }

    // Vocab in id order; a duplicated piece keeps its first id.
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(n);
    let mut vocab: Vec<(String, u64)> = Vec::with_capacity(n);
    let mut dups = 0;
    for (i, t) in tokens.iter().enumerate() {
        if ids.contains_key(t) {
            dups += 1;
            continue;
        }
        ids.insert(t, i);
        vocab.push((t.to_string(), i as u64));
    }
    if dups > 0 {
        warnings.push(format!(
            "{dups} duplicated token strings in the GGUF vocab were dropped from tokenizer.json"
        ));
    }

    // Merges from the scores of normal pieces.
    let normal = |id: usize| types[id] == TOKEN_TYPE_NORMAL;
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !normal(id) || ids.get(piece) != Some(&id) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                if normal(li) && normal(ri) {
                    merges.push((scores[id], li, ri));
                }
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<[&str; 2]> = merges
        .iter()
        .map(|&(_, l, r)| [tokens[l], tokens[r]])
        .collect();

    let id_opt = |key: &str| -> Result<Option<u64>> {
        let id = g.get_u64(key)?;
        if let Some(id) = id {
            if id as usize >= n {
                bail!(
                    "{} = {} is out of range for a vocab of {} tokens",
                    key,
                    id,
                    n
                );
            }
        }
        Ok(id)
    };
    let bos = id_opt("tokenizer.ggml.bos_token_id")?;
    let eos = id_opt("tokenizer.ggml.eos_token_id")?;
    let unk = id_opt("tokenizer.ggml.unknown_token_id")?.or_else(|| {
        types
            .iter()
            .position(|&t| t == TOKEN_TYPE_UNKNOWN)
            .map(|i| i as u64)
    });
    let pad = id_opt("tokenizer.ggml.padding_token_id")?;
    let mut extra_eos = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = id_opt(key)? {
            if Some(id) != eos && !extra_eos.contains(&id) {
                extra_eos.push(id);
            }
        }
    }
    // llama.cpp's defaults for SPM vocabularies.
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let add_space_prefix = g
        .get_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);

    // Control and unknown tokens are special added tokens, matched whole in
    // the raw text; user-defined ones are plain added tokens matched after
    // normalization, so a piece like "▁▁" matches two spaces, as llama.cpp
    // (which unescapes SPM user-defined pieces) does.
    let referenced: Vec<u64> = [bos, eos, unk, pad]
        .into_iter()
        .flatten()
        .chain(extra_eos.iter().copied())
        .collect();
    let mut added_tokens = Vec::new();
    let mut added_decoder = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types[i];
        let special = ty == TOKEN_TYPE_CONTROL
            || ty == TOKEN_TYPE_UNKNOWN
            || referenced.contains(&(i as u64));
        if !(special || ty == TOKEN_TYPE_USER_DEFINED) || t.is_empty() || ids.get(t) != Some(&i) {
            continue;
        }
        let entry = json!({"content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": !special, "special": special});
        let mut with_id = json!({"id": i});
        with_id
            .as_object_mut()
            .unwrap()
            .extend(entry.as_object().unwrap().clone());
        added_tokens.push(with_id);
        added_decoder.insert(i.to_string(), entry);
    }

    let tok = |id: Option<u64>| id.map(|i| tokens[i as usize].to_string());
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    for (on, id, seq) in [
        (add_bos, bos, false),
        (true, None, true),
        (add_eos, eos, false),
    ] {
        if seq {
            single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        } else if on {
            let s = tok(id).ok_or_else(|| {
                anyhow!("tokenizer.ggml.add_bos/eos_token is true but the token id is missing")
            })?;
            single.push(json!({"SpecialToken": {"id": s, "type_id": 0}}));
            specials.insert(s.clone(), json!({"id": s, "ids": [id], "tokens": [s]}));
        }
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|p| {
        let mut p = p.clone();
        if let Some(s) = p.get_mut("Sequence") {
            *s = json!({"id": "B", "type_id": 1});
        } else if let Some(s) = p.get_mut("SpecialToken") {
            s["type_id"] = json!(1);
        }
        p
    }));

    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let vocab_obj: serde_json::Map<String, Value> =
        vocab.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": tok(unk), "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_obj, "merges": merges,
        },
    });
    let tokenizer_json = ordered_vocab_json(&tj, &vocab)?;

    let (tokenizer_config, special_tokens_map) = crate::convert::tokenizer::config_files(
        g,
        &tok,
        crate::convert::tokenizer::SpecialIds { bos, eos, unk, pad },
        (add_bos, add_eos),
        added_decoder,
        context_length,
        &[("spaces_between_special_tokens", json!(false))],
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

/// Pretty JSON with the BPE vocab in id order (serde_json's map sorts keys).
fn ordered_vocab_json(tj: &Value, vocab: &[(String, u64)]) -> Result<String> {
    let mut tj = tj.clone();
    tj["model"]["vocab"] = json!("\u{0}rmlx-vocab\u{0}");
    let text = serde_json::to_string_pretty(&tj)?;
    let mut v = String::from("{\n");
    for (i, (k, id)) in vocab.iter().enumerate() {
        let sep = if i + 1 == vocab.len() { "" } else { "," };
        v.push_str(&format!(
            "      {}: {}{}\n",
            serde_json::to_string(k)?,
            id,
            sep
        ));
    }
    v.push_str("    }");
    let marker = "\"\\u0000rmlx-vocab\\u0000\"";
    if text.matches(marker).count() != 1 {
        bail!("internal error: vocab marker not unique in tokenizer.json");
    }
    Ok(text.replacen(marker, &v, 1))
}
