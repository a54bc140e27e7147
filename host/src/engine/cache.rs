//! A contiguous one-sequence KV cache, lent to architectures as `Attention`
//! (`rmlx generate`, `rmlx bench` and the compiled step; the server's
//! scheduler uses the paged pool in kv_pool.rs).
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{
        concatenate,
        indexing::{TryIndexMutOp, TryIndexOp},
        zeros_dtype,
    },
    Array,
};
use rmlx_plugin_api::{AttendOptions, Attention, PluginError};

/// Capacity grows in steps of this many tokens (as mlx-lm's KVCache).
const STEP: i32 = 256;

pub struct KvCache {
    /// Per layer: keys and values [B, K, capacity, hd]; the first `offset`
    /// positions are filled. Updated in place by slice assignment.
    layers: Vec<Option<(Array, Array)>>,
    offset: i32,
    /// Capacity grows in steps of this many tokens.
    step: i32,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            offset: 0,
            step: STEP,
        }
    }



    /// The per-layer buffers [1, K, capacity, hd] and the offset, when every
    /// layer has been written (the compiled decode step takes them over).
    pub fn take_buffers(&mut self) -> Option<(Vec<(Array, Array)>, i32)> {
        if self.layers.iter().any(|l| l.is_none()) {
            return None;
        }
        let layers = self.layers.iter_mut().map(|l| l.take().unwrap()).collect();
        Some((layers, self.offset))
    }

    /// Gives back buffers taken with `take_buffers`, now holding `offset` tokens.
    pub fn put_buffers(&mut self, layers: Vec<(Array, Array)>, offset: i32) {
        self.layers = layers.into_iter().map(Some).collect();
        self.offset = offset;
    }

    /// Capacity grows in steps of this many tokens.
    pub fn step(&self) -> i32 {
        self.step
    }

    /// Tokens already cached.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// After a forward of `n` new tokens.
    pub fn advance(&mut self, n: i32) {
        self.offset += n;
    }

    /// Lends the cache to one forward call.
    pub fn attention(&mut self) -> Attention {
        super::attend::lend(self)
    }
}

impl super::attend::KvStore for KvCache {
    fn batch(&self) -> u32 {
        1
    }

    fn offset(&self) -> i32 {
        self.offset
    }

    fn offsets(&self) -> Array {
        Array::from_slice(&[self.offset], &[1])
    }

    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    fn attend(
        &mut self,
        layer: u32,
        q: Array,
        k: Array,
        v: Array,
        opts: AttendOptions,
    ) -> Result<Array, PluginError> {
        let slot = self
            .layers
            .get_mut(layer as usize)
            .ok_or_else(|| PluginError::other(format!("attention layer {layer} out of range")))?;
        let prev = self.offset;
        let end = prev + k.dim(2);
        let (mut keys, mut values) = match slot.take() {
            Some((keys, values)) if keys.dim(2) >= end => (keys, values),
            old => {
                // Grow: keep what is filled, add zeroed steps.
                let add = (k.dim(2) + self.step - 1) / self.step * self.step;
                let grow = |x: &Array| -> Result<Array, PluginError> {
                    Ok(zeros_dtype(
                        &[x.dim(0), x.dim(1), add, x.dim(3)],
                        x.dtype(),
                    )?)
                };
                match old {
                    Some((keys, values)) => {
                        let keys = keys.try_index((.., .., ..prev, ..))?;
                        let values = values.try_index((.., .., ..prev, ..))?;
                        let (gk, gv) = (grow(&keys)?, grow(&values)?);
                        (concatenate(&[keys, gk], 2)?, concatenate(&[values, gv], 2)?)
                    }
                    None => (grow(&k)?, grow(&v)?),
                }
            }
        };
        keys.try_index_mut((.., .., prev..end, ..), &k)?;
        values.try_index_mut((.., .., prev..end, ..), &v)?;
        let (k, v) = (
            keys.try_index((.., .., ..end, ..))?,
            values.try_index((.., .., ..end, ..))?,
        );
        *slot = Some((keys, values));
        if opts.window != 0 {
            return Err(PluginError::unsupported(
                "sliding-window attention needs the paged KV cache",
            ));
        }
        let mask = (q.dim(2) > 1).then_some(ScaledDotProductAttentionMask::Causal);
        Ok(scaled_dot_product_attention(
            &q, &k, &v, opts.scale, mask, None,
        )?)
    }
}
