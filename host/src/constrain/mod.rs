//! Constrained decoding with llguidance: token masks that make the output follow a JSON
//! schema, a regex, a Lark grammar, or a model's tool-call format.
//!
//! The token trie is built here from the host tokenizer's vocabulary (the
//! `toktrie_hf_tokenizers` adapter pins tokenizers 0.21), once per tokenizer and EOS set,
//! and cached ([`ConstraintFactory::for_tokenizer`]). Per request, [`Constraint::new`]
//! compiles the grammar (about a millisecond for typical schemas) and then, per step:
//! [`Constraint::apply`] masks the logits, [`Constraint::commit`] advances with the sampled
//! token, [`Constraint::is_finished`] says when nothing but EOS may follow.

mod cache;
mod closing;
mod grammar;
pub mod limits;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_budget;
mod vocab;

use std::collections::VecDeque;
use std::sync::Arc;

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
pub use limits::SpecError;

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

impl ConstraintSpec {
    /// What the spec is, for messages ("the JSON schema", "the regex", ...).
    pub fn what(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonObject => "the JSON object format",
            ConstraintSpec::JsonSchema { .. } => "the JSON schema",
            ConstraintSpec::Regex(_) => "the regex",
            ConstraintSpec::Lark(_) => "the grammar",
            ConstraintSpec::ToolCall { .. } => "the tool call",
        }
    }

    /// The cache key: the spec's kind and options and its text as given (compact JSON,
    /// key order kept: llguidance writes properties in schema order, so a reordered schema
    /// is a different grammar).
    pub fn key(&self) -> String {
        match self {
            ConstraintSpec::JsonObject => "json_object".into(),
            ConstraintSpec::JsonSchema { schema, strict } => format!("json_schema:{strict}:{schema}"),
            ConstraintSpec::Regex(r) => format!("regex:{r}"),
            ConstraintSpec::Lark(g) => format!("lark:{g}"),
            ConstraintSpec::ToolCall { format, tools, name, parallel } => {
                format!("tool_call:{format:?}:{name:?}:{parallel}:{tools}")
            }
        }
    }
}

/// Token trie and parser factory for one tokenizer (and EOS set). Build once per model.
pub struct ConstraintFactory {
    factory: ParserFactory,
    tokenizer: Tokenizer,
    vocab: usize,
    /// Token ids of the closing planner's candidate texts.
    cands: closing::Candidates,
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

/// Tokens left below which the closing plan is watched (longer budgets leave room).
const PLAN_FROM: usize = 512;
/// Forcing the plan starts when it needs this many fewer tokens than are left.
const MARGIN: usize = 2;
/// Near the end (the plan needs within this many of the tokens left; more if one token
/// was seen to lengthen the plan by more), tokens that open new JSON structure (a key, a
/// value, a string, an object or array) are masked: the output may only go on or close.
const ZONE: usize = 10;
/// With fewer tokens left than this, output that is complete ends (nothing new starts).
const END_BEFORE: usize = 32;
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

    fn trie(&self) -> &TokTrie {
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
        Ok(Constraint {
            matcher,
            factory: self.clone(),
            mask: None,
            lex: closing::JsonLex::default(),
            closers,
            json: !matches!(spec, ConstraintSpec::Regex(_) | ConstraintSpec::Lark(_)),
            plan: VecDeque::new(),
            need: None,
            jump: 0,
        })
    }

    /// [`constraint_cached`](Self::constraint_cached) keyed by this factory.
    pub fn constraint(self: &Arc<Self>, spec: &ConstraintSpec) -> Result<Constraint> {
        let key = format!("factory@{:x}", Arc::as_ptr(self) as usize);
        Ok(self.constraint_cached(&key, spec)?)
    }
}

/// The token-level constraint of one generation.
pub struct Constraint {
    matcher: Matcher,
    factory: Arc<ConstraintFactory>,
    /// Mask computed for the current step (reused until the next commit).
    mask: Option<SimpleVob>,
    /// Where the output is, lexically, as JSON (for the closing plan).
    lex: closing::JsonLex,
    /// The format's own terminators (tool calls), for the closing plan.
    closers: Vec<&'static str>,
    /// The output is JSON, or JSON inside a tool-call format (the scanner applies).
    json: bool,
    /// Tokens being forced to finish within the budget (front first).
    plan: VecDeque<u32>,
    /// Length of the last closing plan (None: none computed yet).
    need: Option<usize>,
    /// The most one token lengthened the plan.
    jump: usize,
}

