//! Stop tokens and sampling defaults of a model directory.
//!
//! EOS ids are the union (first-seen order, no duplicates) of
//! `config.json` `eos_token_id` (int or list; also looked up in `text_config` for
//! multimodal configs), `generation_config.json` `eos_token_id` (int or list), and the id of
//! the tokenizer's `eos_token` (from the loaded [`Tokenizer`], else from
//! `tokenizer_config.json` + `tokenizer.json`'s added tokens).

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::tokenizer::{read_json_opt, token_content, Tokenizer};

/// Sampling defaults from `generation_config.json` (all optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_id: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    pub max_length: Option<u32>,
}

impl GenerationConfig {
    /// Reads `<dir>/generation_config.json`; a missing file gives the all-`None` default.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        match read_json_opt(&dir.as_ref().join("generation_config.json"))? {
            Some(v) => Ok(Self::from_json(&v)),
            None => Ok(Self::default()),
        }
    }

    /// Parses a `generation_config.json` value; unknown or mistyped fields are ignored.
    pub fn from_json(v: &Value) -> Self {
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let u = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .and_then(|x| u32::try_from(x).ok())
        };
        Self {
            eos_token_id: v.get("eos_token_id").map(id_list).unwrap_or_default(),
            bos_token_id: u("bos_token_id"),
            pad_token_id: u("pad_token_id"),
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: u("top_k"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: u("max_new_tokens"),
            max_length: u("max_length"),
        }
    }
}

/// `eos_token_id` as written in config files: an int, a list of ints, or null.
fn id_list(v: &Value) -> Vec<u32> {
    let one = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
    match v {
        Value::Array(a) => a.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

fn push_unique(out: &mut Vec<u32>, ids: impl IntoIterator<Item = u32>) {
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
}

/// The tokenizer's `eos_token` id without a loaded tokenizer: `tokenizer_config.json`'s
/// `eos_token` looked up in `tokenizer.json`'s `added_tokens` (where special tokens live).
fn eos_from_tokenizer_files(dir: &Path) -> Result<Option<u32>> {
    let Some(cfg) = read_json_opt(&dir.join("tokenizer_config.json"))? else {
        return Ok(None);
    };
    let Some(eos) = cfg.get("eos_token").and_then(token_content) else {
        return Ok(None);
    };
    // added_tokens_decoder in tokenizer_config.json maps "id" -> {content}
    if let Some(Value::Object(dec)) = cfg.get("added_tokens_decoder") {
        for (id, tok) in dec {
            if token_content(tok).as_deref() == Some(eos.as_str()) {
                if let Ok(id) = id.parse() {
                    return Ok(Some(id));
                }
            }
        }
    }
    if let Some(tj) = read_json_opt(&dir.join("tokenizer.json"))? {
        if let Some(Value::Array(added)) = tj.get("added_tokens") {
            for t in added {
                if t.get("content").and_then(Value::as_str) == Some(eos.as_str()) {
                    if let Some(id) = t.get("id").and_then(Value::as_u64) {
                        return Ok(u32::try_from(id).ok());
                    }
                }
            }
        }
        if let Some(id) = tj
            .pointer("/model/vocab")
            .and_then(|v| v.get(&eos))
            .and_then(Value::as_u64)
        {
            return Ok(u32::try_from(id).ok());
        }
    }
    Ok(None)
}

/// All EOS / stop ids of a model dir: `config.json` ∪ `generation_config.json` ∪ tokenizer
/// `eos_token`, in that order, without duplicates. Unreadable files are skipped.
pub fn eos_ids(model_dir: impl AsRef<Path>, tokenizer: Option<&Tokenizer>) -> Vec<u32> {
    let dir = model_dir.as_ref();
    let mut out = Vec::new();
    if let Ok(Some(cfg)) = read_json_opt(&dir.join("config.json")) {
        let v = cfg
            .get("eos_token_id")
            .filter(|v| !v.is_null())
            .or_else(|| cfg.pointer("/text_config/eos_token_id"));
        if let Some(v) = v {
            push_unique(&mut out, id_list(v));
        }
    }
    if let Ok(gc) = GenerationConfig::from_model_dir(dir) {
        push_unique(&mut out, gc.eos_token_id);
    }
    let tok_eos = match tokenizer {
        Some(t) => t.eos_token_id(),
        None => eos_from_tokenizer_files(dir).ok().flatten(),
    };
    push_unique(&mut out, tok_eos);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
    }

    #[test]
    fn eos_ids_of_fixture_models() {
        for (model, want) in [
            ("qwen3", vec![151645, 151643]),
            ("gemma3", vec![1, 106]),
            ("llama3_1", vec![128001, 128008, 128009]),
        ] {
            let dir = fixtures().join(model);
            assert_eq!(eos_ids(&dir, None), want, "{model} without tokenizer");
            let tok = super::super::tokenizer::test_tokenizer(model);
            assert_eq!(eos_ids(&dir, Some(&tok)), want, "{model} with tokenizer");
        }
    }

    #[test]
    fn eos_union_int_and_list_and_tokenizer() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("config.json"), r#"{"eos_token_id": 7}"#).unwrap();
        std::fs::write(
            d.join("generation_config.json"),
            r#"{"eos_token_id": [9, 7, 8], "temperature": 0.7, "top_k": 40, "top_p": 0.8}"#,
        )
        .unwrap();
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "</s>", "lstrip": false, "__type": "AddedToken"},
                "added_tokens_decoder": {"2": {"content": "</s>", "special": true}}}"#,
        )
        .unwrap();
        assert_eq!(eos_ids(d, None), vec![7, 9, 8, 2]);

        let gc = GenerationConfig::from_model_dir(d).unwrap();
        assert_eq!(gc.temperature, Some(0.7));
        assert_eq!(gc.top_k, Some(40));
        assert_eq!(gc.top_p, Some(0.8));
        assert_eq!(gc.min_p, None);
        assert_eq!(gc.eos_token_id, vec![9, 7, 8]);

        // multimodal config: eos under text_config; missing generation_config is fine
        std::fs::write(
            d.join("config.json"),
            r#"{"text_config": {"eos_token_id": [1, 106]}}"#,
        )
        .unwrap();
        std::fs::remove_file(d.join("generation_config.json")).unwrap();
        assert_eq!(eos_ids(d, None), vec![1, 106, 2]);
        assert_eq!(
            GenerationConfig::from_model_dir(d).unwrap(),
            GenerationConfig::default()
        );
    }

    #[test]
    fn sampling_defaults_from_fixtures() {
        let q = GenerationConfig::from_model_dir(fixtures().join("qwen3")).unwrap();
        assert_eq!(
            (q.temperature, q.top_p, q.top_k),
            (Some(0.6), Some(0.95), Some(20))
        );
        assert_eq!(q.do_sample, Some(true));
        let l = GenerationConfig::from_model_dir(fixtures().join("llama3_1")).unwrap();
        assert_eq!(
            (l.temperature, l.top_p, l.top_k),
            (Some(0.6), Some(0.9), None)
        );
        let g = GenerationConfig::from_model_dir(fixtures().join("gemma3")).unwrap();
        assert_eq!(
            (g.temperature, g.top_p, g.top_k),
            (None, Some(0.95), Some(64))
        );
    }
}
