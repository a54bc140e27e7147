//! One model with its own one-sequence KV store, as speculative decoding
//! needs it for the verifier and for the draft model alike: forwards that
//! return every position's logits, and `truncate` to roll rejected tokens
//! back. The contiguous cache (engine/cache.rs) serves full-attention models
//! in their dense family; models with sliding windows or a compressed KV
//! family go through the paged one-sequence pool (engine/seq_pool.rs),
//! which masks windows instead of dropping positions, so a roll-back never
//! needs a position that was already dropped.
//!
//! A model with recurrent-state layers (gated DeltaNet: qwen3_next, the
//! Qwen3.5 hybrids) runs on the contiguous cache, whose states cannot be
//! truncated: each forward since the last roll-back keeps the states from
//! before it (arrays are immutable: references, not copies) and its input,
//! and `truncate` restores the states of the forward the new length falls
//! in and feeds that forward's first tokens again (none when the length is
//! where a forward began: the draft model's one-token steps).
use super::super::{cache::KvCache, seq_pool::SeqPool, LoadedModel};
use anyhow::{bail, Result};
use mlx_rs::{ops::indexing::TryIndexOp, Array, Dtype};
use rmlx_plugin_api::cache_kind;

enum Kv {
    Cache(KvCache),
    Pool(Box<SeqPool>),
}

pub struct Runner<'m> {
    pub model: &'m mut LoadedModel,
    kv: Kv,
    /// State models: per forward since the last roll-back, (its offset,
    /// the states before it, its input [1, L]).
    history: Option<Vec<(i32, Vec<Vec<Array>>, Array)>>,
}

impl<'m> Runner<'m> {
    /// Refuses models whose cache cannot be rolled back here: layouts the
    /// paged pool does not serve when a window or a compressed family needs
    /// it, and recurrent-state layers beside a window or a compressed
    /// family (the states roll back on the contiguous cache only).
    pub fn new(model: &'m mut LoadedModel) -> Result<Self> {
        let name = || model.dir.path.display().to_string();
        let windowed = model.spec.sliding_window.iter().any(|&w| w > 0)
            || model.cache_layers.iter().any(|l| l.kind == cache_kind::WINDOW);
        if let Some(i) = model.cache_layers.iter().position(|l| l.kind == cache_kind::STATE) {
            if windowed || !model.kv_is_dense_default() {
                bail!("speculative decoding rolls back {}'s recurrent state (layer {i}) on the contiguous cache only: not with sliding windows or a compressed KV family", name());
            }
            let kv = Kv::Cache(model.kv_cache());
            return Ok(Self { model, kv, history: Some(Vec::new()) });
        }
        let kv = if model.kv_is_dense_default() && !windowed {
            Kv::Cache(KvCache::new(model.spec.num_layers as usize))
        } else {
            if let Some(why) = model.paged_refusal() {
                bail!("speculative decoding over {} needs the paged one-sequence pool (sliding windows or a compressed KV family): {why}", name());
            }
            Kv::Pool(Box::new(SeqPool::new(model)))
        };
        Ok(Self { model, kv, history: None })
    }

    /// Tokens cached.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        match &self.kv {
            Kv::Cache(c) => c.offset() as usize,
            Kv::Pool(p) => p.len(),
        }
    }

    /// `input` int32 [1, L] after the cached tokens (possibly lazy): logits
    /// [1, L, V], or [1, 1, V] with `last_only`, lazily.
    pub fn forward(&mut self, input: Array, last_only: bool) -> Result<Array> {
        match &mut self.kv {
            Kv::Pool(p) => p.forward(self.model, input, last_only),
            Kv::Cache(c) => {
                let before = self.history.is_some().then(|| (c.offset(), c.states()));
                let logits = self.model.logits(&input, c, last_only)?;
                c.advance(input.dim(1));
                if let (Some(h), Some((at, states))) = (self.history.as_mut(), before) {
                    h.push((at, states, input));
                }
                Ok(logits)
            }
        }
    }

    /// Feeds `tokens` in chunks of `chunk`, evaluating each (the prefill).
    pub fn feed(&mut self, tokens: &[u32], chunk: usize) -> Result<()> {
        for piece in tokens.chunks(chunk.max(1)) {
            self.forward(ids(piece), true)?.eval()?;
        }
        Ok(())
    }

    /// Rolls the cache back to its first `len` tokens (a recurrent state:
    /// restored and fed again, see the module doc).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let len = len.min(self.len());
        match &mut self.kv {
            Kv::Cache(c) => match self.history.as_mut().map(std::mem::take) {
                Some(h) if len < c.offset() as usize => {
                    let Some((at, states, input)) = h.into_iter().rev().find(|(at, ..)| (*at as usize) <= len) else {
                        bail!("cannot roll a recurrent state back to {len} tokens: it was not kept");
                    };
                    c.truncate(at);
                    c.restore_states(states);
                    let n = len as i32 - at;
                    if n > 0 {
                        let again = input.try_index((.., 0..n))?;
                        self.model.logits(&again, c, true)?.eval()?;
                        c.advance(n);
                    }
                }
                _ => c.truncate(len as i32),
            },
            Kv::Pool(p) => p.truncate(len),
        }
        Ok(())
    }

    /// Bytes per cached token, measured from the store's arrays.
    pub fn kv_bytes_per_token(&self) -> f64 {
        match &self.kv {
            Kv::Cache(c) => c.measured_bytes_per_token(),
            Kv::Pool(p) => p.measured_bytes_per_token(),
        }
    }
}

/// Token ids -> int32 [1, L].
pub fn ids(tokens: &[u32]) -> Array {
    let v: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    Array::from_slice(&v, &[1, v.len() as i32])
}

/// Logits [1, L, V] -> L host rows of V f32 values.
pub fn rows(logits: &Array) -> Result<Vec<Vec<f32>>> {
    let v = logits.dim(-1) as usize;
    let l = logits.as_dtype(Dtype::Float32)?;
    l.eval()?;
    Ok(l.try_as_slice::<f32>()?.chunks(v).map(|r| r.to_vec()).collect())
}
