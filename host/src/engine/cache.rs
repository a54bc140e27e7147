//! A contiguous one-sequence KV cache, lent to architectures as `Attention`
//! (`rmlx generate`, `rmlx bench` and the compiled step; the server's
//! scheduler uses the paged pool in kv_pool.rs). Sliding-window layers
//! (`AttendOpts::window`) attend over their window only, masked exactly as
//! the paged pool and mlx-lm mask them, and drop the positions no later query
//! can see.
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{
        concatenate,
        indexing::{TryIndexMutOp, TryIndexOp},
        zeros_dtype,
    },
    Array,
};
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts},
    PluginError,
};

/// Capacity grows in steps of this many tokens (as mlx-lm's KVCache).
const STEP: i32 = 256;

pub struct KvCache {
    /// Per layer: keys and values [B, K, capacity, hd] holding positions
    /// `base..base + capacity`; those below `offset` are filled. Updated in
    /// place by slice assignment.
    layers: Vec<Option<Slot>>,
    /// Per layer: a recurrent-state layer's arrays [1, ...] (empty: none yet).
    states: Vec<Vec<Array>>,
    offset: i32,
    /// Capacity grows in steps of this many tokens.
    step: i32,
}

/// One layer's buffers. `base` stays 0 on full-attention layers; a
/// sliding-window layer drops, when it grows, the positions that fell out of
/// every later query's window, so it holds about window + step tokens
/// (as mlx-lm's RotatingKVCache holds `max_size`).
#[derive(Clone)]
struct Slot {
    keys: Array,   // [B, K, capacity, hd]
    values: Array, // [B, K, capacity, hd]
    base: i32,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            states: vec![Vec::new(); num_layers],
            offset: 0,
            step: STEP,
        }
    }

    /// The per-layer buffers [1, K, capacity, hd] and the offset, when every
    /// layer has been written and holds every position from 0 (the compiled
    /// decode step takes them over; it never runs windowed models).
    pub fn take_buffers(&mut self) -> Option<(Vec<(Array, Array)>, i32)> {
        if self.layers.iter().any(|l| l.as_ref().is_none_or(|s| s.base != 0)) {
            return None;
        }
        let layers = self.layers.iter_mut().map(|l| l.take().map(|s| (s.keys, s.values)).unwrap()).collect();
        Some((layers, self.offset))
    }

    /// Gives back buffers taken with `take_buffers`, now holding `offset` tokens.
    pub fn put_buffers(&mut self, layers: Vec<(Array, Array)>, offset: i32) {
        self.layers = layers.into_iter().map(|(keys, values)| Some(Slot { keys, values, base: 0 })).collect();
        self.offset = offset;
    }

    /// Capacity grows in steps of this many tokens.
    pub fn step(&self) -> i32 {
        self.step
    }

    /// Bytes per cached token the buffers hold: per layer, keys and values
    /// over the slots they have, summed over layers.
    pub fn measured_bytes_per_token(&self) -> f64 {
        self.layers
            .iter()
            .flatten()
            .map(|s| (s.keys.nbytes() + s.values.nbytes()) as f64 / s.keys.dim(2).max(1) as f64)
            .sum()
    }

    /// Layer `layer`'s cached keys and values [B, K, T, hd] (the positions
    /// it still holds), or None for a layer without K/V.
    pub fn layer_kv(&self, layer: usize) -> Option<(Array, Array)> {
        let s = self.layers.get(layer)?.as_ref()?;
        let n = self.offset - s.base;
        let k = s.keys.try_index((.., .., 0..n, ..)).ok()?;
        let v = s.values.try_index((.., .., 0..n, ..)).ok()?;
        Some((k, v))
    }

    /// Tokens already cached.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// After a forward of `n` new tokens.
    pub fn advance(&mut self, n: i32) {
        self.offset += n;
    }

    /// Forgets the positions from `len` on (speculative decoding's rejected
    /// tokens); the next forward overwrites them. Exact for full-attention
    /// layers only: a sliding-window layer may already have dropped
    /// positions that queries after `len` would see, so callers refuse
    /// windowed models.
    pub fn truncate(&mut self, len: i32) {
        self.offset = self.offset.min(len.max(0));
    }
}

