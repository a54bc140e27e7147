//! Special tokens as transformers names them: the seven standard attributes,
//! `extra_special_tokens`, read from `tokenizer_config.json` or the legacy
//! `special_tokens_map.json`.
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// Named special-token attributes of a transformers tokenizer (`SPECIAL_TOKENS_ATTRIBUTES`).
pub(crate) const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The text of a token as written in `tokenizer_config.json` / `special_tokens_map.json`:
/// either a plain string or an AddedToken object `{"content": "...", ...}`.
pub(crate) fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Reads a JSON file if it exists. `Ok(None)` when absent.
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(v))
}

/// The named special tokens of a model dir as transformers sees them (`special_tokens_map`):
/// the seven standard names plus the keys of an `extra_special_tokens` object, taken from
/// `tokenizer_config.json`, falling back to the legacy `special_tokens_map.json`.
/// Tokens that are `null` / absent are left out, as in transformers.
pub(crate) fn named_special_tokens(
    config: Option<&Value>,
    special_tokens_map: Option<&Value>,
) -> Vec<(String, String)> {
    let mut names: Vec<String> = SPECIAL_TOKEN_NAMES.iter().map(|s| s.to_string()).collect();
    for src in [config, special_tokens_map].into_iter().flatten() {
        if let Some(Value::Object(extra)) = src.get("extra_special_tokens") {
            for k in extra.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
    }
    let lookup = |name: &str| -> Option<String> {
        let from = |src: Option<&Value>| {
            src.and_then(|c| {
                c.get(name)
                    .or_else(|| c.get("extra_special_tokens").and_then(|e| e.get(name)))
            })
            .and_then(token_content)
        };
        from(config).or_else(|| from(special_tokens_map))
    };
    names
        .into_iter()
        .filter_map(|n| lookup(&n).map(|t| (n, t)))
        .collect()
}
