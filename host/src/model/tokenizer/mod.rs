//! Tokenizer for mlx-community model directories: a thin wrapper around the Hugging Face
//! `tokenizers` crate that applies the same `tokenizer_config.json` tweaks as
//! `transformers` (BOS/EOS post-processor, special tokens), plus an incremental
//! detokenizer ([`StreamDecoder`]) for streaming generation.
//!
//! BOS handling follows transformers (v5 `TokenizersBackend`): when `tokenizer_config.json`
//! sets `add_bos_token` / `add_eos_token` explicitly, or `tokenizer.json` has no
//! post-processor, the post-processor is rebuilt as `[bos] $A [eos]` from those flags;
//! otherwise the post-processor in `tokenizer.json` is used as is. [`Tokenizer::bos_id`]
//! tells whether `encode(text, true)` prepends a BOS. Chat templates usually emit
//! `bos_token` themselves, so a rendered chat prompt must be encoded with
//! `add_special_tokens = false` (what `apply_chat_template(tokenize=True)` does).

mod special_tokens;
mod stream;
#[cfg(test)]
mod tests;

pub(crate) use special_tokens::{named_special_tokens, read_json_opt, token_content};
pub use stream::StreamDecoder;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

/// A loaded tokenizer. Cheap to clone (the vocabulary is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Some(id) iff `encode(_, true)` starts with the BOS token.
    bos_id: Option<u32>,
    special_ids: Arc<HashSet<u32>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("bos_id", &self.bos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory, with `tokenizer_config.json` and
    /// `special_tokens_map.json` when present.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let stm = read_json_opt(&dir.join("special_tokens_map.json"))?;
        Self::from_file_with_config(&dir.join("tokenizer.json"), config.as_ref(), stm.as_ref())
    }

    /// Loads a `tokenizer.json` file, applying an optional parsed `tokenizer_config.json`
    /// (and legacy `special_tokens_map.json`).
    pub fn from_file_with_config(
        tokenizer_json: &Path,
        config: Option<&Value>,
        special_tokens_map: Option<&Value>,
    ) -> Result<Self> {
        let mut tok = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("loading {}: {e}", tokenizer_json.display()))?;
        let cfg = |k: &str| config.and_then(|c| c.get(k));

        let named = named_special_tokens(config, special_tokens_map);
        let named_get = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let bos_token = named_get("bos_token");
        let eos_token = named_get("eos_token");

        if cfg("split_special_tokens").and_then(Value::as_bool) == Some(true) {
            tok.set_encode_special_tokens(true);
        }

        // transformers adds named special tokens that the vocabulary lacks.
        let missing: Vec<AddedToken> = named
            .iter()
            .filter(|(_, t)| tok.token_to_id(t).is_none())
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        if !missing.is_empty() {
            tok.add_special_tokens(&missing);
        }

        // transformers v5: rebuild the post-processor from add_bos_token/add_eos_token when the
        // config names either flag, or when tokenizer.json has none.
        let explicit = config
            .is_some_and(|c| c.get("add_bos_token").is_some() || c.get("add_eos_token").is_some());
        if explicit || tok.get_post_processor().is_none() {
            let flag = |k: &str| cfg(k).and_then(Value::as_bool).unwrap_or(false);
            let bos = bos_token
                .as_ref()
                .filter(|_| flag("add_bos_token"))
                .and_then(|t| tok.token_to_id(t).map(|id| (t.clone(), id)));
            let eos = eos_token
                .as_ref()
                .filter(|_| flag("add_eos_token"))
                .and_then(|t| tok.token_to_id(t).map(|id| (t.clone(), id)));
            let tp = build_template(bos.clone(), eos.clone())?;
            tok.with_post_processor(Some(tp));
        }

        let bos_token_id = bos_token.as_deref().and_then(|t| tok.token_to_id(t));
        let probe = tok
            .encode_fast("", true)
            .map_err(|e| anyhow!("probing special tokens: {e}"))?;
        let bos_id = match (probe.get_ids().first(), bos_token_id) {
            (Some(&first), Some(b)) if first == b => Some(b),
            _ => None,
        };

        let special_ids = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();

        Ok(Self {
            inner: Arc::new(tok),
            bos_token,
            eos_token,
            bos_id,
            special_ids: Arc::new(special_ids),
        })
    }

    /// Token ids of `text`. With `add_special_tokens` the post-processor adds what the model
    /// expects around a single sequence (e.g. BOS for Llama 3 / Gemma 3, nothing for Qwen 3).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow!("encode: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (no `clean_up_tokenization_spaces` post-edit, unlike some HF configs).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("decode: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id iff `encode(text, true)` prepends it (HF default behaviour); `None` for
    /// tokenizers that add no BOS (e.g. Qwen).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// `bos_token` from the tokenizer config (what chat templates see as `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` from the tokenizer config.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Id of `eos_token`, if it is in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether `id` is a special added token (skipped by `decode(_, true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// A fresh incremental detokenizer over this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(self, skip_special)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn build_template(
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<TemplateProcessing> {
    let piece =
        |t: &Option<(String, u32)>, type_id: u32| t.as_ref().map(|(s, _)| format!("{s}:{type_id}"));
    let single: Vec<String> = [piece(&bos, 0), Some("$A:0".into()), piece(&eos, 0)]
        .into_iter()
        .flatten()
        .collect();
    let pair: Vec<String> = single
        .iter()
        .cloned()
        .chain(
            [piece(&bos, 1), Some("$B:1".into()), piece(&eos, 1)]
                .into_iter()
                .flatten(),
        )
        .collect();
    let mut specials: Vec<(String, u32)> = Vec::new();
    for t in [bos, eos].into_iter().flatten() {
        if !specials.iter().any(|(s, _)| *s == t.0) {
            specials.push(t);
        }
    }
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| anyhow!("post-processor template: {e}"))?
        .try_pair(pair)
        .map_err(|e| anyhow!("post-processor template: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow!("post-processor template: {e}"))
}

/// Test helper: the fixture tokenizer `model` (qwen3 / gemma3 / llama3_1), loaded once.
#[cfg(test)]
pub(crate) fn test_tokenizer(model: &str) -> Tokenizer {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<String, Tokenizer>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    cache
        .entry(model.to_owned())
        .or_insert_with(|| {
            let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/tokenizers")
                .join(model);
            Tokenizer::from_model_dir(dir).unwrap()
        })
        .clone()
}

