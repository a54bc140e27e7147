//! A contiguous one-sequence KV cache, lent to architectures as `Attention`
//! (`rmlx generate`, `rmlx bench` and the compiled step; the server's
//! scheduler uses the paged pool in kv_pool.rs). Sliding-window layers
//! (`AttendOpts::window`) attend over their window only, masked exactly as
//! the paged pool and mlx-lm mask them, and drop the positions no later query
//! can see. A layer declared `cache_kind::SHARED` (`KvCache::for_layers`)
//! stores nothing: its `attend` ignores the k/v it is given and attends over
//! the K/V its `shared_with` layer stored earlier in the same forward (as
//! mlx-lm's gemma4_text hands the earlier layer's keys and values on).
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{
        concatenate,
        indexing::TryIndexOp,
        zeros_dtype,
    },
    Array,
};
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts},
    cache_kind, LayerCache, PluginError,
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
    /// Per layer: the earlier layer whose K/V a SHARED layer reads.
    shared: Vec<Option<usize>>,
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
    /// Positions below this are written (offset + the last write's tokens).
    end: i32,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            states: vec![Vec::new(); num_layers],
            offset: 0,
            step: STEP,
            shared: vec![None; num_layers],
        }
    }

    /// A cache for `num_layers` layers cached as `layers` says (ABI 3.3
    /// `Model::layers`; empty: every layer its own): SHARED layers keep no
    /// K/V and read their `shared_with` layer's. Refuses a layer shared with
    /// one that is not an earlier K/V layer.
    pub fn for_layers(num_layers: usize, layers: &[LayerCache]) -> Result<Self, PluginError> {
        let mut cache = Self::new(num_layers);
        for (i, l) in layers.iter().enumerate().filter(|(_, l)| l.kind == cache_kind::SHARED) {
            let src = l.shared_with as usize;
            let ok = src < i && layers.get(src).is_some_and(|s| matches!(s.kind, cache_kind::FULL | cache_kind::WINDOW));
            if !ok || i >= num_layers {
                return Err(PluginError::config(format!(
                    "layer {i} is declared shared with layer {src}, which is not an earlier full or window layer"
                )));
            }
            cache.shared[i] = Some(src);
        }
        Ok(cache)
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
        self.layers = layers.into_iter().map(|(keys, values)| Some(Slot { keys, values, base: 0, end: offset })).collect();
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

    /// Whether some layer keeps a recurrent state (which `truncate` cannot
    /// roll back: restore a `states` snapshot and feed the kept tokens again).
    pub fn has_states(&self) -> bool {
        self.states.iter().any(|s| !s.is_empty())
    }

    /// The recurrent states as they are now (arrays are immutable, so this
    /// is a list of references, not a copy).
    pub fn states(&self) -> Vec<Vec<Array>> {
        self.states.clone()
    }

    /// Puts back states taken with `states`.
    pub fn restore_states(&mut self, states: Vec<Vec<Array>>) {
        self.states = states;
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
        if let Some(src) = self.shared.get(layer as usize).copied().flatten() {
            return self.attend_shared(layer, src, &q, opts);
        }
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
        let Slot { keys, values, base, .. } = match slot.take() {
            Some(s) if s.base + s.keys.dim(2) >= end => s,
            old => {
                // Grow: keep what is filled from `first` on, add zeroed steps.
                let add = (n + self.step - 1) / self.step * self.step;
                let zeros = |x: &Array| -> Result<Array, PluginError> {
                    Ok(zeros_dtype(&[x.dim(0), x.dim(1), add, x.dim(3)], x.dtype())?)
                };
                match old {
                    Some(Slot { keys, values, base, .. }) => {
                        let keep = first.max(base);
                        let keys = keys.try_index((.., .., keep - base..prev - base, ..))?;
                        let values = values.try_index((.., .., keep - base..prev - base, ..))?;
                        let (zk, zv) = (zeros(&keys)?, zeros(&values)?);
                        Slot { keys: concatenate(&[keys, zk], 2)?, values: concatenate(&[values, zv], 2)?, base: keep, end }
                    }
                    None => Slot { keys: zeros(&k)?, values: zeros(&v)?, base: prev, end },
                }
            }
        };
        let keys = write_steps(&keys, &k, prev - base)?;
        let values = write_steps(&values, &v, prev - base)?;
        // Attend over positions s..end: [B, K, end - s, hd].
        let s = first.max(base);
        let (k, v) = (
            keys.try_index((.., .., s - base..end - base, ..))?,
            values.try_index((.., .., s - base..end - base, ..))?,
        );
        *slot = Some(Slot { keys, values, base, end });
        attend_window(&q, &k, &v, prev, s, opts)
    }
}

/// `buf` [B, K, cap, hd] with `x` [B, K, n, hd] written at steps
/// `at..at + n`: one SliceUpdate (mlx-rs's `index_mut` adds two reshapes
/// of the update around it, four primitives per layer per decode step).
pub(crate) fn write_steps(buf: &Array, x: &Array, at: i32) -> Result<Array, PluginError> {
    if buf.ndim() != 4 || x.ndim() != 4 {
        return Err(PluginError::other(format!("KV write of {:?} into {:?}", x.shape(), buf.shape())));
    }
    let start = [0, 0, at, 0];
    let stop = [buf.dim(0), buf.dim(1), at + x.dim(2), buf.dim(3)];
    let strides = [1i32; 4];
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let stream = mlx_rs::Stream::thread_local_or_default();
        let rc = mlx_sys::mlx_slice_update(
            &mut res,
            buf.as_ptr(),
            x.as_ptr(),
            start.as_ptr(),
            4,
            stop.as_ptr(),
            4,
            strides.as_ptr(),
            4,
            stream.as_ptr(),
        );
        if rc != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(PluginError::other(format!("KV write of {:?} into {:?} at {at} failed", x.shape(), buf.shape())));
        }
        Ok(Array::from_ptr(res))
    }
}

