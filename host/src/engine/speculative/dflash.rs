//! The `dflash` kind for one sequence (`rmlx generate --draft-kind dflash
//! --draft-model SIDECAR`): a DFlash block-diffusion drafter (arXiv
//! 2602.06036) proposes a whole block of tokens in ONE forward, conditioned
//! on the verifier's hidden states of the layers it names (a drafter head,
//! plugin ABI 3.6: `Model::conditioning`; docs/SPECULATIVE.md).
//!
//! The drafter's cache holds **context** only: for each token the verifier
//! has kept, the K/V its layers make from the verifier's hidden states at
//! that token's position. A round:
//! 1. one drafter forward of `[new context rows ; bonus, mask x k]`: the
//!    context rows are the verifier's hidden states of the tokens kept in
//!    the round before (the prompt after the prefill), the block is the last
//!    emitted token (the "bonus", which the verifier has not cached yet) and
//!    k mask tokens; attention is NOT causal, so every block row sees the
//!    whole context and the whole block. The k masked rows' logits propose
//!    d_1 .. d_k at once (greedy argmax, or each drawn from its row under the
//!    request's sampler). The context rows' K/V stay in the cache; the
//!    block's are dropped (`ContextStore::commit`);
//! 2. the verifier scores `[bonus, d_1 .. d_k]` in one forward that also
//!    returns its hidden states, and keeps what it would have produced itself
//!    (accept.rs: greedy, or rejection sampling: lossless);
//! 3. the verifier rolls back the rejected positions (mtp.rs `Verifier`:
//!    K/V truncated, a recurrent state restored and re-fed); its hidden
//!    states of `[bonus, kept drafts]` are the next round's context rows.
//!
//! The block's mask token and trained size come from the sidecar's
//! config.json (`dflash_config.mask_token_id`, `block_size`); a round drafts
//! at most `block_size - 1` tokens, and the length adapts (adapt.rs).
use super::super::{cache::write_steps, attend::ForwardRequest, attend::KvStore, sampler::Sampler, sampler::SamplingParams, LoadedModel};
use super::mtp::{argmaxes, last, span, Verifier};
use super::{accept, adapt::DraftLength, store::ids, store::rows, SpecOptions, SpecOutput};
use anyhow::{bail, Context, Result};
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{concatenate, indexing::TryIndexOp, zeros_dtype},
    transforms::eval,
    Array,
};
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts, Output},
    PluginError,
};
use std::time::Instant;

/// The drafter's cache grows in steps of this many positions (`rmlx
/// generate`; the server passes its block size, `ContextStore::with_step`).
const STEP: i32 = 256;

/// The DFlash drafter's own KV store: per layer, the K/V of the context
/// positions it has taken in, and room for one forward's rows after them.
/// A forward's rows attend over the committed context and all of that
/// forward's rows, causally or not as the drafter asks; afterwards
/// `commit(n)` keeps the forward's first n rows (the context rows) and the
/// rest (the block) is overwritten by the next forward.
pub struct ContextStore {
    /// Per layer: keys and values [1, K, capacity, hd].
    layers: Vec<Option<(Array, Array)>>,
    /// Committed context positions.
    len: i32,
    /// Capacity grows to a multiple of this, and by at least half.
    step: i32,
}

impl ContextStore {
    pub fn new(num_layers: usize) -> Self {
        Self::with_step(num_layers, STEP as usize)
    }

    /// A store whose capacity grows in multiples of `step` positions (and
    /// by at least half of what it holds, so growing stays linear).
    pub fn with_step(num_layers: usize, step: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0, step: step.max(1) as i32 }
    }

    /// Committed context positions.
    pub fn len(&self) -> i32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// After a forward: its first `n` rows join the context.
    pub fn commit(&mut self, n: i32) {
        self.len += n;
    }

    /// Bytes its K/V arrays hold (their whole capacity).
    pub fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|(k, v)| (k.nbytes() + v.nbytes()) as u64).sum()
    }
}

impl KvStore for ContextStore {
    fn batch(&self) -> u32 {
        1
    }
    fn offset(&self) -> i32 {
        self.len
    }
    fn offsets(&self) -> Array {
        Array::from_slice(&[self.len], &[1])
    }

