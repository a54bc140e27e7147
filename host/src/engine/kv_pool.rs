//! The paged KV store: one pool of fixed-size blocks per layer, shared by
//! every sequence of a model, and `PagedForward`, the `Attention` one batched
//! forward sees.
//!
//! Layout (docs/KV_CACHE.md): per layer, keys and values are each one array
//! `[capacity_blocks * block_size, kv_heads, head_dim]`; physical block `b`
//! is slots `b * block_size .. (b + 1) * block_size`, and a token at position
//! `p` of a sequence lives in slot `table[p / block_size] * block_size + p %
//! block_size`. The block manager hands out block ids; this file only stores.
//!
//! One attention call per layer for the whole batch: the new tokens' k/v are
//! scattered into their slots (in place: the pool array is only referenced by
//! the scatter), every row's context is gathered through its block table into
//! `[B, kv_heads, L_ctx, head_dim]` (rows padded to the longest; padding
//! reads slot 0 and is masked), then one `scaled_dot_product_attention` with
//! a mask that is causal per row, stops at each row's length, and applies the
//! layer's sliding window when it has one.
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{
        concatenate,
        indexing::{scatter_single, take_axis, TryIndexOp},
        zeros_dtype,
    },
    Array, Dtype,
};
use rmlx_plugin_api::{AttendOptions, Attention, PluginError};
use std::collections::HashMap;

/// A model's KV blocks: per layer (keys, values) `[slots, kv_heads, hd]`.
pub struct KvPool {
    pub block_size: usize,
    /// The pool never grows past this many blocks (the KV budget).
    pub max_blocks: usize,
    kv_heads: i32,
    head_dim: i32,
    layers: Vec<Option<(Array, Array)>>,
    /// Blocks every layer will hold once it is next touched (grown lazily).
    cap_blocks: usize,
    dtype: Option<Dtype>,
}