impl KvCache {
    /// A SHARED layer's attention: q [B, H, L, hd] over what layer `src`
    /// holds after this forward's write, masked by this layer's `opts`.
    fn attend_shared(&self, layer: u32, src: usize, q: &Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
        let (prev, n, w) = (self.offset, q.dim(2), opts.window as i32);
        let end = prev + n;
        let slot = self.layers.get(src).and_then(Option::as_ref).filter(|s| s.end == end).ok_or_else(|| {
            PluginError::other(format!(
                "layer {layer} shares layer {src}'s K/V, which has not stored this forward's {n} tokens yet"
            ))
        })?;
        let first = if w > 0 { (prev + 1 - w).max(0) } else { 0 };
        let s = first.max(slot.base);
        let (k, v) = (
            slot.keys.try_index((.., .., s - slot.base..end - slot.base, ..))?,
            slot.values.try_index((.., .., s - slot.base..end - slot.base, ..))?,
        );
        attend_window(q, &k, &v, prev, s, opts)
    }
}

/// q [B, H, n, hd] at positions prev.. prev + n over keys and values
/// [B, K, end - s, hd] at positions s..end (end = prev + n), causal and
/// within `opts.window` (0: full) -> [B, H, n, hd].
fn attend_window(q: &Array, k: &Array, v: &Array, prev: i32, s: i32, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
    let (n, w) = (q.dim(2), opts.window as i32);
    let end = prev + n;
    let out = if !opts.is_plain() {
        // Soft-cap or sinks: the composed path, masked as below.
        let m = (n > 1).then(|| window_mask(prev, n, s, if w > 0 { w } else { end + 1 }));
        dense_attend(q, k, v, m.as_ref(), opts)?
    } else if n == 1 {
        // One query: every key from `s` on is inside its window.
        scaled_dot_product_attention(q, k, v, opts.scale, None, None)?
    } else if w == 0 || s >= end - w {
        // No key before the last query's window: causal masking (aligned
        // to the end of the keys) is exact.
        scaled_dot_product_attention(q, k, v, opts.scale, ScaledDotProductAttentionMask::Causal, None)?
    } else {
        let m = window_mask(prev, n, s, w); // bool [n, end - s]
        scaled_dot_product_attention(q, k, v, opts.scale, ScaledDotProductAttentionMask::Array(&m), None)?
    };
    Ok(out)
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

    /// SHARED layers (gemma4_text's last layers) store nothing and attend,
    /// with their own queries and window, over what their `shared_with`
    /// layer stored in the same forward; the k/v they pass are ignored.
    #[test]
    fn shared_layers_read_their_source_layer() {
        let lc = |kind, window, shared_with| LayerCache { kind, window, kv_heads: 2, head_dim: 8, shared_with };
        let layers = [
            lc(cache_kind::FULL, 0, 0),
            lc(cache_kind::WINDOW, 5, 0),
            lc(cache_kind::SHARED, 0, 0),
            lc(cache_kind::SHARED, 0, 1),
        ];
        let mut cache = KvCache::for_layers(4, &layers).unwrap();
        cache.step = 4;
        let mut hist: Vec<Option<(Array, Array)>> = vec![None, None];
        for n in [7, 1, 1, 9, 1, 3] {
            let r = |heads: i32, l: i32| random::normal::<f32>(&[1, heads, l, 8], None, None, None).unwrap();
            for (src, w) in [(0usize, 0u32), (1, 5)] {
                let (q, k, v) = (r(4, n), r(2, n), r(2, n));
                let opts = AttendOpts::plain(0.5).window(w);
                cache.attend(src as u32, q.clone(), k.clone(), v.clone(), &opts).unwrap();
                let h = match &hist[src] {
                    Some((hk, hv)) => (concatenate(&[hk, &k], 2).unwrap(), concatenate(&[hv, &v], 2).unwrap()),
                    None => (k, v),
                };
                hist[src] = Some(h);
            }
            for (layer, src, w) in [(2u32, 0usize, 0u32), (3, 1, 5)] {
                let q = r(4, n);
                let (empty_k, empty_v) = (r(2, 0), r(2, 0));
                let got = cache.attend(layer, q.clone(), empty_k, empty_v, &AttendOpts::plain(0.5).window(w)).unwrap();
                let (hk, hv) = hist[src].as_ref().unwrap();
                let d = max_diff(&got, &reference(&q, hk, hv, w));
                assert!(d < 1e-5, "layer {layer} over layer {src}: max diff {d}");
                assert!(cache.layers[layer as usize].is_none(), "a shared layer stores nothing");
            }
            cache.advance(n);
        }
        // Before its source has stored this forward's tokens: a clear error.
        let q = random::normal::<f32>(&[1, 4, 1, 8], None, None, None).unwrap();
        let e = cache.attend(2, q.clone(), q.clone(), q, &AttendOpts::plain(0.5)).unwrap_err();
        assert!(e.message.contains("shares layer 0"), "{}", e.message);
        // A layer shared with a later (or a shared) layer is refused.
        let bad = [lc(cache_kind::SHARED, 0, 1), lc(cache_kind::FULL, 0, 0)];
        assert!(KvCache::for_layers(2, &bad).is_err());
    }
}
