//! Speculative decoding for one sequence (`rmlx generate --draft-model`):
//! a drafter proposes k tokens, the verifier scores all of them in one
//! forward of k + 1 positions, and the tokens it would have produced itself
//! are kept (accept.rs: greedy, or rejection sampling that leaves the
//! output distribution exactly the verifier's). Rejected tokens are rolled
//! back from both KV caches (store.rs). The draft length adapts to the
//! measured acceptance (adapt.rs). Kinds: `draft` (a separate small model
//! with the same vocabulary, draft.rs) and `mtp` (the verifier's own
//! multi-token-prediction head, mtp.rs); docs/SPECULATIVE.md.
pub mod accept;
pub mod adapt;
pub mod dflash;
pub mod draft;
pub mod mtp;
pub mod serve;
pub mod stats;
pub mod store;

use super::{sampler::Sampler, sampler::SamplingParams, LoadedModel};
use anyhow::{bail, Result};
use mlx_rs::{ops::concatenate, ops::indexing::argmax_axis, transforms::eval, Dtype};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// The drafter kinds (`--draft-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DraftKind {
    /// A separate draft model with the verifier's vocabulary.
    Draft,
    /// The verifier's own multi-token-prediction head (a drafter head,
    /// plugin ABI 3.6), from the verifier's checkpoint (mtp.rs).
    Mtp,
    /// An Eagle-3 head (a drafter head reading three verifier layers) from
    /// its own sidecar directory (`--draft-model`), sharing the verifier's
    /// embedding (`LoadedModel::load_head_from`); mtp.rs's loop drives it.
    Eagle3,
    /// A DFlash block-diffusion drafter (a drafter head proposing a whole
    /// block in one forward) from its sidecar directory (`--draft-model`),
    /// sharing the verifier's embedding and LM head (dflash.rs).
    Dflash,
}

impl DraftKind {
    /// Every kind's name, as `parse` reads them.
    pub const NAMES: [&'static str; 4] = ["draft", "mtp", "eagle3", "dflash"];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "draft" => Ok(Self::Draft),
            "mtp" => Ok(Self::Mtp),
            "eagle3" => Ok(Self::Eagle3),
            "dflash" => Ok(Self::Dflash),
            _ => bail!("unknown --draft-kind {s:?}; the kinds are: draft, mtp, eagle3, dflash"),
        }
    }
}

/// mlx-lm's `--num-draft-tokens` default.
pub const DEFAULT_DRAFT_TOKENS: usize = 3;

/// How one speculative generation runs.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    /// Draft tokens per round at the start.
    pub num_draft_tokens: usize,
    /// Whether the draft length follows the measured acceptance (adapt.rs).
    pub adaptive: bool,
    pub max_tokens: usize,
    pub prefill_chunk: usize,
}

/// What a speculative generation produced and how the drafter did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecOutput {
    /// Every token emitted, in order (the caller may have stopped early).
    pub tokens: Vec<u32>,
    /// Draft tokens proposed, over all rounds.
    pub drafted_tokens: usize,
    /// Draft tokens the verifier kept.
    pub accepted_tokens: usize,
    /// Verifier forwards after the prefill.
    pub rounds: usize,
    pub prompt_secs: f64,
    pub generation_secs: f64,
    /// The verifier's KV bytes per cached token.
    pub kv_bytes_per_token: f64,
    /// Each round's drafts, in order (drafter heads: the server's tests
    /// compare them with the server's `SpecCounts::draft_log`).
    #[serde(skip)]
    pub draft_log: Vec<Vec<u32>>,
}

/// The draft model must score the verifier's token ids: refuses a pair
/// whose vocabularies differ.
pub fn check_pair(target: &LoadedModel, draft: &LoadedModel) -> Result<()> {
    let (v, d) = (target.spec.vocab_size, draft.spec.vocab_size);
    if v != d {
        bail!(
            "the draft model {} has a vocabulary of {d} tokens but the model {} has {v}: speculative decoding needs a draft model with the same tokenizer",
            draft.dir.path.display(),
            target.dir.path.display()
        );
    }
    Ok(())
}