impl KvPool {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        max_blocks: usize,
    ) -> Self {
        Self {
            block_size,
            max_blocks,
            kv_heads: kv_heads as i32,
            head_dim: head_dim as i32,
            layers: vec![None; num_layers],
            cap_blocks: 0,
            dtype: None,
        }
    }

    /// Blocks the arrays hold (or will, once touched).
    pub fn capacity(&self) -> usize {
        self.cap_blocks
    }

    /// Makes block ids up to `max_id` addressable: capacity doubles (at least
    /// 16 blocks), never past `max_blocks`. The arrays grow when next touched.
    pub fn reserve(&mut self, max_id: usize) {
        if max_id < self.cap_blocks {
            return;
        }
        self.cap_blocks = (max_id + 1)
            .max(self.cap_blocks * 2)
            .max(16)
            .min(self.max_blocks.max(max_id + 1));
    }

    /// Layer `l`'s arrays, grown to the capacity (created at the first
    /// touch). They stay in the pool: the caller computes new arrays from
    /// these and stores them with `put`, so an error or a panic before the
    /// `put` leaves the layer as it was (never recreated as zeros). The first
    /// dtype seen is the pool's.
    fn layer(&mut self, l: usize, dtype: Dtype) -> Result<&(Array, Array), PluginError> {
        let dtype = *self.dtype.get_or_insert(dtype);
        let slots = (self.cap_blocks * self.block_size) as i32;
        let (kh, hd) = (self.kv_heads, self.head_dim);
        let slot = self
            .layers
            .get_mut(l)
            .ok_or_else(|| PluginError::other(format!("attention layer {l} out of range")))?;
        let zeros = |n: i32| zeros_dtype(&[n, kh, hd], dtype);
        let grown = match slot.as_ref() {
            Some((k, _)) if k.dim(0) >= slots => None,
            Some((k, v)) => {
                let add = slots - k.dim(0);
                Some((
                    concatenate(&[k.clone(), zeros(add)?], 0)?,
                    concatenate(&[v.clone(), zeros(add)?], 0)?,
                ))
            }
            None => Some((zeros(slots)?, zeros(slots)?)),
        };
        if let Some(kv) = grown {
            *slot = Some(kv);
        }
        Ok(slot.as_ref().expect("the layer was just set"))
    }

    /// Stores layer `l`'s new arrays (computed from `layer`'s).
    fn put(&mut self, l: usize, kv: (Array, Array)) {
        self.layers[l] = Some(kv);
    }

    /// Copies of block `b`'s data, per layer (keys, values) `[1, kv_heads,
    /// block, hd]` (lazy; the SSD tier evaluates them at once).
    pub fn read_block(&self, b: u32) -> anyhow::Result<Vec<(Array, Array)>> {
        let (s, e) = (
            (b as usize * self.block_size) as i32,
            ((b as usize + 1) * self.block_size) as i32,
        );
        let mut out = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (k, v) = l
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("KV pool layer is empty"))?;
            if k.dim(0) < e {
                anyhow::bail!("KV block {b} is past the pool");
            }
            let one = |x: &Array| -> anyhow::Result<Array> {
                Ok(x.try_index((s..e, .., ..))?
                    .transpose_axes(&[1, 0, 2])?
                    .expand_dims_axes(&[0])?)
            };
            out.push((one(k)?, one(v)?));
        }
        Ok(out)
    }

    /// Writes block `b` from per-layer (keys, values) `[1, kv_heads, block,
    /// hd]` (a block read back from the SSD tier).
    pub fn write_block(&mut self, b: u32, kv: &[(Array, Array)]) -> anyhow::Result<()> {
        if kv.len() != self.layers.len() {
            anyhow::bail!(
                "a KV block has {} layers, the model {}",
                kv.len(),
                self.layers.len()
            );
        }
        self.reserve(b as usize);
        let idx = Array::from_slice(&self.slots_of(b), &[self.block_size as i32]);
        for (l, (k, v)) in kv.iter().enumerate() {
            let dt = *self.dtype.get_or_insert(k.dtype());
            let upd = |x: &Array| -> anyhow::Result<Array> {
                // [1, K, T, hd] -> [T, 1, K, hd]
                Ok(x.as_dtype(dt)?.transpose_axes(&[2, 0, 1, 3])?)
            };
            let (uk, uv) = (upd(k)?, upd(v)?);
            let (pk, pv) = self.layer(l, dt)?;
            let new = (scatter_single(pk, &idx, uk, 0)?, scatter_single(pv, &idx, uv, 0)?);
            self.put(l, new);
        }
        Ok(())
    }

    fn slots_of(&self, b: u32) -> Vec<i32> {
        let base = b as i32 * self.block_size as i32;
        (0..self.block_size as i32).map(|i| base + i).collect()
    }

    /// All layers' arrays, to evaluate after writes that no forward follows.
    pub fn arrays(&self) -> Vec<&Array> {
        self.layers
            .iter()
            .flatten()
            .flat_map(|(k, v)| [k, v])
            .collect()
    }
}

/// One row of a paged forward: its block table and the tokens already in it.
pub struct Row<'a> {
    pub table: &'a [u32],
    pub offset: usize,
}

/// The pool lent to one forward of `len` new tokens per row.
pub struct PagedForward<'a> {
    pool: &'a mut KvPool,
    offsets: Vec<i32>,
    len: usize,
    /// int32 [B * len]: the slots the new tokens go to (row-major).
    write: Array,
    /// int32 [B * blocks]: per row, its table's first `blocks` entries, the
    /// blocks holding positions 0..ctx (padding: block 0). Gathering whole
    /// blocks takes one index per block, not one per token.
    gather: Array,
    /// Positions gathered per row: the longest row's blocks x block size.
    ctx: usize,
    /// With one row: its exact context length (the gather is cut to it).
    exact: Option<usize>,
    /// Per window (0: full attention): the mask, None when causal or none is enough.
    masks: HashMap<u32, Option<Array>>,
}

