//! One sequence over the paged KV pool: what `rmlx generate`, `rmlx eval
//! ppl` and `rmlx bench` use when the model's KV family is not its dense
//! default (a compressed family stores and attends only through the pool).
//! The block table is the blocks 0, 1, 2, ... in order. A model's
//! recurrent-state layers keep their state here too (recurrent.rs).
use super::{
    kv_pool::KvPool,
    paged::{PagedForward, Row},
    recurrent::RowState,
    LoadedModel,
};
use anyhow::Result;
use mlx_rs::Array;

pub struct SeqPool {
    pool: KvPool,
    table: Vec<u32>,
    len: usize,
    /// Recurrent-state layers' state after the `len` tokens.
    state: RowState,
}

/// Tokens per block of the one-sequence pool.
const BLOCK: usize = 16;

impl SeqPool {
    pub fn new(model: &LoadedModel) -> Self {
        let (k, v) = model.kv.clone();
        Self::with_sides(model, k, v)
    }

    /// With other families than the model's own (a baseline to compare with).
    /// Layers as the model declares them (kv_layout.rs); a layout the
    /// families cannot hold (`LoadedModel::paged_refusal`, checked by the
    /// callers) falls back to uniform layers, whose attention then refuses
    /// the misfit k/v with an error.
    pub fn with_sides(model: &LoadedModel, k: super::kv_pool::KvSide, v: super::kv_pool::KvSide) -> Self {
        let max_blocks = (model.spec.max_context as usize).max(1 << 16).div_ceil(BLOCK) + 1;
        let n = model.spec.num_layers as usize;
        let pool = match KvPool::for_model(model, k.clone(), v.clone(), BLOCK, max_blocks) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{e:#}");
                KvPool::new(n, k, v, BLOCK, max_blocks)
            }
        };
        Self { pool, table: Vec::new(), len: 0, state: RowState::new() }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `input` int32 [1, L] after the cached tokens: logits [1, L | 1, V]
    /// (all positions unless `last_only`), lazily.
    pub fn forward(&mut self, model: &mut LoadedModel, input: Array, last_only: bool) -> Result<Array> {
        let l = input.dim(1) as usize;
        let need = (self.len + l).div_ceil(BLOCK);
        while self.table.len() < need {
            self.table.push(self.table.len() as u32);
        }
        let rows = [Row { table: &self.table, offset: self.len }];
        let mut paged = PagedForward::new(&mut self.pool, &rows, l)?.with_states(vec![&self.state]);
        let logits = model.logits(&input, &mut paged, last_only)?;
        let new_states = paged.take_states();
        drop(paged);
        self.state.extend(new_states);
        self.len += l;
        Ok(logits)
    }

    /// Forgets the positions from `len` on (speculative decoding's rejected
    /// tokens): their slots stay in the table and the next forward
    /// overwrites them (every family encodes each token slot on its own).
    /// Not exact for recurrent state (it cannot be rolled back): speculative
    /// decoding refuses such models.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes per cached token as the pool's arrays hold them: every layer's
    /// keys and values, codes, scales and norms, over the slots they have.
    pub fn measured_bytes_per_token(&self) -> f64 {
        let bytes: usize = self.pool.arrays().iter().map(|a| a.nbytes()).sum();
        let slots = self.pool.capacity() * self.pool.block_size;
        bytes as f64 / slots.max(1) as f64
    }

    /// The families, as one key (`q4`, or `q8/turbo3`).
    pub fn family_key(&self) -> String {
        self.pool.family_key()
    }
}
