//! The paged KV store: one pool of fixed-size blocks per layer, shared by
//! every sequence of a lane (a model and its KV families); `paged.rs` lends
//! it to one batched forward.
//!
//! What a slot holds is the KV family's (plugin-api `kv_codec`): each side
//! (keys, values) has a codec that names its component arrays (the dense
//! family: the vectors as they are; `q4`: packed codes, scales and biases;
//! `turbo3`: codes and norms). Per layer and component the pool holds one
//! array `[capacity_blocks * block_size, ...shape]`; physical block `b` is
//! slots `b * block_size .. (b + 1) * block_size`, and a token at position
//! `p` of a sequence lives in slot `table[p / block_size] * block_size + p %
//! block_size`. The block manager hands out block ids; this file only stores.
//! What each layer stores (its own shape, another layer's K/V, nothing) is
//! its `kv_layout::LayerLayout`: per-layer head sizes, shared layers.
//! A lane's pool may split its layers in a full and a window group
//! (`kv_groups.rs`): window layers' arrays are then addressed by window
//! block ids (`WindowGroup::map` of the full block id) and hold only the
//! blocks some sequence's window still reads.
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
use super::kv_groups::{self, WindowGroup, NONE};
use super::kv_layout::{self, LayerLayout, SideShape};
use rmlx_plugin_api::{
    author::kv::{Component, KvCodecImpl, LayerDims},
    LayerCache, PluginError,
};
use std::rc::Rc;

/// One side (keys or values) of a model's KV cache: the family's codec and
/// the layout it gives this model's layers.
#[derive(Clone)]
pub struct KvSide {
    /// The family's name, as users type it (`f16`, `q4`, `turbo3`, ...).
    pub family: String,
    pub codec: Rc<dyn KvCodecImpl>,
    /// Per layer, when the family is calibrated (`rmlx kv-calibrate`):
    /// that layer's codec; empty: `codec` serves every layer.
    pub layer_codecs: Vec<Rc<dyn KvCodecImpl>>,
    /// The calibration file's content hash, when calibrated (it keys the
    /// prefix cache and the SSD tier: calibrated blocks differ).
    pub calibration: Option<u64>,
    pub dims: LayerDims,
    pub comps: Vec<Component>,
}

impl KvSide {
    pub fn new(family: &str, codec: Rc<dyn KvCodecImpl>, dims: LayerDims) -> Result<Self, PluginError> {
        let comps = codec.components(&dims);
        Self::with_components(family, codec, dims, comps)
    }
    /// With the components the codec declared (asked once, by the caller).
    pub fn with_components(
        family: &str,
        codec: Rc<dyn KvCodecImpl>,
        dims: LayerDims,
        comps: Vec<Component>,
    ) -> Result<Self, PluginError> {
        if comps.is_empty() {
            return Err(PluginError::other(format!("KV family `{family}` declares no component arrays")));
        }
        Ok(Self { family: family.into(), codec, layer_codecs: Vec::new(), calibration: None, dims, comps })
    }
    /// Layer `layer`'s codec.
    pub fn codec_for(&self, layer: usize) -> &dyn KvCodecImpl {
        match self.layer_codecs.get(layer) {
            Some(c) => &**c,
            None => &*self.codec,
        }
    }
    /// Bytes one slot takes in one layer.
    pub fn bytes_per_slot(&self) -> usize {
        self.comps.iter().map(Component::bytes_per_slot).sum()
    }
}

/// Bytes one token takes in `layers` layers with keys `k` and values `v`.
pub fn bytes_per_token(layers: usize, k: &KvSide, v: &KvSide) -> usize {
    layers * (k.bytes_per_slot() + v.bytes_per_slot())
}

/// One layer's arrays: its keys' components, then its values'.
pub type LayerArrays = (Vec<Array>, Vec<Array>);

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
    /// Per layer, what it stores (kv_layout.rs).
    layout: Vec<LayerLayout>,
    /// Blocks every layer will hold once it is next touched (grown lazily).
    cap_blocks: usize,
    /// Per layer, the window its attention uses (0: full); what the window
    /// group is planned from.
    windows: Vec<u32>,
    /// The window group, when the layers are split (`split_windows`).
    pub win: Option<WindowGroup>,
    /// Recurrent state: the last batched forward's, stacked (recurrent.rs).
    pub batch_state: Option<super::recurrent::BatchState>,
}

impl KvPool {
    /// Every layer storing its own K/V in the sides' shape.
    pub fn new(num_layers: usize, k: KvSide, v: KvSide, block_size: usize, max_blocks: usize) -> Self {
        let layout = kv_layout::uniform(num_layers, &k, &v);
        Self {
            block_size,
            max_blocks,
            k,
            v,
            layers: vec![None; num_layers],
            layout,
            cap_blocks: 0,
            windows: vec![0; num_layers],
            win: None,
            batch_state: None,
        }
    }

