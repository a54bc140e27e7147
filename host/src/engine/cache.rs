//! A contiguous per-sequence KV cache, lent to architectures as `Attention`.
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{
        concatenate,
        indexing::{TryIndexMutOp, TryIndexOp},
        zeros_dtype,
    },
    Array,
};
use rmlx_plugin_api::{author::guard, AttendOptions, Attention, MlxArray, PResult, PluginError};
use std::ffi::c_void;

/// Capacity grows in steps of this many tokens (as mlx-lm's KVCache).
const STEP: i32 = 256;

pub struct KvCache {
    /// Per layer: keys and values [B, K, capacity, hd]; the first `offset`
    /// positions are filled. Updated in place by slice assignment.
    layers: Vec<Option<(Array, Array)>>,
    offset: i32,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], offset: 0 }
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
        unsafe { Attention::new(self as *mut Self as *mut c_void, offset_cb, attend_cb, offsets_cb, batch_one_cb) }
    }

    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: AttendOptions) -> Result<Array, PluginError> {
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
                let add = (k.dim(2) + STEP - 1) / STEP * STEP;
                let grow = |x: &Array| -> Result<Array, PluginError> {
                    Ok(zeros_dtype(&[x.dim(0), x.dim(1), add, x.dim(3)], x.dtype())?)
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
        let (k, v) = (keys.try_index((.., .., ..end, ..))?, values.try_index((.., .., ..end, ..))?);
        *slot = Some((keys, values));
        if opts.window != 0 {
            return Err(PluginError::unsupported("sliding-window attention needs the paged KV cache"));
        }
        let mask = (q.dim(2) > 1).then_some(ScaledDotProductAttentionMask::Causal);
        Ok(scaled_dot_product_attention(&q, &k, &v, opts.scale, mask, None)?)
    }
}

extern "C" fn offset_cb(state: *mut c_void) -> i32 {
    unsafe { &*(state as *const KvCache) }.offset
}

extern "C" fn offsets_cb(state: *mut c_void) -> MlxArray {
    let off = unsafe { &*(state as *const KvCache) }.offset;
    MlxArray::from_array(Array::from_slice(&[off], &[1]))
}

extern "C" fn batch_one_cb(_: *mut c_void) -> u32 {
    1
}

extern "C" fn attend_cb(
    state: *mut c_void,
    layer: u32,
    q: MlxArray,
    k: MlxArray,
    v: MlxArray,
    opts: AttendOptions,
) -> PResult<MlxArray> {
    let cache = unsafe { &mut *(state as *mut KvCache) };
    guard(|| cache.attend(layer, q.into_array(), k.into_array(), v.into_array(), opts).map(MlxArray::from_array))
}