impl super::attend::KvStore for KvCache {
    fn batch(&self) -> u32 {
        1
    }

    fn offset(&self) -> i32 {
        self.offset
    }

    fn state(&mut self, layer: u32) -> Result<Vec<Array>, PluginError> {
        self.states.get(layer as usize).cloned().ok_or_else(|| PluginError::other(format!("state layer {layer} out of range")))
    }

    fn set_state(&mut self, layer: u32, state: Vec<Array>) -> Result<(), PluginError> {
        if self.layers.get(layer as usize).is_some_and(Option::is_some) {
            return Err(PluginError::other(format!("layer {layer} holds K/V; it cannot also keep recurrent state")));
        }
        let slot = self.states.get_mut(layer as usize).ok_or_else(|| PluginError::other(format!("state layer {layer} out of range")))?;
        *slot = state;
        Ok(())
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
        opts: &AttendOpts<'_>,
    ) -> Result<Array, PluginError> {
        super::attend::refuse_bidirectional(opts)?;
        if !self.states.get(layer as usize).is_none_or(Vec::is_empty) {
            return Err(PluginError::other(format!("layer {layer} keeps recurrent state; it has no KV to attend over")));
        }
        let slot = self
            .layers
            .get_mut(layer as usize)
            .ok_or_else(|| PluginError::other(format!("attention layer {layer} out of range")))?;
        let (prev, n, w) = (self.offset, k.dim(2), opts.window as i32);
        let end = prev + n;
        // The first position any new query sees: its window's start.
        let first = if w > 0 { (prev + 1 - w).max(0) } else { 0 };
        let Slot { mut keys, mut values, base } = match slot.take() {
            Some(s) if s.base + s.keys.dim(2) >= end => s,
            old => {
                // Grow: keep what is filled from `first` on, add zeroed steps.
                let add = (n + self.step - 1) / self.step * self.step;
                let zeros = |x: &Array| -> Result<Array, PluginError> {
                    Ok(zeros_dtype(&[x.dim(0), x.dim(1), add, x.dim(3)], x.dtype())?)
                };
                match old {
                    Some(Slot { keys, values, base }) => {
                        let keep = first.max(base);
                        let keys = keys.try_index((.., .., keep - base..prev - base, ..))?;
                        let values = values.try_index((.., .., keep - base..prev - base, ..))?;
                        let (zk, zv) = (zeros(&keys)?, zeros(&values)?);
                        Slot { keys: concatenate(&[keys, zk], 2)?, values: concatenate(&[values, zv], 2)?, base: keep }
                    }
                    None => Slot { keys: zeros(&k)?, values: zeros(&v)?, base: prev },
                }
            }
        };
        keys.try_index_mut((.., .., prev - base..end - base, ..), &k)?;
        values.try_index_mut((.., .., prev - base..end - base, ..), &v)?;
        // Attend over positions s..end: [B, K, end - s, hd].
        let s = first.max(base);
        let (k, v) = (
            keys.try_index((.., .., s - base..end - base, ..))?,
            values.try_index((.., .., s - base..end - base, ..))?,
        );
        *slot = Some(Slot { keys, values, base });
        let out = if !opts.is_plain() {
            // Soft-cap or sinks: the composed path, masked as below.
            let m = (n > 1).then(|| window_mask(prev, n, s, if w > 0 { w } else { end + 1 }));
            dense_attend(&q, &k, &v, m.as_ref(), opts)?
        } else if n == 1 {
            // One query: every key from `s` on is inside its window.
            scaled_dot_product_attention(&q, &k, &v, opts.scale, None, None)?
        } else if w == 0 || s >= end - w {
            // No key before the last query's window: causal masking (aligned
            // to the end of the keys) is exact.
            scaled_dot_product_attention(&q, &k, &v, opts.scale, ScaledDotProductAttentionMask::Causal, None)?
        } else {
            let m = window_mask(prev, n, s, w); // bool [n, end - s]
            scaled_dot_product_attention(&q, &k, &v, opts.scale, ScaledDotProductAttentionMask::Array(&m), None)?
        };
        Ok(out)
    }
}

