//! The `mtp` kind for one sequence (`rmlx generate --draft-kind mtp`): the
//! verifier's own multi-token-prediction head drafts (a drafter head, plugin
//! ABI 3.6: `Model::conditioning`, `HEAD_STATE`; docs/SPECULATIVE.md).
//!
//! The head runs one position behind the verifier: its entry j pairs token
//! c_{j+1} with the verifier's hidden states at position j (the layers the
//! head's `conditioning()` names), so both caches hold the context but its
//! last token. A round:
//! 1. drafts k tokens: the first from the head's last output (the seed),
//!    each next one by a chained head step on the previous draft and the
//!    head's own state (`HEAD_STATE`);
//! 2. the verifier scores [last, d_1 .. d_k] in one forward that also
//!    returns its hidden states, and keeps the tokens it would have produced
//!    itself (accept.rs: greedy, or rejection sampling: lossless);
//! 3. roll-back: the verifier's K/V is truncated; a recurrent state (gated
//!    DeltaNet layers, the Qwen3.5 hybrids) cannot be truncated, so it is
//!    restored from the snapshot taken before the verify forward and the
//!    kept tokens are fed again (one more forward, only when a draft was
//!    rejected);
//! 4. the head drops its chained entries and takes the kept tokens and the
//!    new one with the verifier's hidden states at their previous positions
//!    (exact conditioning, where mlx-vlm keeps the chained entries); its last
//!    output is the next round's seed.
//!
//! The verifier runs on the one-sequence contiguous cache (dense KV family,
//! no sliding windows); the server's batched path does not drive heads yet.
use super::super::{attend::ForwardRequest, cache::KvCache, sampler::Sampler, sampler::SamplingParams, LoadedModel};
use super::{accept, adapt::DraftLength, store::ids, store::rows, SpecOptions, SpecOutput};
use anyhow::{bail, Context, Result};
use mlx_rs::{
    ops::{concatenate, indexing::argmax_axis, indexing::TryIndexOp},
    transforms::eval,
    Array, Dtype,
};
use rand_chacha::ChaCha8Rng;
use rmlx_plugin_api::{author::Output, cache_kind, HEAD_STATE};
use std::time::Instant;

/// The verifier with its cache and the layers the head conditions on
/// (shared by the head kinds: mtp, dflash).
pub(super) struct Verifier<'m> {
    pub(super) model: &'m mut LoadedModel,
    pub(super) cache: KvCache,
    /// The conditioning's layers in the head's order (absolute indices).
    pub(super) layers: Vec<u32>,
}

impl<'m> Verifier<'m> {
    pub(super) fn new(model: &'m mut LoadedModel, conditioning: &[i32]) -> Result<Self> {
        let windowed = model.spec.sliding_window.iter().any(|&w| w > 0)
            || model.cache_layers.iter().any(|l| l.kind == cache_kind::WINDOW);
        if windowed || !model.kv_is_dense_default() {
            bail!(
                "a drafter head (--draft-kind mtp, dflash) runs the verifier on the contiguous cache: {} has sliding windows or a compressed KV family",
                model.dir.path.display()
            );
        }
        let n = model.spec.num_layers as i32;
        let layers = conditioning
            .iter()
            .map(|&l| {
                let i = if l < 0 { n + l } else { l };
                if !(0..n).contains(&i) {
                    bail!("the drafter head conditions on layer {l}, but the model has {n} layers");
                }
                Ok(i as u32)
            })
            .collect::<Result<Vec<_>>>()?;
        let cache = KvCache::for_layers(n as usize, &model.cache_layers).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(Self { model, cache, layers })
    }

    /// `tokens` after the cached ones -> (logits [1, L, V], conditioning
    /// [1, L, C]), lazily; the cache advances.
    pub(super) fn forward(&mut self, tokens: &[u32]) -> Result<(Array, Array)> {
        let mut asked = self.layers.clone();
        asked.sort_unstable();
        asked.dedup();
        let req = ForwardRequest { output: Some(Output::AllLogits), hidden_layers: asked, ..ForwardRequest::default() };
        let out = self.model.run(&ids(tokens), &mut self.cache, req)?;
        self.cache.advance(tokens.len() as i32);
        let parts = self
            .layers
            .iter()
            .map(|l| out.hidden.iter().find(|(h, _)| h == l).map(|(_, a)| a.clone()))
            .collect::<Option<Vec<_>>>()
            .context("the verifier did not return the hidden states the head conditions on")?;
        let cond = if parts.len() == 1 { parts[0].clone() } else { concatenate(&parts, -1)? };
        Ok((out.out, cond))
    }