impl<'a> PagedForward<'a> {
    /// Rows' tables must already cover `offset + len` tokens.
    pub fn new(pool: &'a mut KvPool, rows: &[Row], len: usize) -> anyhow::Result<Self> {
        let bs = pool.block_size;
        let nblk = rows.iter().map(|r| (r.offset + len).div_ceil(bs)).max().unwrap_or(0);
        let ctx = nblk * bs;
        let slot = |t: &[u32], p: usize| (t[p / bs] as usize * bs + p % bs) as i32;
        let mut write = Vec::with_capacity(rows.len() * len);
        let mut gather = Vec::with_capacity(rows.len() * nblk);
        let mut max_id = 0;
        for r in rows {
            let end = r.offset + len;
            if r.table.len() * bs < end {
                anyhow::bail!(
                    "a block table holds {} tokens, the forward needs {end}",
                    r.table.len() * bs
                );
            }
            max_id = max_id.max(r.table.iter().copied().max().unwrap_or(0) as usize);
            write.extend((r.offset..end).map(|p| slot(r.table, p)));
            let own = end.div_ceil(bs);
            gather.extend(r.table[..own].iter().map(|&b| b as i32));
            gather.extend(std::iter::repeat(0).take(nblk - own));
        }
        pool.reserve(max_id);
        let b = rows.len() as i32;
        Ok(Self {
            pool,
            offsets: rows.iter().map(|r| r.offset as i32).collect(),
            len,
            write: Array::from_slice(&write, &[b * len as i32]),
            gather: Array::from_slice(&gather, &[b * nblk as i32]),
            ctx,
            exact: (rows.len() == 1).then(|| rows[0].offset + len),
            masks: HashMap::new(),
        })
    }

    pub fn attention(&mut self) -> Attention {
        super::attend::lend(self)
    }

    /// bool [B, 1, len, ctx]: query i of row b (position offset_b + i) sees
    /// positions j <= offset_b + i, and j > offset_b + i - window when windowed.
    /// None where plain causal masking (or none) is exact: one row, no window.
    fn mask(&mut self, window: u32) -> Option<Array> {
        let (len, ctx) = (self.len, self.ctx);
        let offsets = &self.offsets;
        self.masks
            .entry(window)
            .or_insert_with(|| {
                if offsets.len() == 1 && window == 0 {
                    return None; // the gather is cut to the row's length
                }
                let mut m = Vec::with_capacity(offsets.len() * len * ctx);
                for &o in offsets {
                    for i in 0..len {
                        let pos = o as usize + i;
                        m.extend(
                            (0..ctx)
                                .map(|j| j <= pos && (window == 0 || j + window as usize > pos)),
                        );
                    }
                }
                Some(Array::from_slice(
                    &m,
                    &[offsets.len() as i32, 1, len as i32, ctx as i32],
                ))
            })
            .clone()
    }
}