    /// q: [1, H, L, hd], k/v: [1, K, L, hd] -> [1, H, L, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
        if opts.window != 0 {
            return Err(PluginError::unsupported("the DFlash drafter's context store has no sliding windows"));
        }
        let slot = self
            .layers
            .get_mut(layer as usize)
            .ok_or_else(|| PluginError::other(format!("attention layer {layer} out of range")))?;
        let (prev, n) = (self.len, k.dim(2));
        let end = prev + n;
        let (keys, values) = match slot.take() {
            Some((ks, vs)) if ks.dim(2) >= end => (ks, vs),
            old => {
                // Grow: keep the committed context, add zeroed steps.
                let want = end.max(prev + prev / 2);
                let cap = (want + self.step - 1) / self.step * self.step;
                let grow = |x: &Array, old: Option<&Array>| -> Result<Array, PluginError> {
                    let z = zeros_dtype(&[1, x.dim(1), cap - prev, x.dim(3)], x.dtype())?;
                    Ok(match old {
                        Some(o) if prev > 0 => concatenate(&[o.try_index((.., .., 0..prev, ..))?, z], 2)?,
                        _ => zeros_dtype(&[1, x.dim(1), cap, x.dim(3)], x.dtype())?,
                    })
                };
                let (ok, ov) = match &old {
                    Some((a, b)) => (Some(a), Some(b)),
                    None => (None, None),
                };
                (grow(&k, ok)?, grow(&v, ov)?)
            }
        };
        let keys = write_steps(&keys, &k, prev)?;
        let values = write_steps(&values, &v, prev)?;
        let (ks, vs) = (keys.try_index((.., .., 0..end, ..))?, values.try_index((.., .., 0..end, ..))?); // [1, K, end, hd]
        *slot = Some((keys, values));
        if opts.softcap != 0.0 || opts.sinks.is_some() {
            // No mask given: causal over the last n positions when asked.
            return dense_attend(&q, &ks, &vs, None, opts);
        }
        if opts.causal && n > 1 {
            // Aligned to the end of the keys: row i sees positions <= prev + i.
            Ok(scaled_dot_product_attention(&q, &ks, &vs, opts.scale, ScaledDotProductAttentionMask::Causal, None)?)
        } else {
            Ok(scaled_dot_product_attention(&q, &ks, &vs, opts.scale, None, None)?)
        }
    }
}

/// The drafter with its context store and its block's settings.
pub struct Drafter<'m> {
    pub model: &'m mut LoadedModel,
    pub store: ContextStore,
    /// The token the block's masked positions hold.
    pub mask_id: u32,
    /// The block size it was trained with (the bonus and the drafts).
    pub block: usize,
    /// Width of the conditioning: the target layers times the hidden size.
    width: i32,
}

/// `dflash_config.mask_token_id` (or a top-level `mask_token_id`) and
/// `block_size` (DFlash's default 16) of a DFlash sidecar's config.json.
pub fn block_settings(head: &LoadedModel) -> Result<(u32, usize)> {
    let c = &head.dir.config;
    let dflash = c.get("dflash_config");
    let mask = dflash
        .and_then(|d| d.get("mask_token_id"))
        .or_else(|| c.get("mask_token_id"))
        .and_then(|v| v.as_u64())
        .with_context(|| format!("{}: a DFlash drafter's config.json names its mask token (dflash_config.mask_token_id)", head.dir.path.display()))?;
    let block = match c.get("block_size") {
        None | Some(serde_json::Value::Null) => 16,
        Some(v) => v.as_u64().filter(|&b| (2..=256).contains(&b)).with_context(|| format!("block_size must be an integer in 2..=256, got {v}"))? as usize,
    };
    Ok((mask as u32, block))
}

/// Draft tokens per round when `--num-draft-tokens` is not given: the
/// block the drafter was trained with, less its bonus position.
pub fn default_draft_tokens(head: &LoadedModel) -> usize {
    block_settings(head).map(|(_, b)| b - 1).unwrap_or(super::DEFAULT_DRAFT_TOKENS)
}

impl<'m> Drafter<'m> {
    pub fn new(model: &'m mut LoadedModel) -> Result<Self> {
        if model.conditioning.is_empty() {
            bail!("{} is not a drafter head (it names no verifier layers to condition on)", model.dir.path.display());
        }
        let (mask_id, block) = block_settings(model)?;
        if mask_id >= model.spec.vocab_size {
            bail!("the DFlash mask token {mask_id} is outside the vocabulary of {}", model.spec.vocab_size);
        }
        let width = context_width(model);
        let store = ContextStore::new(model.spec.num_layers as usize);
        Ok(Self { model, store, mask_id, block, width })
    }