/// What the budget asks for at one step.
enum Close {
    /// Sample freely (within the grammar).
    Free,
    /// Near the end: nothing that opens structure; `first` (the plan's next token) stays allowed.
    Zone(u32),
    /// Force this token.
    Force(u32),
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
                .map_err(|e| anyhow!("constraint: {}", limits::short(&format!("{e:#}"))))?;
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

    /// [`try_apply`](Self::try_apply) knowing that `left` tokens (this one included) may
    /// still be generated: when finishing needs nearly all of them, the closing plan's
    /// next token is forced instead, so the output completes within the budget.
    pub fn try_apply_within(&mut self, logits: &mut [f32], left: usize) -> Result<()> {
        match self.closing(left) {
            Close::Force(t) if (t as usize) < logits.len() => {
                logits.iter_mut().for_each(|l| *l = f32::NEG_INFINITY);
                logits[t as usize] = 0.0;
                Ok(())
            }
            Close::Zone(first) if self.json && (first as usize) < logits.len() => {
                let keep = logits[first as usize];
                self.try_apply(logits)?;
                let trie = self.factory.trie();
                let now = self.lex.cost();
                let n = logits.len().min(trie.vocab_size());
                for (t, l) in logits[..n].iter_mut().enumerate() {
                    if l.is_finite() {
                        let b = trie.token(t as TokenId);
                        let special = b.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER);
                        if !special && self.lex.cost_after(b) > now {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
                logits[first as usize] = if keep.is_finite() { keep } else { 0.0 };
                Ok(())
            }
            _ => self.try_apply(logits),
        }
    }

    /// What finishing within `left` tokens asks for now (see [`closing`]).
    fn closing(&mut self, left: usize) -> Close {
        if let Some(&t) = self.plan.front() {
            return Close::Force(t);
        }
        let zone = ZONE.max(2 * self.jump);
        if left > PLAN_FROM || self.need.is_some_and(|n| left > n + zone + 16) {
            return Close::Free;
        }
        let f = &self.factory;
        let closing::Plan { tokens: plan, complete, .. } = closing::plan(
            self.matcher.clone(),
            self.lex.clone(),
            f.trie(),
            &f.cands,
            &self.closers,
            f.vocab,
            left + zone,
        );
        let need = if complete { plan.len() } else { left + zone };
        if let Some(prev) = self.need {
            self.jump = self.jump.max(need.saturating_sub(prev));
        }
        self.need = Some(need);
        if need + MARGIN < left {
            return match plan.first() {
                Some(&t) if need + zone >= left => Close::Zone(t),
                // Complete now, near the end: end rather than start another call or item
                // (a tool call takes a few dozen tokens).
                None if complete && left <= zone.max(END_BEFORE) => Close::Force(f.trie().eos_token()),
                _ => Close::Free,
            };
        }
        if plan.is_empty() {
            // Complete now, and too few tokens left to start anything: end.
            return if complete { Close::Force(f.trie().eos_token()) } else { Close::Free };
        }
        self.plan = plan.into();
        Close::Force(self.plan[0])
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
        if self.json && !self.lex.in_str() {
            // Numbers stay within what a double holds.
            let trie = self.factory.trie();
            for (t, l) in logits[..n].iter_mut().enumerate() {
                if l.is_finite() && self.lex.number_too_long(trie.token(t as TokenId)) {
                    *l = f32::NEG_INFINITY;
                }
            }
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
        if self.plan.front() == Some(&token) {
            self.plan.pop_front();
        } else {
            self.plan.clear();
        }
        if self.matcher.is_stopped() && !self.matcher.is_error() {
            return Ok(());
        }
        closing::feed_token(&mut self.lex, self.factory.trie(), token);
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("constraint: token {token} not allowed: {}", limits::short(&format!("{e:#}"))))
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