impl super::attend::KvStore for PagedForward<'_> {
    fn batch(&self) -> u32 {
        self.offsets.len() as u32
    }

    fn offset(&self) -> i32 {
        self.offsets.first().copied().unwrap_or(0)
    }

    fn offsets(&self) -> Array {
        Array::from_slice(&self.offsets, &[self.offsets.len() as i32])
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
        let (b, kh, l, hd) = (k.dim(0), k.dim(1), k.dim(2), k.dim(3));
        if b as usize != self.offsets.len() || l as usize != self.len {
            return Err(PluginError::other(format!(
                "attention got k of shape [{b}, {kh}, {l}, {hd}] for {} rows of {} tokens",
                self.offsets.len(),
                self.len
            )));
        }
        if kh != self.pool.kv_heads || hd != self.pool.head_dim || v.shape() != k.shape() {
            return Err(PluginError::other(format!(
                "attention got k {:?} and v {:?}: they do not fit the KV pool ({} kv heads of {} dims)",
                k.shape(),
                v.shape(),
                self.pool.kv_heads,
                self.pool.head_dim
            )));
        }
        let dt = *self.pool.dtype.get_or_insert(k.dtype());
        // [B, K, L, hd] -> [B*L, 1, K, hd]: one update per slot.
        let upd = |x: &Array| -> Result<Array, PluginError> {
            Ok(x.as_dtype(dt)?
                .transpose_axes(&[0, 2, 1, 3])?
                .reshape(&[b * l, 1, kh, hd])?)
        };
        let (uk, uv) = (upd(&k)?, upd(&v)?);
        // The layer stays in the pool until the new arrays replace it: an
        // error here (a k/v that does not fit the pool) leaves it as it was.
        let (pk, pv) = self.pool.layer(layer as usize, dt)?;
        let (pk, pv) = (scatter_single(pk, &self.write, uk, 0)?, scatter_single(pv, &self.write, uv, 0)?);
        self.pool.put(layer as usize, (pk.clone(), pv.clone()));
        // pool [blocks, block*K*hd] -> [B*nblk, block*K*hd] -> [B, K, ctx, hd]
        let (ctx, bs) = (self.ctx as i32, self.pool.block_size as i32);
        let cut = self.exact.filter(|&e| e != self.ctx && opts.window == 0);
        let gather = |p: &Array| -> Result<Array, PluginError> {
            let blocks = p.reshape(&[p.dim(0) / bs, bs * kh * hd])?;
            let x = take_axis(&blocks, &self.gather, 0)?.reshape(&[b, ctx, kh, hd])?.transpose_axes(&[0, 2, 1, 3])?;
            Ok(match cut {
                Some(e) => x.try_index((.., .., ..e as i32, ..))?,
                None => x,
            })
        };
        let (keys, values) = (gather(&pk)?, gather(&pv)?);
        let (keys, values) = if q.dtype() != dt {
            (keys.as_dtype(q.dtype())?, values.as_dtype(q.dtype())?)
        } else {
            (keys, values)
        };
        let out = match self.mask(opts.window) {
            Some(m) => scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                opts.scale,
                ScaledDotProductAttentionMask::Array(&m),
                None,
            )?,
            None => {
                let causal = (l > 1).then_some(ScaledDotProductAttentionMask::Causal);
                scaled_dot_product_attention(&q, &keys, &values, opts.scale, causal, None)?
            }
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::attend::KvStore;
    use mlx_rs::random;

    /// Reference: attention of one row over its contiguous k/v history.
    fn reference(q: &Array, k: &Array, v: &Array, window: u32) -> Array {
        let (l, lk) = (q.dim(2), k.dim(2));
        let mut m = Vec::new();
        for i in 0..l {
            let pos = (lk - l + i) as usize;
            m.extend(
                (0..lk as usize).map(|j| j <= pos && (window == 0 || j + window as usize > pos)),
            );
        }
        let m = Array::from_slice(&m, &[1, 1, l, lk]);
        scaled_dot_product_attention(q, k, v, 0.5, ScaledDotProductAttentionMask::Array(&m), None)
            .unwrap()
    }

    fn close(a: &Array, b: &Array) {
        let d = (a - b)
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_exact::<f32>();
        assert!(d < 1e-5, "max abs diff {d}");
    }

    /// One paged forward's attention (layer 0, scale 0.5) over `rows`.
    fn attend(pool: &mut KvPool, rows: &[Row], q: &Array, k: &Array, v: &Array, window: u32) -> Array {
        let mut f = PagedForward::new(pool, rows, k.dim(2) as usize).unwrap();
        f.attend(0, q.clone(), k.clone(), v.clone(), AttendOptions { scale: 0.5, window }).unwrap()
    }

    /// Two sequences with scattered, interleaved block tables: a prefill
    /// chunk each, then batched decode steps; every output equals attention
    /// over the row's own contiguous history, with and without a window.
    #[test]
    fn paged_batch_matches_contiguous_attention() {
        let (h, kh, hd, bs) = (4, 2, 8, 4);
        // Random q [b, H, l, hd], k and v [b, K, l, hd].
        let qkv = |b: i32, l: i32| {
            let r = |heads: i32| random::normal::<f32>(&[b, heads, l, hd], None, None, None).unwrap();
            (r(h), r(kh), r(kh))
        };
        let mut pool = KvPool::new(1, kh as usize, hd as usize, bs, 64);
        let tables = [vec![5u32, 1, 7, 2], vec![0u32, 6, 3, 4]];
        let prompt = [6i32, 9];
        let mut hist: Vec<(Array, Array)> = Vec::new();
        for window in [0u32, 3] {
            let mut pool_w = KvPool::new(1, kh as usize, hd as usize, bs, 64);
            let pool = if window == 0 { &mut pool } else { &mut pool_w };
            hist.clear();
            // prefill each row alone
            for (r, &n) in prompt.iter().enumerate() {
                let (q, k, v) = qkv(1, n);
                let rows = [Row {
                    table: &tables[r],
                    offset: 0,
                }];
                let out = attend(pool, &rows, &q, &k, &v, window);
                close(&out, &reference(&q, &k, &v, window));
                hist.push((k, v));
            }
            // batched decode steps
            for step in 0..4 {
                let (q, k, v) = qkv(2, 1);
                let rows: Vec<Row> = (0..2)
                    .map(|r| Row {
                        table: &tables[r],
                        offset: prompt[r] as usize + step,
                    })
                    .collect();
                let out = attend(pool, &rows, &q, &k, &v, window);
                for r in 0..2i32 {
                    let row = |x: &Array| x.try_index((r..r + 1, .., .., ..)).unwrap();
                    let (hk, hv) = &hist[r as usize];
                    let hk = concatenate(&[hk.clone(), row(&k)], 2).unwrap();
                    let hv = concatenate(&[hv.clone(), row(&v)], 2).unwrap();
                    close(&row(&out), &reference(&row(&q), &hk, &hv, window));
                    hist[r as usize] = (hk, hv);
                }
            }
        }
        // A block read back and written to another id holds the same data.
        let a = pool.read_block(1).unwrap();
        pool.write_block(9, &a).unwrap();
        let b = pool.read_block(9).unwrap();
        close(&a[0].0, &b[0].0);
        close(&a[0].1, &b[0].1);
        assert_eq!(a[0].0.shape(), &[1, kh, bs as i32, hd]);
    }

    /// A write that fails in the middle of a forward (keys that do not fit
    /// the pool) leaves the layer's KV as it was, never zeros.
    #[test]
    fn a_failed_write_leaves_the_pool_as_it_was() {
        let (h, kh, hd, bs) = (4, 2, 8, 4);
        let r = |heads: i32, l: i32, d: i32| random::normal::<f32>(&[1, heads, l, d], None, None, None).unwrap();
        let mut pool = KvPool::new(1, kh as usize, hd as usize, bs, 16);
        let table = vec![3u32];
        let (q, k, v) = (r(h, 2, hd), r(kh, 2, hd), r(kh, 2, hd));
        attend(&mut pool, &[Row { table: &table, offset: 0 }], &q, &k, &v, 0);
        let before = pool.read_block(3).unwrap();
        let rows = [Row { table: &table, offset: 2 }];
        let mut f = PagedForward::new(&mut pool, &rows, 2).unwrap();
        let bad = f.attend(0, q.clone(), r(kh, 2, hd / 2), r(kh, 2, hd / 2), AttendOptions { scale: 0.5, window: 0 });
        assert!(format!("{:?}", bad.err()).contains("do not fit the KV pool"));
        drop(f);
        let after = pool.read_block(3).unwrap();
        close(&before[0].0, &after[0].0);
        close(&before[0].1, &after[0].1);
        // And the pool goes on: the next write lands beside the first.
        attend(&mut pool, &rows, &q, &k, &v, 0);
        let kept = pool.read_block(3).unwrap();
        let first = |x: &Array| x.try_index((.., .., 0..2, ..)).unwrap();
        close(&first(&before[0].0), &first(&kept[0].0));
    }

    #[test]
    fn capacity_doubles_within_the_budget() {
        let mut p = KvPool::new(1, 1, 1, 4, 40);
        p.reserve(0);
        assert_eq!(p.capacity(), 16);
        p.reserve(16);
        assert_eq!(p.capacity(), 32);
        p.reserve(33);
        assert_eq!(p.capacity(), 40);
    }
}