    /// One forward: `ctx` (tokens and the verifier's hidden states [1, S, C]
    /// of the positions after the committed context) as context rows, then
    /// `block` tokens. Returns what `output` asks for over all S + L rows;
    /// the context rows are committed, the block's dropped.
    pub fn forward(&mut self, ctx_tokens: &[u32], ctx: Option<&Array>, block: &[u32], output: Output) -> Result<Array> {
        forward_over(self.model, &mut self.store, self.width, ctx_tokens, ctx, block, output)
    }

    /// Logits [1, k, V] proposing the k tokens after `bonus`, with `ctx`
    /// taken into the context first (see `forward`).
    pub fn propose(&mut self, ctx_tokens: &[u32], ctx: Option<&Array>, bonus: u32, k: usize) -> Result<Array> {
        let block: Vec<u32> = std::iter::once(bonus).chain(std::iter::repeat(self.mask_id).take(k)).collect();
        let s = ctx_tokens.len() as i32;
        let logits = self.forward(ctx_tokens, ctx, &block, Output::AllLogits)?; // [1, S + 1 + k, V]
        span(&logits, s + 1, s + 1 + k as i32)
    }
}

/// Width of a DFlash drafter's conditioning: its target layers times its
/// hidden size.
pub fn context_width(model: &LoadedModel) -> i32 {
    model.conditioning.len() as i32 * model.spec.hidden_size as i32
}

/// One forward of the drafter `model` over `store` (see `Drafter::forward`;
/// `width`: `context_width`). The server calls it per sequence, each with
/// its own store (scheduler/spec/dflash.rs).
pub fn forward_over(model: &mut LoadedModel, store: &mut ContextStore, width: i32, ctx_tokens: &[u32], ctx: Option<&Array>, block: &[u32], output: Output) -> Result<Array> {
    let (s, l) = (ctx_tokens.len() as i32, block.len() as i32);
    let mut feats = Vec::with_capacity(2);
    if let Some(c) = ctx {
        if c.shape() != [1, s, width] {
            bail!("the drafter's context is {:?}, expected [1, {s}, {width}]", c.shape());
        }
        feats.push(c.clone());
    }
    if l > 0 {
        let dtype = ctx.map(|c| c.dtype()).unwrap_or(mlx_rs::Dtype::Float32);
        feats.push(zeros_dtype(&[1, l, width], dtype)?);
    }
    let feats = if feats.len() == 1 { feats.pop().unwrap() } else { concatenate(&feats, 1)? }; // [1, S + L, C]
    let is_ctx: Vec<bool> = (0..s + l).map(|i| i < s).collect();
    let mask = Array::from_slice(&is_ctx, &[1, s + l]);
    let tokens: Vec<u32> = ctx_tokens.iter().chain(block).copied().collect();
    let req = ForwardRequest { output: Some(output), inputs: Some((feats, mask)), ..ForwardRequest::default() };
    let out = model.run(&ids(&tokens), store, req)?;
    store.commit(s);
    Ok(out.out)
}

