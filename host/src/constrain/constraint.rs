//! [`Constraint`]: the token mask of one generation, step by step, and the closing
//! plan that makes the output complete within its token budget.
use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use llguidance::toktrie::{SimpleVob, TokTrie, TokenId};
use llguidance::Matcher;

use super::{closing, limits, ConstraintFactory, ConstraintSpec};
use crate::model::tokenizer::Tokenizer;

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

/// The token-level constraint of one generation. Clone: a copy runs ahead
/// of the generation on draft tokens (speculative decoding); the matcher
/// shares its compiled grammar, the copy is its parser state.
#[derive(Clone)]
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
    /// The constraint of a freshly compiled `matcher` (see
    /// [`ConstraintFactory::constraint_cached`]).
    pub(super) fn start(matcher: Matcher, factory: Arc<ConstraintFactory>, closers: Vec<&'static str>, json: bool) -> Self {
        Constraint {
            matcher,
            factory,
            mask: None,
            lex: closing::JsonLex::default(),
            closers,
            json,
            plan: VecDeque::new(),
            need: None,
            jump: 0,
        }
    }

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