    /// Where a verify forward starts: the cached length and, with
    /// recurrent-state layers, their states (references, not copies).
    pub(super) fn mark(&self) -> Mark {
        Mark { offset: self.cache.offset(), states: self.cache.has_states().then(|| self.cache.states()) }
    }

    /// After a verify forward of `input` from `mark`, keeps its first `n`
    /// tokens: K/V is truncated; a recurrent state cannot be, so it is
    /// restored from the mark and the kept tokens are fed again (one more
    /// forward, only when some were dropped).
    pub(super) fn keep(&mut self, mark: Mark, input: &[u32], n: usize) -> Result<()> {
        if n >= input.len() {
            return Ok(());
        }
        match mark.states {
            Some(states) => {
                self.cache.truncate(mark.offset);
                self.cache.restore_states(states);
                let (l, c) = self.forward(&input[..n])?;
                eval([&l, &c])?;
            }
            None => self.cache.truncate(mark.offset + n as i32),
        }
        Ok(())
    }
}

/// The verifier's cache before a verify forward (`Verifier::mark`).
pub(super) struct Mark {
    offset: i32,
    states: Option<Vec<Vec<Array>>>,
}

/// The head with its own cache.
struct Head<'m> {
    model: &'m mut LoadedModel,
    cache: KvCache,
}

impl Head<'_> {
    /// `tokens` [L] conditioned on `cond` [1, L, C] -> (logits [1, L, V],
    /// the head's state [1, L, C']), lazily; the cache advances.
    fn step(&mut self, tokens: &[u32], cond: &Array) -> Result<(Array, Array)> {
        let l = tokens.len() as i32;
        let mask = Array::from_slice(&vec![true; tokens.len()], &[1, l]);
        let req = ForwardRequest {
            output: Some(Output::AllLogits),
            hidden_layers: vec![HEAD_STATE],
            inputs: Some((cond.clone(), mask)),
            ..ForwardRequest::default()
        };
        let out = self.model.run(&ids(tokens), &mut self.cache, req)?;
        self.cache.advance(l);
        let state = out.hidden.into_iter().find(|(h, _)| *h == HEAD_STATE).map(|(_, s)| s);
        Ok((out.out, state.context("the drafter head returned no state (HEAD_STATE)")?))
    }
}

/// Positions `a..b` of [1, L, X].
pub(super) fn span(x: &Array, a: i32, b: i32) -> Result<Array> {
    Ok(x.try_index((.., a..b, ..))?)
}

/// The last position of [1, L, X]: [1, 1, X].
pub(super) fn last(x: &Array) -> Result<Array> {
    let l = x.dim(1);
    span(x, l - 1, l)
}

/// Greedy picks of logits [1, L, V], read on the host.
pub(super) fn argmaxes(logits: &Array) -> Result<Vec<u32>> {
    let best = argmax_axis(logits, -1, None)?.as_dtype(Dtype::Int32)?;
    best.eval()?;
    Ok(best.try_as_slice::<i32>()?.iter().map(|&t| t as u32).collect())
}

/// A token drawn from logits [1, 1, V] under `proc` (whose history is the
/// context): (token, the distribution it was drawn from).
pub(super) fn draw_from(logits: &Array, proc: &Sampler, rng: &mut ChaCha8Rng) -> Result<(u32, Vec<f32>)> {
    Ok(super::draw_row(rows(logits)?.pop().unwrap_or_default(), proc, rng))
}

