//! Constrained decoding with llguidance: token masks that make the output follow a JSON
//! schema, a regex, a Lark grammar, or a model's tool-call format.
//!
//! The token trie is built here from the host tokenizer's vocabulary (the
//! `toktrie_hf_tokenizers` adapter pins tokenizers 0.21), once per tokenizer and EOS set,
//! and cached ([`ConstraintFactory::for_tokenizer`]). Per request, [`Constraint::new`]
//! compiles the grammar (about a millisecond for typical schemas) and then, per step:
//! [`Constraint::apply`] masks the logits, [`Constraint::commit`] advances with the sampled
//! token, [`Constraint::is_finished`] says when nothing but EOS may follow.

mod grammar;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::api::tools::ToolFormat;
use crate::model::tokenizer::Tokenizer;

pub use grammar::lark_for_tool_call;

/// What the output must follow.
#[derive(Debug, Clone)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against `schema`. `strict: false` ignores keywords llguidance does not
    /// support; `strict: true` rejects such schemas.
    JsonSchema { schema: Value, strict: bool },
    /// Text matching a regex (whole output).
    Regex(String),
    /// A Lark grammar (llguidance dialect: `%json {..}` and special tokens `<|x|>` allowed).
    Lark(String),
    /// One (or, with `parallel`, several) tool calls in the model's own format. `tools` is the
    /// request's tools array (OpenAI `{"type":"function","function":{..}}`, bare
    /// `{"name","parameters"}` or Anthropic `{"name","input_schema"}`); `name` fixes the
    /// function (`tool_choice` naming one), otherwise any of `tools` (`required`).
    ToolCall {
        format: ToolFormat,
        tools: Value,
        name: Option<String>,
        parallel: bool,
    },
}

/// Token trie and parser factory for one tokenizer (and EOS set). Build once per model.
pub struct ConstraintFactory {
    factory: ParserFactory,
    tokenizer: Tokenizer,
    vocab: usize,
}

impl std::fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintFactory")
            .field("vocab", &self.vocab)
            .finish()
    }
}

struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer.encode(s, false).unwrap_or_default()
        })
    }
}

type CacheEntry = (usize, Vec<u32>, Tokenizer, Arc<ConstraintFactory>);
static CACHE: Mutex<Vec<CacheEntry>> = Mutex::new(Vec::new());
const CACHE_SIZE: usize = 8;

impl ConstraintFactory {
    /// Builds the token trie for `tokenizer`. `eos_ids` are the ids that end generation
    /// (the model's EOS set); empty means the tokenizer's `eos_token`.
    pub fn new(tokenizer: &Tokenizer, eos_ids: &[u32]) -> Result<Self> {
        let bytes = token_bytes(tokenizer)?;
        let vocab = bytes.len();
        let mut eos: Vec<u32> = eos_ids.iter().copied().filter(|&e| (e as usize) < vocab).collect();
        if eos.is_empty() {
            eos.extend(tokenizer.eos_token_id());
        }
        if eos.is_empty() {
            bail!("constrained decoding needs an EOS token id");
        }
        let info = TokRxInfo::new(vocab as u32, eos[0]);
        let mut trie = TokTrie::from(&info, &bytes);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )?;
        factory.quiet();
        Ok(Self {
            factory,
            tokenizer: tokenizer.clone(),
            vocab,
        })
    }

    /// The cached factory for this tokenizer and EOS set (built on first use; building
    /// takes a few hundred ms for a 150k vocabulary).
    pub fn for_tokenizer(tokenizer: &Tokenizer, eos_ids: &[u32]) -> Result<Arc<Self>> {
        let key = tokenizer.inner() as *const tokenizers::Tokenizer as usize;
        let mut eos = eos_ids.to_vec();
        eos.sort_unstable();
        eos.dedup();
        {
            let cache = CACHE.lock().unwrap();
            if let Some((_, _, _, f)) = cache.iter().find(|(k, e, _, _)| *k == key && *e == eos) {
                return Ok(f.clone());
            }
        }
        // Built outside the lock; the entry keeps the tokenizer alive so its address is
        // not reused while cached.
        let f = Arc::new(Self::new(tokenizer, &eos)?);
        let mut cache = CACHE.lock().unwrap();
        if cache.len() >= CACHE_SIZE {
            cache.remove(0);
        }
        cache.push((key, eos, tokenizer.clone(), f.clone()));
        Ok(f)
    }

    /// Vocabulary size of the trie (logits beyond it are always masked).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The tokenizer the trie was built from.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The llguidance grammar for `spec`.
    pub fn grammar(&self, spec: &ConstraintSpec) -> Result<TopLevelGrammar> {
        grammar::top_level(spec, &self.tokenizer)
    }

    /// A fresh constraint for one generation.
    pub fn constraint(self: &Arc<Self>, spec: &ConstraintSpec) -> Result<Constraint> {
        let g = self.grammar(spec)?;
        let parser = self.factory.create_parser(g)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("{e}");
        }
        Ok(Constraint {
            matcher,
            factory: self.clone(),
            mask: None,
        })
    }
}

