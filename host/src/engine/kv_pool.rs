//! The paged KV store: one pool of fixed-size blocks per layer, shared by
//! every sequence of a model, and `PagedForward`, the `Attention` one batched
//! forward sees.
//!
//! What a slot holds is the KV family's (plugin-api `kv_codec`): each side
//! (keys, values) has a codec that names its component arrays (the dense
//! family: the vectors as they are; `q4`: packed codes, scales and biases;
//! `turbo3`: codes and norms). Per layer and component the pool holds one
//! array `[capacity_blocks * block_size, ...shape]`; physical block `b` is
//! slots `b * block_size .. (b + 1) * block_size`, and a token at position
//! `p` of a sequence lives in slot `table[p / block_size] * block_size + p %
//! block_size`. The block manager hands out block ids; this file only stores.
//!
//! One attention call per layer for the whole batch: the new tokens' k/v are
//! encoded by the codecs and scattered into their slots (in place: the pool
//! arrays are only referenced by the scatter), then the family attends over
//! the pools read through the rows' block tables (rows padded to the longest;
//! padding reads block 0 and is masked) with a mask that is causal per row,
//! stops at each row's length, and applies the layer's sliding window when it
//! has one. Keys and values of one family: that family's `attend` (the dense
//! family: MLX's fused sdpa). Of two: the composed path (`scores`, softmax,
//! `mix`).
use mlx_rs::{
    ops::{
        concatenate,
        indexing::{scatter_single, TryIndexOp},
        zeros_dtype,
    },
    Array,
};
#[cfg(test)]
use mlx_rs::Dtype;
use rmlx_plugin_api::{
    author::kv::{composed_attend, AttendOpts, Component, KvCodecImpl, LayerDims, Paged},
    AttendOptions, Attention, PluginError,
};
use std::collections::HashMap;
use std::rc::Rc;

/// One side (keys or values) of a model's KV cache: the family's codec and
/// the layout it gives this model's layers.
#[derive(Clone)]
pub struct KvSide {
    /// The family's name, as users type it (`f16`, `q4`, `turbo3`, ...).
    pub family: String,
    pub codec: Rc<dyn KvCodecImpl>,
    pub dims: LayerDims,
    pub comps: Vec<Component>,
}

impl KvSide {
    pub fn new(family: &str, codec: Rc<dyn KvCodecImpl>, dims: LayerDims) -> Result<Self, PluginError> {
        let comps = codec.components(&dims);
        if comps.is_empty() {
            return Err(PluginError::other(format!("KV family `{family}` declares no component arrays")));
        }
        Ok(Self { family: family.into(), codec, dims, comps })
    }
    /// Bytes one slot takes in one layer.
    pub fn bytes_per_slot(&self) -> usize {
        self.comps.iter().map(Component::bytes_per_slot).sum()
    }
}

/// A block's data, as the SSD tier stores it: per layer, the keys'
/// components then the values', each `[block_size, ...shape]`.
pub type BlockData = Vec<Array>;

/// A model's KV blocks: per layer, the component arrays of keys and values.
pub struct KvPool {
    pub block_size: usize,
    /// The pool never grows past this many blocks (the KV budget).
    pub max_blocks: usize,
    pub k: KvSide,
    pub v: KvSide,
    layers: Vec<Option<(Vec<Array>, Vec<Array>)>>,
    /// Blocks every layer will hold once it is next touched (grown lazily).
    cap_blocks: usize,
}

impl KvPool {
    pub fn new(num_layers: usize, k: KvSide, v: KvSide, block_size: usize, max_blocks: usize) -> Self {
        Self { block_size, max_blocks, k, v, layers: vec![None; num_layers], cap_blocks: 0 }
    }