    /// The layers as a model declares them (`Model::layers`; empty: every
    /// layer its own, in the sides' shape): per-layer K/V heads and head
    /// sizes, SHARED layers storing nothing, state layers no K/V.
    pub fn with_layers(mut self, layers: &[LayerCache]) -> Result<Self, PluginError> {
        self.layout = kv_layout::for_layers(self.layers.len(), &self.k, &self.v, layers)?;
        Ok(self)
    }

    /// A pool for `model`'s layers (`with_layers` of its declared caches).
    pub fn for_model(model: &super::LoadedModel, k: KvSide, v: KvSide, block_size: usize, max_blocks: usize) -> anyhow::Result<Self> {
        let n = model.spec.num_layers as usize;
        let mut pool = Self::new(n, k, v, block_size, max_blocks)
            .with_layers(&model.cache_layers)
            .map_err(|e| anyhow::anyhow!("the paged KV pool of {}: {}", model.dir.model_type, e.message))?;
        // A declared WINDOW layer's own window, else the spec's per layer.
        pool.windows = (0..n)
            .map(|i| match model.cache_layers.get(i) {
                Some(l) if l.kind == rmlx_plugin_api::cache_kind::WINDOW || l.kind == rmlx_plugin_api::cache_kind::SHARED => l.window,
                Some(_) => 0,
                None => model.spec.sliding_window.get(i).copied().unwrap_or(0),
            })
            .collect();
        Ok(pool)
    }

    /// Per layer, the window its attention uses (tests).
    pub fn with_windows(mut self, windows: &[u32]) -> Self {
        self.windows = windows.to_vec();
        self
    }

    /// The ceiling on window blocks (the KV budget's, in window blocks).
    pub fn with_window_max(mut self, max: usize) -> Self {
        if let Some(w) = self.win.as_mut() {
            w.max = max;
        }
        self
    }

    /// Splits the layers in a full and a window group (`kv_groups::plan`;
    /// nothing when they do not split). Call before the first write; the
    /// block manager then maps window blocks (`WindowGroup::map`).
    pub fn split_windows(mut self) -> Self {
        if let Some((window, layers)) = kv_groups::plan(&self.layout, &self.windows) {
            self.win = Some(WindowGroup { window, layers, map: Vec::new(), cap: 0, max: self.max_blocks });
        }
        self
    }

    /// Whether layer `l` (or, SHARED, its source) is in the window group.
    pub fn in_window(&self, l: usize) -> bool {
        self.win.as_ref().is_some_and(|w| w.layers.get(l).copied().unwrap_or(false))
    }

    /// Bytes one token takes in the full group and in the window group
    /// (0 without a split): what a block of each costs.
    pub fn group_bytes_per_token(&self) -> (usize, usize) {
        let mut out = (0, 0);
        for (l, x) in self.layout.iter().enumerate() {
            if self.in_window(l) {
                out.1 += x.bytes_per_token();
            } else {
                out.0 += x.bytes_per_token();
            }
        }
        out
    }

    /// Every layer's layout.
    pub fn layouts(&self) -> &[LayerLayout] {
        &self.layout
    }

    /// Makes window block ids up to `max_id` addressable (as `reserve`).
    pub fn reserve_window(&mut self, max_id: usize) {
        if let Some(w) = self.win.as_mut() {
            if max_id >= w.cap {
                w.cap = (max_id + 1).max(w.cap * 2).max(16).min(w.max.max(max_id + 1));
            }
        }
    }

    /// Maps full block `b` to window block `w` ([`NONE`]: unmapped).
    pub fn set_window(&mut self, b: u32, w: u32) {
        if w != NONE {
            self.reserve_window(w as usize);
        }
        if let Some(g) = self.win.as_mut() {
            if g.map.len() <= b as usize {
                g.map.resize(b as usize + 1, NONE);
            }
            g.map[b as usize] = w;
        }
    }

    /// Whether block `b` has all its layers' data (a window block when split).
    pub fn whole(&self, b: u32) -> bool {
        self.win.as_ref().is_none_or(|w| w.of(b).is_some())
    }

    /// Where layer `l` keeps full block `b`: `b`, or its window block.
    fn physical(&self, l: usize, b: u32) -> anyhow::Result<u32> {
        if !self.in_window(l) {
            return Ok(b);
        }
        self.win
            .as_ref()
            .and_then(|w| w.of(b))
            .ok_or_else(|| anyhow::anyhow!("KV block {b} has no window-layer data (released)"))
    }

    /// The block ceiling (the KV budget's blocks, known once the block's
    /// bytes are).
    pub fn with_max_blocks(mut self, max_blocks: usize) -> Self {
        self.max_blocks = max_blocks;
        self
    }

    /// Bytes one token takes over all layers, keys and values (what the
    /// arrays really hold per slot; shared and state layers hold none).
    pub fn bytes_per_token(&self) -> usize {
        self.layout.iter().map(LayerLayout::bytes_per_token).sum()
    }