/// The token-level constraint of one generation.
pub struct Constraint {
    matcher: Matcher,
    factory: Arc<ConstraintFactory>,
    /// Mask computed for the current step (reused until the next commit).
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Constraint {
    /// A constraint over `tokenizer`'s vocabulary, ending with its `eos_token`.
    pub fn new(tokenizer: &Tokenizer, spec: ConstraintSpec) -> Result<Self> {
        Self::with_eos(tokenizer, spec, &[])
    }

    /// A constraint whose end is any of `eos_ids` (the model's EOS set, e.g. Llama 3's
    /// `<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>`).
    pub fn with_eos(tokenizer: &Tokenizer, spec: ConstraintSpec, eos_ids: &[u32]) -> Result<Self> {
        ConstraintFactory::for_tokenizer(tokenizer, eos_ids)?.constraint(&spec)
    }

    fn current_mask(&mut self) -> Result<&SimpleVob> {
        if self.mask.is_none() {
            let m = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| anyhow!("constraint: {e}"))?;
            self.mask = Some(m);
        }
        Ok(self.mask.as_ref().unwrap())
    }

    /// Sets every token the grammar does not allow next to -inf (logits may be longer than
    /// the vocabulary: the tail is masked). On an internal error the logits are left alone.
    pub fn apply(&mut self, logits: &mut [f32]) {
        if let Err(e) = self.try_apply(logits) {
            tracing::warn!("{e}");
        }
    }

    /// [`apply`](Self::apply), reporting errors.
    pub fn try_apply(&mut self, logits: &mut [f32]) -> Result<()> {
        let vocab = self.factory.vocab;
        let mask = self.current_mask()?;
        let words = mask.as_slice();
        let n = logits.len().min(vocab);
        for (w, &bits) in words.iter().enumerate() {
            if bits == u32::MAX {
                continue;
            }
            let base = w * 32;
            if base >= n {
                break;
            }
            for b in 0..32 {
                let i = base + b;
                if i >= n {
                    break;
                }
                if bits & (1 << b) == 0 {
                    logits[i] = f32::NEG_INFINITY;
                }
            }
        }
        for l in logits.iter_mut().skip(vocab) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Whether `token` is allowed next.
    pub fn is_allowed(&mut self, token: u32) -> Result<bool> {
        let vocab = self.factory.vocab;
        Ok((token as usize) < vocab && self.current_mask()?.is_allowed(token))
    }

    /// How many of `tokens` (from the front) the grammar would accept now; consumes none.
    pub fn validate_tokens(&mut self, tokens: &[u32]) -> Result<usize> {
        self.matcher
            .validate_tokens(tokens)
            .map_err(|e| anyhow!("constraint: {e}"))
    }

    /// Advances past the sampled `token` (an EOS id ends the constraint). Errors if the
    /// grammar does not allow it.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        if self.matcher.is_stopped() && !self.matcher.is_error() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("constraint: token {token} not allowed: {e}"))
    }

    /// True when the grammar is complete and nothing but EOS may follow (the engine can
    /// stop without sampling), or after an EOS was committed.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether EOS is allowed now (the output so far is complete).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Tokens the grammar forces next (may be fed without sampling). Optional speed-up.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// The error that stopped the constraint, if any.
    pub fn error(&self) -> Option<String> {
        self.matcher.get_error()
    }
}

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
fn token_bytes(tokenizer: &Tokenizer) -> Result<Vec<Vec<u8>>> {
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