/// Generates after `prompt` with `draft` proposing and `target` verifying,
/// sampling under `params` (greedy at temperature 0). Calls `on_token` with
/// each emitted token in order; it returns false to stop (EOS, stop string,
/// length: the caller decides). Emits at most `opts.max_tokens` tokens.
pub fn generate(
    target: &mut LoadedModel,
    draft: &mut LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    opts: &SpecOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<SpecOutput> {
    check_pair(target, draft)?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let vocab = target.spec.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
        bail!("prompt token id {bad} is out of range for a vocabulary of {vocab}");
    }
    let mut target = store::Runner::new(target)?;
    let mut drafter = draft::DraftModel { runner: store::Runner::new(draft)? };
    let t0 = Instant::now();
    // Both caches hold the prompt but its last token, which the first round feeds.
    let head = &prompt[..prompt.len() - 1];
    drafter.runner.feed(head, opts.prefill_chunk)?;
    target.feed(head, opts.prefill_chunk)?;
    let mut out = SpecOutput { prompt_secs: t0.elapsed().as_secs_f64(), ..SpecOutput::default() };
    let t1 = Instant::now();

    let mut proc = Sampler::with_params(params.clone());
    proc.set_prompt(prompt);
    let plain_greedy = proc.is_plain_greedy();
    let mut rng = seeded(params.seed);
    let mut len = DraftLength::new(opts.num_draft_tokens, opts.adaptive);
    // Prompt and emitted tokens; the target caches all but the last.
    let mut ctx = prompt.to_vec();
    'rounds: while out.tokens.len() < opts.max_tokens {
        // A round emits up to k + 1 tokens: draft no more than can be used.
        let k = len.get().min(opts.max_tokens - out.tokens.len() - 1);
        let pending = &ctx[drafter.runner.len()..];
        let last = *ctx.last().unwrap();
        let (drafts, kept, next) = if plain_greedy {
            let d = drafter.propose_greedy(pending, k)?;
            // [1, k + 1]: the last context token, then the drafts.
            let input = concatenate(&std::iter::once(store::ids(&[last])).chain(d).collect::<Vec<_>>(), 1)?;
            let logits = target.forward(input.clone(), false)?; // [1, k + 1, V]
            let best = argmax_axis(&logits, -1, None)?.as_dtype(Dtype::Int32)?; // [1, k + 1]
            eval([&input, &best])?;
            let drafts: Vec<u32> = input.try_as_slice::<i32>()?[1..].iter().map(|&t| t as u32).collect();
            let best: Vec<u32> = best.try_as_slice::<i32>()?.iter().map(|&t| t as u32).collect();
            let (n, next) = accept::accept_greedy(&drafts, &best);
            (drafts, n, next)
        } else {
            let (drafts, q) = drafter.propose_sampled(pending, k, proc.clone(), &mut rng)?;
            let input: Vec<u32> = std::iter::once(last).chain(drafts.iter().copied()).collect();
            let rows = store::rows(&target.forward(store::ids(&input), false)?)?;
            let (n, next) = verify_sampled(&drafts, &q, &rows, &proc, &mut rng);
            (drafts, n, next)
        };
        out.rounds += 1;
        out.drafted_tokens += k;
        out.accepted_tokens += kept;
        len.update(k, kept);
        for &t in drafts[..kept].iter().chain(std::iter::once(&next)) {
            out.tokens.push(t);
            ctx.push(t);
            proc.accept(t);
            if !on_token(t) {
                break 'rounds;
            }
        }
        // Roll back what was rejected: the target keeps the context but its
        // last token; the drafter as much of that as it had.
        target.truncate(ctx.len() - 1)?;
        let d = drafter.runner.len().min(ctx.len() - 1);
        drafter.runner.truncate(d)?;
    }
    out.generation_secs = t1.elapsed().as_secs_f64();
    out.kv_bytes_per_token = target.kv_bytes_per_token();
    Ok(out)
}

use adapt::DraftLength;

/// The request's generator: seeded when it gives a seed.
fn seeded(seed: Option<u64>) -> ChaCha8Rng {
    match seed {
        Some(s) => ChaCha8Rng::seed_from_u64(s),
        None => ChaCha8Rng::from_os_rng(),
    }
}

/// A token drawn from one row of logits under `sampler` (whose history is
/// the context): the token and the distribution it was drawn from.
fn draw_row(mut row: Vec<f32>, sampler: &Sampler, rng: &mut ChaCha8Rng) -> (u32, Vec<f32>) {
    sampler.process(&mut row);
    let q = sampler.distribution(&row);
    let t = accept::draw(&q, rng).unwrap_or_else(|| super::sampler::argmax(&row));
    (t, q)
}

/// Sampled verification of `drafts` (drawn from `q`) against the verifier's
/// `rows` [k + 1][V]: the distribution at position i comes from `proc`'s
/// chain with drafts[..i] in its history; rejection sampling keeps the
/// output the verifier's.
fn verify_sampled(drafts: &[u32], q: &[Vec<f32>], rows: &[Vec<f32>], proc: &Sampler, rng: &mut ChaCha8Rng) -> (usize, u32) {
    let mut pv = proc.clone();
    let p_at = |i: usize| {
        if i > 0 {
            pv.accept(drafts[i - 1]);
        }
        let mut l = rows[i].clone();
        pv.process(&mut l);
        pv.distribution(&l)
    };
    accept::accept_sampled(drafts, q, p_at, rng)
}