/// Generates after `prompt` with `head` (a drafter head built from the
/// verifier's checkpoint, `LoadedModel::load_head`) proposing and `target`
/// verifying; as `super::generate` otherwise.
pub fn generate(
    target: &mut LoadedModel,
    head: &mut LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &SpecOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<SpecOutput> {
    if head.conditioning.is_empty() {
        bail!("{} is not a drafter head (it names no verifier layers to condition on)", head.dir.path.display());
    }
    let vocab = target.spec.vocab_size;
    if head.spec.vocab_size != vocab {
        bail!("the drafter head predicts {} tokens but the model has {vocab}", head.spec.vocab_size);
    }
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
        bail!("prompt token id {bad} is out of range for a vocabulary of {vocab}");
    }
    let conditioning = head.conditioning.clone();
    let head_cache = KvCache::for_layers(head.spec.num_layers as usize, &head.cache_layers).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let mut h = Head { model: head, cache: head_cache };
    let mut v = Verifier::new(target, &conditioning)?;
    let chunk = opts.prefill_chunk.max(1);
    let t0 = Instant::now();

    // Prefill: the verifier over the whole prompt, keeping its hidden states.
    let (mut conds, mut tail) = (Vec::new(), None);
    for piece in prompt.chunks(chunk) {
        let (l, c) = v.forward(piece)?;
        let l = last(&l)?;
        eval([&l, &c])?;
        conds.push(c);
        tail = Some(l);
    }
    let cond = if conds.len() == 1 { conds.pop().unwrap() } else { concatenate(&conds, 1)? }; // [1, P, C]
    let mut out = SpecOutput::default();
    let mut proc = Sampler::with_params(params.clone());
    proc.set_prompt(prompt);
    let greedy = proc.is_plain_greedy();
    let mut rng = super::seeded(params.seed);
    let tail = tail.expect("the prompt is not empty");
    let first = if greedy { argmaxes(&tail)?[0] } else { draw_from(&tail, &proc, &mut rng)?.0 };
    // The head's prefill: [p_1 .. p_{P-1}, first] on h_0 .. h_{P-1}.
    let shifted: Vec<u32> = prompt[1..].iter().copied().chain(std::iter::once(first)).collect();
    let (mut seed_logits, mut seed_state) = (None, None);
    for (i, piece) in shifted.chunks(chunk).enumerate() {
        let a = (i * chunk) as i32;
        let (l, s) = h.step(piece, &span(&cond, a, a + piece.len() as i32)?)?;
        let (l, s) = (last(&l)?, last(&s)?);
        eval([&l, &s])?;
        (seed_logits, seed_state) = (Some(l), Some(s));
    }
    let (mut seed_logits, mut seed_state) = (seed_logits.unwrap(), seed_state.unwrap());
    out.prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let mut ctx = prompt.to_vec();
    let mut emit = |t: u32, out: &mut SpecOutput, ctx: &mut Vec<u32>, proc: &mut Sampler| {
        out.tokens.push(t);
        ctx.push(t);
        proc.accept(t);
        on_token(t)
    };
    let mut len = DraftLength::new(opts.num_draft_tokens, opts.adaptive);
    if emit(first, &mut out, &mut ctx, &mut proc) {
        'rounds: while out.tokens.len() < opts.max_tokens {
            let k = len.get().min(opts.max_tokens - out.tokens.len() - 1);
            let head_len = h.cache.offset();
            // 1. Draft: the seed, then chained head steps on its own state.
            let (mut drafts, mut q) = (Vec::with_capacity(k), Vec::with_capacity(k));
            let mut dp = proc.clone();
            let (mut lg, mut st) = (seed_logits.clone(), seed_state.clone());
            for j in 0..k {
                if j > 0 {
                    let (l, s) = h.step(&drafts[j - 1..j], &st)?;
                    (lg, st) = (l, s);
                }
                let d = if greedy {
                    argmaxes(&lg)?[0]
                } else {
                    let (d, dist) = draw_from(&lg, &dp, &mut rng)?;
                    dp.accept(d);
                    q.push(dist);
                    d
                };
                drafts.push(d);
            }
            // 2. Verify [last, d_1 .. d_k] in one forward.
            let mark = v.mark();
            let input: Vec<u32> = std::iter::once(*ctx.last().unwrap()).chain(drafts.iter().copied()).collect();
            let (logits, vcond) = v.forward(&input)?;
            let (kept, next) = if greedy {
                accept::accept_greedy(&drafts, &argmaxes(&logits)?)
            } else {
                super::verify_sampled(&drafts, &q, &rows(&logits)?, &proc, &mut rng)
            };
            out.rounds += 1;
            if k > 0 {
                out.draft_log.push(drafts.clone());
            }
            out.drafted_tokens += k;
            out.accepted_tokens += kept;
            len.update(k, kept);
            for &t in drafts[..kept].iter().chain(std::iter::once(&next)) {
                if !emit(t, &mut out, &mut ctx, &mut proc) {
                    break 'rounds;
                }
            }
            // 3. Roll the verifier back to the context but its last token.
            v.keep(mark, &input, kept + 1)?;
            // 4. The head: its chained entries out, the kept tokens in on the
            //    verifier's own hidden states.
            h.cache.truncate(head_len);
            let toks: Vec<u32> = drafts[..kept].iter().copied().chain(std::iter::once(next)).collect();
            let (l, s) = h.step(&toks, &span(&vcond, 0, kept as i32 + 1)?)?;
            (seed_logits, seed_state) = (last(&l)?, last(&s)?);
        }
    }
    out.generation_secs = t1.elapsed().as_secs_f64();
    out.kv_bytes_per_token = v.cache.measured_bytes_per_token();
    Ok(out)
}