/// bool [n, prev + n - s]: query i (position prev + i) sees key position
/// p = s + j when p <= prev + i and p > prev + i - window.
fn window_mask(prev: i32, n: i32, s: i32, window: i32) -> Array {
    let len = prev + n - s;
    let m: Vec<bool> = (0..n)
        .flat_map(|i| (0..len).map(move |j| s + j <= prev + i && s + j + window > prev + i))
        .collect();
    Array::from_slice(&m, &[n, len])
}

#[cfg(test)]
mod tests {
    use super::super::attend::KvStore;
    use super::*;
    use mlx_rs::random;

    /// Reference: attention over the whole contiguous history, masked the
    /// way the paged pool (kv_pool.rs) and mlx-lm mask windows: query at
    /// position p sees keys j with j <= p and j > p - window.
    fn reference(q: &Array, k: &Array, v: &Array, window: u32) -> Array {
        let (l, lk) = (q.dim(2), k.dim(2));
        let m: Vec<bool> = (0..l)
            .flat_map(|i| {
                let pos = (lk - l + i) as usize;
                (0..lk as usize).map(move |j| j <= pos && (window == 0 || j + window as usize > pos))
            })
            .collect();
        let m = Array::from_slice(&m, &[l, lk]);
        scaled_dot_product_attention(q, k, v, 0.5, ScaledDotProductAttentionMask::Array(&m), None).unwrap()
    }

    fn max_diff(a: &Array, b: &Array) -> f32 {
        (a - b).abs().unwrap().max(None).unwrap().item_exact::<f32>()
    }

    /// Prefill chunks of several sizes (longer and shorter than the window,
    /// and a chunk that starts after the window has slid), then decode steps:
    /// every output equals masked attention over the full history; a
    /// windowed layer's buffers stay bounded while a full layer keeps every
    /// position. (tests/engine_batching.rs checks generate == the paged
    /// engine on a windowed model end to end.)
    #[test]
    fn windowed_layers_match_attention_over_the_full_history() {
        let (h, kh, hd, window) = (4, 2, 8, 5u32);
        let mut cache = KvCache::new(2);
        cache.step = 4; // grow (and trim) often
        let mut hist: Vec<(Array, Array)> = vec![];
        let mut longest = 0;
        for (c, n) in [7, 3, 1, 1, 9, 2, 1, 1, 1, 1, 1, 6, 1].into_iter().enumerate() {
            let r = |heads: i32| random::normal::<f32>(&[1, heads, n, hd], None, None, None).unwrap();
            let (q, k, v) = (r(h), r(kh), r(kh));
            let prev = cache.offset();
            for (layer, w) in [(0u32, window), (1, 0)] {
                let opts = AttendOpts::plain(0.5).window(w);
                let got = cache.attend(layer, q.clone(), k.clone(), v.clone(), &opts).unwrap();
                let hk = match hist.get(layer as usize) {
                    Some((hk, hv)) => (concatenate(&[hk, &k], 2).unwrap(), concatenate(&[hv, &v], 2).unwrap()),
                    None => (k.clone(), v.clone()),
                };
                let want = reference(&q, &hk.0, &hk.1, w);
                let d = max_diff(&got, &want);
                assert!(d < 1e-5, "chunk {c} ({n} tokens at {prev}), window {w}: max diff {d} from the reference");
                if hist.len() <= layer as usize {
                    hist.push(hk);
                } else {
                    hist[layer as usize] = hk;
                }
            }
            cache.advance(n);
            let held = |l: usize| cache.layers[l].as_ref().map(|s| (s.base, s.keys.dim(2))).unwrap();
            let (base, cap) = held(0);
            // Window - 1 older positions plus the largest chunk, rounded up to a step.
            longest = longest.max(n);
            assert!(cap <= window as i32 - 1 + (longest + 3) / 4 * 4, "chunk {c}: windowed layer holds {cap}");
            assert!(base + cap >= cache.offset() && base <= (cache.offset() - window as i32).max(0) + 4, "chunk {c}: base {base}");
            assert_eq!(held(1).0, 0, "a full-attention layer keeps position 0");
        }
        assert_eq!(cache.offset(), 35);
        assert!(cache.take_buffers().is_none(), "a trimmed layer is not handed to the compiled step");
    }
}
