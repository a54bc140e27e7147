//! The verifier's target at each position of a speculating row that reads
//! its logits on the host (it samples, has a logits hook, or asks for
//! logprobs): position j's logits after exactly what plain decoding applies
//! before choosing that token (sequence.rs `sample`): the sampler's
//! processors (logit bias, penalties) with the history advanced through
//! `drafts[..j]`, then the row's hook, a fork advanced (committed) through
//! the same drafts. Positions are computed in order and only as far as
//! acceptance asks, so the hook's fork only ever sees drafts that were kept
//! up to the position it masks.
use super::super::super::sampler::{argmax, logprobs, Sampled, Sampler};
use super::super::super::sequence::panic_message;
use super::super::super::worker::LogitsHook;

/// Runs a hook fork's `apply` or `commit`: a panic is its error (as
/// plain decoding's `guarded` makes it), so it fails that row only.
pub(super) fn caught(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(anyhow::anyhow!("internal error while sampling: {}", panic_message(&*p))),
    }
}

pub(super) struct Targets<'a> {
    /// The verifier's raw logits at positions 0..=k (f32, [V] each).
    raw: &'a [Vec<f32>],
    drafts: &'a [u32],
    /// A copy of the row's sampler (its history runs through the drafts).
    sampler: Sampler,
    /// A fork of the row's hook (its state runs through the drafts).
    hook: Option<Box<dyn LogitsHook>>,
    /// Ids that end the row (no token after one is ever emitted).
    eos: &'a [u32],
    /// Processed (and masked) logits of positions 0..done.len().
    done: Vec<Vec<f32>>,
    /// Past a token that ends the row (EOS, or the hook finished): the
    /// positions after it are never emitted, the hook is no longer asked.
    ended: bool,
    /// The first position whose hook failed, and why: the row emits the
    /// tokens before it and ends with the error, as plain decoding would.
    pub(super) error: Option<(usize, String)>,
}

impl<'a> Targets<'a> {
    pub(super) fn new(raw: &'a [Vec<f32>], drafts: &'a [u32], sampler: Sampler, hook: Option<Box<dyn LogitsHook>>, eos: &'a [u32]) -> Self {
        Self { raw, drafts, sampler, hook, eos, done: Vec::with_capacity(drafts.len() + 1), ended: false, error: None }
    }

    /// Position j's processed and masked logits (positions before it first).
    fn logits(&mut self, j: usize) -> &[f32] {
        while self.done.len() <= j {
            let i = self.done.len();
            if i > 0 {
                let t = self.drafts[i - 1];
                self.sampler.accept(t);
                if !self.ended && self.eos.contains(&t) {
                    self.ended = true;
                }
                if !self.ended {
                    if let Some(h) = self.hook.as_mut() {
                        match caught(|| h.commit(t)) {
                            Err(e) => self.fail(i, e),
                            Ok(()) if h.is_finished() => self.ended = true,
                            Ok(()) => {}
                        }
                    }
                }
            }
            let mut l = self.raw[i].clone();
            self.sampler.process(&mut l);
            if !self.ended {
                if let Some(h) = self.hook.as_mut() {
                    if let Err(e) = caught(|| h.apply(&mut l)) {
                        self.fail(i, e);
                    }
                }
            }
            self.done.push(l);
        }
        &self.done[j]
    }

    fn fail(&mut self, at: usize, e: anyhow::Error) {
        self.ended = true;
        if self.error.is_none() {
            self.error = Some((at, format!("{e:#}")));
        }
    }

    /// The distribution the row's sampler draws from at position j (p_j).
    pub(super) fn distribution(&mut self, j: usize) -> Vec<f32> {
        self.logits(j);
        self.sampler.distribution(&self.done[j])
    }

    /// The greedy token at position j.
    pub(super) fn argmax(&mut self, j: usize) -> u32 {
        argmax(self.logits(j))
    }

    /// `token` emitted at position j, with the logprobs plain decoding
    /// reports there (`sampler::logprobs`; None: not asked for).
    pub(super) fn sampled(&mut self, j: usize, token: u32, top_n: Option<usize>) -> Sampled {
        logprobs(self.logits(j), token, top_n)
    }
}