    /// What layer `l` stores.
    pub fn layout(&self, l: usize) -> Option<&LayerLayout> {
        self.layout.get(l)
    }

    /// Layer `l`'s shapes (keys, values) when it stores its own K/V.
    fn own(&self, l: usize) -> Option<(&SideShape, &SideShape)> {
        match self.layout.get(l)? {
            LayerLayout::Own { k, v } => Some((k, v)),
            _ => None,
        }
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
    pub(super) fn layer(&mut self, l: usize) -> Result<&(Vec<Array>, Vec<Array>), PluginError> {
        self.layer_with(l, 0)
    }

    /// [`KvPool::layer`] grown to the capacity plus `extra` blocks.
    fn layer_with(&mut self, l: usize, extra: usize) -> Result<&(Vec<Array>, Vec<Array>), PluginError> {
        let cap = match self.win.as_ref() {
            Some(w) if self.in_window(l) => w.cap,
            _ => self.cap_blocks,
        } + extra;
        let slots = (cap * self.block_size) as i32;
        let (kc, vc) = match self.layout.get(l) {
            Some(LayerLayout::Own { k, v }) => (&k.comps, &v.comps),
            _ => return Err(PluginError::other(format!("layer {l} stores no K/V of its own in the KV pool"))),
        };
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

    /// The compiled decode step's (compiled_paged.rs): every layer's arrays,
    /// grown to the capacity plus one scratch block, MOVED out of the pool,
    /// so that the step's graph holds the only reference and MLX writes
    /// them in place (a copy left here would make every step copy the
    /// whole pool). The caller puts them, or the step's new arrays, back
    /// with [`KvPool::put_all`]. Every layer must store its own K/V and the
    /// pool must not be split in window groups.
    pub(super) fn take_all(&mut self) -> Result<Vec<LayerArrays>, PluginError> {
        if self.win.is_some() || self.layout.iter().any(|l| !matches!(l, LayerLayout::Own { .. })) {
            return Err(PluginError::other("the compiled decode step takes pools whose layers all store their own K/V"));
        }
        for l in 0..self.layers.len() {
            self.layer_with(l, 1)?;
        }
        Ok(self.layers.iter_mut().map(|x| x.take().expect("the layer was just grown")).collect())
    }

    /// Puts every layer's arrays back (what [`KvPool::take_all`] took, or
    /// their successors).
    pub(super) fn put_all(&mut self, layers: Vec<LayerArrays>) {
        for (slot, kv) in self.layers.iter_mut().zip(layers) {
            *slot = Some(kv);
        }
    }

    /// The scratch block [`KvPool::take_all`] adds past the capacity: no
    /// sequence holds it (block ids stay below the capacity; when the
    /// capacity grows it becomes an ordinary block, written before it is
    /// read, and the scratch moves to the new end). The compiled step's
    /// padding rows write and read there. One block per layer beyond the
    /// budget's count, uncharged.
    pub(super) fn scratch_block(&self) -> u32 {
        self.cap_blocks as u32
    }

    /// Layer `l`'s arrays as they are (None before its first write).
    pub(super) fn stored(&self, l: usize) -> Option<&(Vec<Array>, Vec<Array>)> {
        self.layers.get(l)?.as_ref()
    }

    /// Stores layer `l`'s new arrays (computed from `layer`'s).
    pub(super) fn put(&mut self, l: usize, kv: (Vec<Array>, Vec<Array>)) {
        self.layers[l] = Some(kv);
    }

    /// Copies of block `b`'s data (lazy; the SSD tier evaluates them at once).
    pub fn read_block(&self, b: u32) -> anyhow::Result<BlockData> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate().filter(|(i, _)| self.own(*i).is_some()) {
            let p = self.physical(i, b)? as usize;
            let (s, e) = ((p * self.block_size) as i32, ((p + 1) * self.block_size) as i32);
            let (k, v) = l.as_ref().ok_or_else(|| anyhow::anyhow!("KV pool layer {i} is empty"))?;
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
        let own: Vec<(usize, Vec<Component>, Vec<Component>)> = (0..self.layers.len())
            .filter_map(|l| self.own(l).map(|(k, v)| (l, k.comps.clone(), v.comps.clone())))
            .collect();
        let want: usize = own.iter().map(|(_, k, v)| k.len() + v.len()).sum();
        if data.len() != want {
            anyhow::bail!("a KV block has {} arrays, the pool {want} per block", data.len());
        }
        self.reserve(b as usize);
        let mut at = 0;
        for (l, kc, vc) in own {
            let idx = Array::from_slice(&self.slots_of(self.physical(l, b)?), &[self.block_size as i32]);
            let (nk, nv) = (kc.len(), vc.len());
            let part = &data[at..at + nk + nv];
            at += nk + nv;
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