    /// Bytes one token takes over all layers, keys and values (what the
    /// arrays really hold per slot).
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len() * (self.k.bytes_per_slot() + self.v.bytes_per_slot())
    }

    /// The families' key in prefix-cache and SSD signatures.
    pub fn family_key(&self) -> String {
        family_key(&self.k, &self.v)
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
    /// `put` leaves the layer as it was (never recreated as zeros).
    fn layer(&mut self, l: usize) -> Result<&(Vec<Array>, Vec<Array>), PluginError> {
        let slots = (self.cap_blocks * self.block_size) as i32;
        let (kc, vc) = (&self.k.comps, &self.v.comps);
        let slot = self
            .layers
            .get_mut(l)
            .ok_or_else(|| PluginError::other(format!("attention layer {l} out of range")))?;
        let zeros = |c: &Component, n: i32| {
            let mut shape = vec![n];
            shape.extend(&c.shape);
            zeros_dtype(&shape, c.dtype)
        };
        let grow = |have: &[Array], comps: &[Component]| -> Result<Vec<Array>, PluginError> {
            have.iter()
                .zip(comps)
                .map(|(a, c)| Ok(concatenate(&[a.clone(), zeros(c, slots - a.dim(0))?], 0)?))
                .collect()
        };
        let grown = match slot.as_ref() {
            Some((k, _)) if k[0].dim(0) >= slots => None,
            Some((k, v)) => Some((grow(k, kc)?, grow(v, vc)?)),
            None => Some((
                kc.iter().map(|c| zeros(c, slots)).collect::<Result<Vec<_>, _>>()?,
                vc.iter().map(|c| zeros(c, slots)).collect::<Result<Vec<_>, _>>()?,
            )),
        };
        if let Some(kv) = grown {
            *slot = Some(kv);
        }
        Ok(slot.as_ref().expect("the layer was just set"))
    }

    /// Stores layer `l`'s new arrays (computed from `layer`'s).
    fn put(&mut self, l: usize, kv: (Vec<Array>, Vec<Array>)) {
        self.layers[l] = Some(kv);
    }

    /// Copies of block `b`'s data (lazy; the SSD tier evaluates them at once).
    pub fn read_block(&self, b: u32) -> anyhow::Result<BlockData> {
        let (s, e) = ((b as usize * self.block_size) as i32, ((b as usize + 1) * self.block_size) as i32);
        let mut out = Vec::new();
        for l in &self.layers {
            let (k, v) = l.as_ref().ok_or_else(|| anyhow::anyhow!("KV pool layer is empty"))?;
            for x in k.iter().chain(v) {
                if x.dim(0) < e {
                    anyhow::bail!("KV block {b} is past the pool");
                }
                out.push(x.try_index(s..e)?);
            }
        }
        Ok(out)
    }

    /// Writes block `b` from a block's data (a block read back from the SSD tier).
    pub fn write_block(&mut self, b: u32, data: &[Array]) -> anyhow::Result<()> {
        let (nk, nv) = (self.k.comps.len(), self.v.comps.len());
        if data.len() != self.layers.len() * (nk + nv) {
            anyhow::bail!("a KV block has {} arrays, the pool {} per block", data.len(), self.layers.len() * (nk + nv));
        }
        self.reserve(b as usize);
        let idx = Array::from_slice(&self.slots_of(b), &[self.block_size as i32]);
        let (kc, vc) = (self.k.comps.clone(), self.v.comps.clone());
        for l in 0..self.layers.len() {
            let part = &data[l * (nk + nv)..(l + 1) * (nk + nv)];
            let (pk, pv) = self.layer(l)?;
            let upd = |pool: &[Array], comps: &[Component], xs: &[Array]| -> anyhow::Result<Vec<Array>> {
                pool.iter()
                    .zip(comps)
                    .zip(xs)
                    .map(|((p, c), x)| {
                        let mut shape = vec![x.dim(0), 1];
                        shape.extend(&c.shape);
                        Ok(scatter_single(p, &idx, x.as_dtype(c.dtype)?.reshape(&shape)?, 0)?)
                    })
                    .collect()
            };
            let new = (upd(pk, &kc, &part[..nk])?, upd(pv, &vc, &part[nk..])?);
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
        self.layers.iter().flatten().flat_map(|(k, v)| k.iter().chain(v)).collect()
    }
}

/// A float32 pool whose slots hold the vectors as they are (the dense
/// family, without its plugin), for tests.
#[cfg(test)]
pub(crate) fn test_pool(layers: usize, kv_heads: i32, head_dim: i32, block: usize, max_blocks: usize) -> KvPool {
    struct Plain;
    impl KvCodecImpl for Plain {
        fn components(&self, d: &LayerDims) -> Vec<Component> {
            vec![Component::new("x", Dtype::Float32, &[d.kv_heads, d.head_dim])]
        }
        fn encode(&self, x: &Array, _: &LayerDims) -> Result<Vec<Array>, PluginError> {
            Ok(vec![x.as_dtype(Dtype::Float32)?])
        }
        fn decode(&self, c: &[Array], d: &LayerDims) -> Result<Array, PluginError> {
            Ok(c[0].transpose_axes(&[0, 2, 1, 3])?.as_dtype(d.dtype)?)
        }
    }
    let dims = LayerDims { kv_heads, head_dim, dtype: Dtype::Float32 };
    let side = KvSide::new("f32", Rc::new(Plain), dims).unwrap();
    KvPool::new(layers, side.clone(), side, block, max_blocks)
}

/// `k` and `v`'s families as one key: `f16`, or `q8/turbo3` when they differ.
pub fn family_key(k: &KvSide, v: &KvSide) -> String {
    if k.family == v.family {
        k.family.clone()
    } else {
        format!("{}/{}", k.family, v.family)
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
    /// int32 [B, blocks]: per row, its table's first `blocks` entries, the
    /// blocks holding positions 0..ctx (padding: block 0). Gathering whole
    /// blocks takes one index per block, not one per token.
    tables: Array,
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
            tables: Array::from_slice(&gather, &[b, nblk as i32]),
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
        let (kd, vd) = (self.pool.k.dims, self.pool.v.dims);
        if kh != kd.kv_heads || hd != kd.head_dim || v.dim(0) != b || v.dim(1) != vd.kv_heads || v.dim(2) != l || v.dim(3) != vd.head_dim {
            return Err(PluginError::other(format!(
                "attention got k {:?} and v {:?}: they do not fit the KV pool ({} kv heads of {} dims)",
                k.shape(),
                v.shape(),
                kd.kv_heads,
                kd.head_dim
            )));
        }
        // [B, K, L, hd] -> [B*L, K, hd] -> components [B*L, ...] -> [B*L, 1, ...]: one update per slot.
        let encode = |side: &KvSide, x: &Array| -> Result<Vec<Array>, PluginError> {
            let x = x.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b * l, x.dim(1), x.dim(3)])?;
            let comps = side.codec.encode(&x, &side.dims)?;
            if comps.len() != side.comps.len() {
                return Err(PluginError::other(format!(
                    "KV family `{}` encoded {} arrays for {} components",
                    side.family,
                    comps.len(),
                    side.comps.len()
                )));
            }
            comps
                .into_iter()
                .zip(&side.comps)
                .map(|(a, c)| {
                    let mut shape = vec![b * l, 1];
                    shape.extend(&c.shape);
                    Ok(a.as_dtype(c.dtype)?.reshape(&shape)?)
                })
                .collect()
        };
        let (uk, uv) = (encode(&self.pool.k, &k)?, encode(&self.pool.v, &v)?);
        // The layer stays in the pool until the new arrays replace it: an
        // error here (a k/v that does not fit the pool) leaves it as it was.
        let (pk, pv) = self.pool.layer(layer as usize)?;
        let scatter = |pool: &[Array], upd: Vec<Array>| -> Result<Vec<Array>, PluginError> {
            pool.iter().zip(upd).map(|(p, u)| Ok(scatter_single(p, &self.write, u, 0)?)).collect()
        };
        let (pk, pv) = (scatter(pk, uk)?, scatter(pv, uv)?);
        self.pool.put(layer as usize, (pk.clone(), pv.clone()));
        let cut = self.exact.filter(|&e| e != self.ctx && opts.window == 0);
        let mask = self.mask(opts.window);
        let paged = Paged {
            tables: &self.tables,
            block_size: self.pool.block_size as i32,
            ctx: cut.unwrap_or(self.ctx) as i32,
            mask: mask.as_ref(),
            opts: AttendOpts::plain(opts.scale),
        };
        let (ks, vs) = (&self.pool.k, &self.pool.v);
        if ks.family == vs.family {
            ks.codec.attend(&q, &pk, &pv, &paged, &kd, &vd)
        } else {
            composed_attend(&*ks.codec, &*vs.codec, &q, &pk, &pv, &paged, &kd, &vd)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::attend::KvStore;
    use mlx_rs::{
        fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
        random,
    };

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
        let mut pool = test_pool(1, kh, hd, bs, 64);
        let tables = [vec![5u32, 1, 7, 2], vec![0u32, 6, 3, 4]];
        let prompt = [6i32, 9];
        let mut hist: Vec<(Array, Array)> = Vec::new();
        for window in [0u32, 3] {
            let mut pool_w = test_pool(1, kh, hd, bs, 64);
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
        close(&a[0], &b[0]);
        close(&a[1], &b[1]);
        assert_eq!(a[0].shape(), &[bs as i32, kh, hd]);
    }

    /// A write that fails in the middle of a forward (keys that do not fit
    /// the pool) leaves the layer's KV as it was, never zeros.
    #[test]
    fn a_failed_write_leaves_the_pool_as_it_was() {
        let (h, kh, hd, bs) = (4, 2, 8, 4);
        let r = |heads: i32, l: i32, d: i32| random::normal::<f32>(&[1, heads, l, d], None, None, None).unwrap();
        let mut pool = test_pool(1, kh, hd, bs, 16);
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
        close(&before[0], &after[0]);
        close(&before[1], &after[1]);
        // And the pool goes on: the next write lands beside the first.
        attend(&mut pool, &rows, &q, &k, &v, 0);
        let kept = pool.read_block(3).unwrap();
        let first = |x: &Array| x.try_index(0..2).unwrap();
        close(&first(&before[0]), &first(&kept[0]));
    }

    #[test]
    fn capacity_doubles_within_the_budget() {
        let mut p = test_pool(1, 1, 1, 4, 40);
        p.reserve(0);
        assert_eq!(p.capacity(), 16);
        p.reserve(16);
        assert_eq!(p.capacity(), 32);
        p.reserve(33);
        assert_eq!(p.capacity(), 40);
    }
}
