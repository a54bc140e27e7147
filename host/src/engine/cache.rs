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
use rmlx_plugin_api::{author::guard, AttendOptions, Attention, MlxArray, PResult, PluginError};
use std::ffi::c_void;

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

    /// A cache that grows in steps of `step` tokens.
    pub fn with_step(num_layers: usize, step: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            offset: 0,
            step: step.max(1) as i32,
        }
    }

    /// A cache holding `len` tokens given per layer as (keys, values)
    /// [1, K, len, hd] (a prefix-cache hit).
    pub fn from_prefix(layers: Vec<(Array, Array)>, len: usize, step: usize) -> Self {
        Self {
            layers: layers.into_iter().map(Some).collect(),
            offset: len as i32,
            step: step.max(1) as i32,
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

    /// Tokens the buffers can hold now.
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2) as usize)
            .unwrap_or(0)
    }

    /// Capacity after `n` more tokens are written (growth mirrors `attend`).
    pub fn capacity_after(&self, n: usize) -> usize {
        let cap = self.capacity();
        let end = self.offset as usize + n;
        if self.layers.first().is_some_and(|l| l.is_some()) && end <= cap {
            cap
        } else {
            self.offset as usize + n.div_ceil(self.step as usize) * self.step as usize
        }
    }

    /// Copies (evaluated, owning their memory) of positions start..end of
    /// every layer: (keys, values) [1, K, end-start, hd].
    pub fn copy_range(&self, start: usize, end: usize) -> anyhow::Result<Vec<(Array, Array)>> {
        let (s, e) = (start as i32, end as i32);
        let mut out = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (k, v) = l
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("KV cache layer is empty"))?;
            let k = copy_array(&k.try_index((.., .., s..e, ..))?)?;
            let v = copy_array(&v.try_index((.., .., s..e, ..))?)?;
            out.push((k, v));
        }
        let all: Vec<&Array> = out.iter().flat_map(|(k, v)| [k, v]).collect();
        mlx_rs::transforms::eval(all)?;
        Ok(out)
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
        unsafe {
            Attention::new(
                self as *mut Self as *mut c_void,
                offset_cb,
                attend_cb,
                offsets_cb,
                batch_one_cb,
            )
        }
    }

    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    pub(crate) fn attend(
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

/// A real copy (new buffer) of `a`, which may be a strided view.
fn copy_array(a: &Array) -> anyhow::Result<Array> {
    let stream = mlx_rs::Stream::thread_local_or_default();
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        if mlx_sys::mlx_copy(&mut res, a.as_ptr(), stream.as_ptr()) != 0 {
            mlx_sys::mlx_array_free(res);
            anyhow::bail!("mlx_copy failed");
        }
        Ok(Array::from_ptr(res))
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
    guard(|| {
        cache
            .attend(layer, q.into_array(), k.into_array(), v.into_array(), opts)
            .map(MlxArray::from_array)
    })
}