/// Generates after `prompt` with `head` (a DFlash drafter loaded from its
/// sidecar, `LoadedModel::load_head_from`) proposing blocks and `target`
/// verifying; as `super::generate` otherwise.
pub fn generate(
    target: &mut LoadedModel,
    head: &mut LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &SpecOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<SpecOutput> {
    let vocab = target.spec.vocab_size;
    if head.spec.vocab_size != vocab {
        bail!("the DFlash drafter predicts {} tokens but the model has {vocab}", head.spec.vocab_size);
    }
    if head.spec.hidden_size != target.spec.hidden_size {
        bail!(
            "the DFlash drafter's hidden size is {} but the model's is {}: it reads the model's hidden states and embedding",
            head.spec.hidden_size,
            target.spec.hidden_size
        );
    }
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
        bail!("prompt token id {bad} is out of range for a vocabulary of {vocab}");
    }
    let conditioning = head.conditioning.clone();
    let mut d = Drafter::new(head)?;
    let mut v = Verifier::new(target, &conditioning)?;
    let chunk = opts.prefill_chunk.max(1);
    let t0 = Instant::now();

    // Prefill: the verifier over the prompt; its hidden states become the
    // drafter's context as they come (no logits asked of the drafter).
    let mut tail = None;
    for piece in prompt.chunks(chunk) {
        let (l, c) = v.forward(piece)?;
        let l = last(&l)?;
        let h = d.forward(piece, Some(&c), &[], Output::Hidden)?;
        eval([&l, &h])?;
        tail = Some(l);
    }
    let tail = tail.expect("the prompt is not empty");
    let mut out = SpecOutput::default();
    let mut proc = Sampler::with_params(params.clone());
    proc.set_prompt(prompt);
    let greedy = proc.is_plain_greedy();
    let mut rng = super::seeded(params.seed);
    let first = if greedy { argmaxes(&tail)?[0] } else { super::draw_row(rows(&tail)?.pop().unwrap_or_default(), &proc, &mut rng).0 };
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
    // The verifier's hidden states of the tokens it kept last round, which
    // the drafter has not taken in yet.
    let (mut pending_tokens, mut pending): (Vec<u32>, Option<Array>) = (Vec::new(), None);
    if emit(first, &mut out, &mut ctx, &mut proc) {
        'rounds: while out.tokens.len() < opts.max_tokens {
            let k = len.get().min(d.block - 1).min(opts.max_tokens - out.tokens.len() - 1);
            let bonus = *ctx.last().unwrap();
            // 1. Draft the block in one forward.
            let (mut drafts, mut q) = (Vec::with_capacity(k), Vec::with_capacity(k));
            if k > 0 {
                let logits = d.propose(&pending_tokens, pending.as_ref(), bonus, k)?; // [1, k, V]
                (pending_tokens, pending) = (Vec::new(), None);
                if greedy {
                    drafts = argmaxes(&logits)?;
                } else {
                    let mut dp = proc.clone();
                    for row in rows(&logits)? {
                        let (t, dist) = super::draw_row(row, &dp, &mut rng);
                        dp.accept(t);
                        drafts.push(t);
                        q.push(dist);
                    }
                }
            }
            // 2. Verify [bonus, d_1 .. d_k] in one forward.
            let mark = v.mark();
            let input: Vec<u32> = std::iter::once(bonus).chain(drafts.iter().copied()).collect();
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
            // 3. The verifier keeps [bonus, kept drafts]; their hidden states
            //    are the drafter's next context rows.
            v.keep(mark, &input, kept + 1)?;
            let kept_rows = span(&vcond, 0, kept as i32 + 1)?; // [1, kept + 1, C]
            pending = Some(match pending.take() {
                Some(p) => concatenate(&[p, kept_rows], 1)?,
                None => kept_rows,
            });
            pending_tokens.extend_from_slice(&input[..=kept]);
            for &t in drafts[..kept].iter().chain(std::iter::once(&next)) {
                if !emit(t, &mut out, &mut ctx, &mut proc) {
                    break 'rounds;
                }
            }
        }
    }
    out.generation_secs = t1.elapsed().as_secs_f64();
    out.kv_bytes_per_token = v.cache.measured_bytes_per_token();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    /// Over two forwards (3 rows, 2 of them committed, then 4 rows), the
    /// store's attention equals the composed attention over the committed
    /// context and the forward's rows, non-causal and causal, with and
    /// without a soft-cap; the block row of the first forward is forgotten.
    #[test]
    fn the_context_store_attends_over_committed_context_and_the_forward() {
        let r = |heads: i32, l: i32| random::normal::<f32>(&[1, heads, l, 8], None, None, None).unwrap();
        for (causal, softcap) in [(false, 0.0), (true, 0.0), (false, 30.0), (true, 30.0)] {
            let mut opts = AttendOpts::plain(0.35).softcap(softcap);
            if !causal {
                opts = opts.bidirectional();
            }
            let mut store = ContextStore::new(1);
            let (q1, k1, v1) = (r(4, 3), r(2, 3), r(2, 3));
            let got = store.attend(0, q1.clone(), k1.clone(), v1.clone(), &opts).unwrap();
            let want = dense_attend(&q1, &k1, &v1, None, &opts).unwrap();
            assert!(got.all_close(&want, 1e-4, 1e-4, None).unwrap(), "first forward, causal {causal} softcap {softcap}");
            store.commit(2);
            assert_eq!(store.len(), 2);
            let (q2, k2, v2) = (r(4, 4), r(2, 4), r(2, 4));
            let got = store.attend(0, q2.clone(), k2.clone(), v2.clone(), &opts).unwrap();
            let keep = |x: &Array| x.try_index((.., .., 0..2, ..)).unwrap();
            let (ks, vs) = (concatenate(&[keep(&k1), k2], 2).unwrap(), concatenate(&[keep(&v1), v2], 2).unwrap());
            let want = dense_attend(&q2, &ks, &vs, None, &opts).unwrap();
            assert!(got.all_close(&want, 1e-4, 1e-4, None).unwrap(), "second forward, causal {causal} softcap {softcap}");
        }
    }
}
