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

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

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

/// Incremental detokenizer: feed generated ids one at a time, get back the text they complete.
///
/// It decodes the window `ids[prefix_offset..]` and emits what goes beyond the decode of
/// `ids[prefix_offset..read_offset]` (the last emitted step), holding text back while it
/// ends in U+FFFD (a UTF-8 sequence split across byte-level / byte-fallback tokens).
/// Decoding a window that starts one step back keeps SentencePiece-style decoders (which
/// treat the first token's leading space specially) consistent. The concatenation of all
/// [`step`](Self::step) outputs and a final [`flush`](Self::flush) equals
/// `decode(all_ids, skip_special)`.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new(tokenizer: &Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token id; returns the newly completed text (empty if none yet).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.advance(false)
    }

    /// Adds several ids; returns the newly completed text.
    pub fn step_many(&mut self, ids: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(ids);
        self.advance(false)
    }

    /// Emits whatever is still held back (an incomplete UTF-8 tail comes out as U+FFFD,
    /// as a full decode would show it). Call once at the end of generation.
    pub fn flush(&mut self) -> Result<String> {
        self.advance(true)
    }

    /// Forgets all state, ready for a new sequence.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }

    /// True if some ids have not produced text yet.
    pub fn has_pending(&self) -> bool {
        self.read_offset < self.ids.len()
    }

    fn advance(&mut self, force: bool) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let tok = &self.tokenizer;
        let prefix = if self.read_offset > self.prefix_offset {
            tok.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special,
            )?
        } else {
            String::new()
        };
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let complete = full.len() > prefix.len() && !full.ends_with('\u{FFFD}');
        if !complete && !force {
            return Ok(String::new());
        }
        let new_text = if let Some(rest) = full.strip_prefix(prefix.as_str()) {
            rest.to_owned()
        } else {
            // A decoder that rewrote earlier text: emit past the common prefix.
            let common = full
                .char_indices()
                .zip(prefix.chars())
                .take_while(|((_, a), b)| a == b)
                .last()
                .map(|((i, c), _)| i + c.len_utf8())
                .unwrap_or(0);
            full[common..].to_owned()
        };
        // Only move the window when the text grew; otherwise keep the ids (e.g. skipped
        // special tokens) so a later flush still sees them.
        if full.len() > prefix.len() || force {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(new_text)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
    }

    fn expected() -> Value {
        let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (String, usize) {
        let mut d = tok.stream_decoder(skip);
        let mut out = String::new();
        let mut pieces = 0;
        for &id in ids {
            let s = d.step(id).unwrap();
            assert!(
                !s.contains('\u{FFFD}'),
                "streamed a replacement char: {s:?}"
            );
            if !s.is_empty() {
                pieces += 1;
            }
            out.push_str(&s);
        }
        out.push_str(&d.flush().unwrap());
        (out, pieces)
    }

    #[test]
    fn encode_decode_match_transformers() {
        let exp = expected();
        for (model, m) in exp["models"].as_object().unwrap() {
            let tok = test_tokenizer(model);
            assert_eq!(
                tok.bos_id(),
                if model == "qwen3" {
                    None
                } else {
                    m["bos_token_id"].as_u64().map(|x| x as u32)
                },
                "{model} bos"
            );
            assert_eq!(
                tok.eos_token_id(),
                m["eos_token_id"].as_u64().map(|x| x as u32),
                "{model} eos"
            );
            assert_eq!(
                tok.vocab_size() as u64,
                m["vocab_size_with_added"].as_u64().unwrap(),
                "{model} vocab"
            );
            for e in m["encodings"].as_array().unwrap() {
                let text = e["text"].as_str().unwrap();
                let plain = tok.encode(text, false).unwrap();
                assert_eq!(plain, ids(&e["ids"]), "{model} encode({text:?}, false)");
                let special = tok.encode(text, true).unwrap();
                assert_eq!(
                    special,
                    ids(&e["ids_with_special"]),
                    "{model} encode({text:?}, true)"
                );
                assert_eq!(
                    tok.decode(&plain, false).unwrap(),
                    e["decoded"].as_str().unwrap(),
                    "{model} decode"
                );
                assert_eq!(
                    tok.decode(&special, true).unwrap(),
                    e["decoded_with_special_skipped"].as_str().unwrap(),
                    "{model} decode skip"
                );
            }
        }
    }

    #[test]
    fn stream_decoder_matches_full_decode() {
        let exp = expected();
        for (model, m) in exp["models"].as_object().unwrap() {
            let tok = test_tokenizer(model);
            let mut cases: Vec<Vec<u32>> = Vec::new();
            for e in m["encodings"].as_array().unwrap() {
                cases.push(ids(&e["ids"]));
                cases.push(ids(&e["ids_with_special"]));
            }
            for c in m["chat"].as_array().unwrap() {
                if let Some(x) = c.get("expected_ids") {
                    cases.push(ids(x));
                }
            }
            for case in &cases {
                for skip in [false, true] {
                    let full = tok.decode(case, skip).unwrap();
                    let (streamed, _) = stream(&tok, case, skip);
                    assert_eq!(streamed, full, "{model} skip={skip} ids={case:?}");
                }
            }
        }
    }

    #[test]
    fn stream_decoder_holds_split_utf8() {
        // "🙂" in byte-level BPE is several tokens; nothing may be emitted mid-character.
        for model in ["qwen3", "llama3_1", "gemma3"] {
            let tok = test_tokenizer(model);
            let text = "a🙂👍🏽中文é";
            let ids = tok.encode(text, false).unwrap();
            let mut d = tok.stream_decoder(false);
            let mut out = String::new();
            for &id in &ids {
                let s = d.step(id).unwrap();
                assert!(!s.contains('\u{FFFD}'), "{model}: {s:?}");
                out.push_str(&s);
            }
            assert!(
                !d.has_pending(),
                "{model}: all text complete after the last token"
            );
            assert_eq!(out, text, "{model}");
            // A dangling partial character comes out as U+FFFD on flush, as decode shows it.
            let mut d = tok.stream_decoder(false);
            let ids = tok.encode("x中", false).unwrap();
            let full_bytes = ids.len();
            let mut out = String::new();
            for &id in &ids[..full_bytes - 1] {
                out.push_str(&d.step(id).unwrap());
            }
            out.push_str(&d.flush().unwrap());
            assert_eq!(
                out,
                tok.decode(&ids[..full_bytes - 1], false).unwrap(),
                "{model}"
            );
        }
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<StreamDecoder>();
        assert_send_sync::<crate::model::chat_template::ChatTemplate>();
    }

    #[test]
    fn special_tokens_and_ids() {
        let tok = test_tokenizer("qwen3");
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
        assert_eq!(tok.id_to_token(151645).as_deref(), Some("<|im_end|>"));
        assert!(tok.is_special(151645));
        assert!(!tok.is_special(9707));
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(ids[0], 151644);
        assert_eq!(*ids.last().unwrap(), 151645);
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
        assert_eq!(tok.bos_token(), None);
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));

        let tok = test_tokenizer("gemma3");
        assert_eq!(tok.bos_token(), Some("<bos>"));
        assert_eq!(tok.bos_id(), Some(2));
        let tok = test_tokenizer("llama3_1");
        assert_eq!(tok.bos_id(), Some(128000));
        assert_eq!(tok.encode("", true).unwrap(), vec![128000]);
    }

    #[test]
    fn add_bos_token_flag_rebuilds_post_processor() {
        // Gemma's config says add_bos_token=true; flipping it off must drop BOS, as in HF.
        let dir = fixtures().join("gemma3");
        let mut cfg: Value = read_json_opt(&dir.join("tokenizer_config.json"))
            .unwrap()
            .unwrap();
        cfg["add_bos_token"] = Value::Bool(false);
        let tok = Tokenizer::from_file_with_config(&dir.join("tokenizer.json"), Some(&cfg), None)
            .unwrap();
        assert_eq!(tok.bos_id(), None);
        assert_eq!(
            tok.encode("Hello", true).unwrap(),
            tok.encode("Hello", false).unwrap()
        );
        cfg["add_eos_token"] = Value::Bool(true);
        let tok = Tokenizer::from_file_with_config(&dir.join("tokenizer.json"), Some(&cfg), None)
            .unwrap();
        let ids = tok.encode("Hello", true).unwrap();
        assert_eq!(*ids.last().unwrap(), 106, "eos <end_of_turn> appended");
    }
}
