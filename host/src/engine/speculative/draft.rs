//! The `draft` kind: a smaller model with the same tokenizer proposes k
//! tokens autoregressively through its own KV cache.
//!
//! Its cache runs at most one token behind the verifier's: after a round
//! that kept every draft, the last draft token was never fed to it, so the
//! next round feeds the tokens it lacks (`pending`) in one forward.
use super::super::sampler::Sampler;
use super::store::{ids, rows, Runner};
use anyhow::Result;
use mlx_rs::{ops::indexing::argmax_axis, transforms::async_eval, Array, Dtype};
use rand_chacha::ChaCha8Rng;

pub struct DraftModel<'m> {
    pub runner: Runner<'m>,
}

impl<'m> DraftModel<'m> {
    /// Greedy proposals chosen on the device, lazily: each draft token feeds
    /// the next forward without a round trip to the host (queued with
    /// async_eval). `pending` are the context tokens its cache lacks (at
    /// least the last one). Returns the k tokens as int32 [1, 1] arrays.
    pub fn propose_greedy(&mut self, pending: &[u32], k: usize) -> Result<Vec<Array>> {
        let mut input = ids(pending);
        let mut out = Vec::with_capacity(k);
        for _ in 0..k {
            let logits = self.runner.forward(input, true)?; // [1, 1, V]
            let d = argmax_axis(logits.reshape(&[1, -1])?, -1, None)?.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?;
            async_eval([&d])?;
            out.push(d.clone());
            input = d;
        }
        Ok(out)
    }

    /// Sampled proposals: each token drawn on the host from the drafter's
    /// distribution under the request's own sampler chain (`sampler`, a copy
    /// whose history is the context: penalties see the earlier drafts).
    /// Returns the tokens and the distributions they were drawn from.
    pub fn propose_sampled(
        &mut self,
        pending: &[u32],
        k: usize,
        mut sampler: Sampler,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
        let (mut toks, mut dists) = (Vec::with_capacity(k), Vec::with_capacity(k));
        let mut input = ids(pending);
        for _ in 0..k {
            let logits = rows(&self.runner.forward(input, true)?)?.pop().unwrap_or_default();
            let (d, q) = super::draw_row(logits, &sampler, rng);
            sampler.accept(d);
            toks.push(d);
            dists.push(q);
            input = ids(&[d]);
        }
        Ok((toks, dists))
    }
}
