//! [`ConstraintFactory`]: the token trie of one tokenizer (and EOS set), and the
//! grammar compiler that checks a spec can be followed and finished before it is used.
use std::sync::Arc;

use anyhow::{bail, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use super::{cache, closing, grammar, limits, vocab, Constraint, ConstraintSpec, SpecError};
use crate::model::tokenizer::Tokenizer;

/// Token trie and parser factory for one tokenizer (and EOS set). Build once per model.
pub struct ConstraintFactory {
    factory: ParserFactory,
    pub(super) tokenizer: Tokenizer,
    pub(super) vocab: usize,
    /// Token ids of the closing planner's candidate texts.
    pub(super) cands: closing::Candidates,
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

/// Tokens of the closing plan tried when compiling (a grammar that fails within them is refused).
const COMPILE_PLAN: usize = 64;

impl ConstraintFactory {
    /// Builds the token trie for `tokenizer`. `eos_ids` are the ids that end generation
    /// (the model's EOS set); empty means the tokenizer's `eos_token`. Slow for big
    /// vocabularies (a few hundred ms for 150k): use the cached [`for_model`](Self::for_model).
    pub fn new(tokenizer: &Tokenizer, eos_ids: &[u32]) -> Result<Self> {
        let bytes = vocab::token_bytes(tokenizer)?;
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
        *factory.limits_mut() = limits::parser_limits();
        Ok(Self {
            factory,
            cands: closing::Candidates::new(tokenizer, &grammar::ALL_CLOSERS),
            tokenizer: tokenizer.clone(),
            vocab,
        })
    }

    /// The cached factory of model `model` (its id) with this tokenizer and EOS set.
    /// Blocks (builds the trie) on first use: call it off the async runtime.
    pub fn for_model(model: &str, tokenizer: &Tokenizer, eos_ids: &[u32]) -> Result<Arc<Self>> {
        cache::factory(&format!("model:{model}"), tokenizer, eos_ids)
    }

    /// The cached factory for this tokenizer instance and EOS set (tests and tools that
    /// have no model id).
    pub fn for_tokenizer(tokenizer: &Tokenizer, eos_ids: &[u32]) -> Result<Arc<Self>> {
        let key = tokenizer.inner() as *const tokenizers::Tokenizer as usize;
        cache::factory(&format!("tokenizer@{key:x}"), tokenizer, eos_ids)
    }

    /// Vocabulary size of the trie (logits beyond it are always masked).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The tokenizer the trie was built from.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub(super) fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// The llguidance grammar for `spec`.
    pub fn grammar(&self, spec: &ConstraintSpec) -> Result<TopLevelGrammar> {
        grammar::top_level(spec, &self.tokenizer)
    }

    /// Compiles `spec` to a fresh matcher, within [`limits`]: checks its size, counts and
    /// nesting, builds the parser and computes the first mask, so that a spec that admits
    /// no output fails here and not mid-generation. Errors are [`SpecError`]s.
    fn compile(&self, spec: &ConstraintSpec) -> Result<Matcher, SpecError> {
        limits::check(spec)?;
        let what = spec.what();
        let g = self.grammar(spec).map_err(|e| SpecError(format!("{what}: {}", limits::short(&format!("{e:#}")))))?;
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut m = Matcher::new(self.factory.create_parser(g));
            let first = m.compute_mask_or_eos().map(|_| ());
            (m, first)
        }));
        let (m, first) = built.map_err(|_| SpecError(format!("{what} could not be compiled")))?;
        if first.is_err() {
            // The grammar built, but no first token is possible: nothing can match it
            // (a `$ref` loop that never reaches a value, a rule defined only by itself).
            let e = m.get_error().unwrap_or_default();
            if !e.is_empty() && !e.contains("NoExtension") {
                return Err(SpecError(format!("{what} cannot be used: {}", limits::short(&e))));
            }
            return Err(SpecError(format!(
                "{what} admits no output (does it refer only to itself, without a value to end on?)"
            )));
        }
        if let Some(e) = m.get_error() {
            return Err(SpecError(format!("{what} cannot be used: {}", limits::short(&e))));
        }
        // A short way to finish must exist without the parser failing (a schema that
        // requires itself, as `{"$ref": "#"}` under a required key does, fails here).
        let closers = match spec {
            ConstraintSpec::ToolCall { format, .. } => grammar::closers(*format),
            _ => Vec::new(),
        };
        let p = closing::plan(m.clone(), closing::JsonLex::default(), self.trie(), &self.cands, &closers, self.vocab, COMPILE_PLAN);
        if let Some(e) = p.error {
            let e = limits::short(&e);
            return Err(SpecError(format!("{what} cannot be finished (does it require itself?): {e}")));
        }
        Ok(m)
    }

    /// A fresh constraint for one generation. The compiled grammar comes from a cache
    /// keyed by `cache_key` (a model id) and the spec's text; compiling blocks, so call
    /// this off the async runtime. Errors in the spec are [`SpecError`]s.
    pub fn constraint_cached(self: &Arc<Self>, cache_key: &str, spec: &ConstraintSpec) -> Result<Constraint, SpecError> {
        let matcher = cache::compiled(cache_key, spec, || self.compile(spec))?;
        let closers = match spec {
            ConstraintSpec::ToolCall { format, .. } => grammar::closers(*format),
            _ => Vec::new(),
        };
        let json = !matches!(spec, ConstraintSpec::Regex(_) | ConstraintSpec::Lark(_));
        Ok(Constraint::start(matcher, self.clone(), closers, json))
    }

    /// [`constraint_cached`](Self::constraint_cached) keyed by this factory.
    pub fn constraint(self: &Arc<Self>, spec: &ConstraintSpec) -> Result<Constraint> {
        let key = format!("factory@{:x}", Arc::as_ptr(self) as usize);
        Ok(self.constraint_cached(&key, spec)?)
    }
}
