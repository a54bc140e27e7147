//! The KV store the compiled paged decode step traces through
//! (compiled_paged.rs): the pool's arrays, the block tables, the write slots
//! and the positions are all inputs of the trace, so nothing a step changes
//! is baked in.
use super::super::attend::{refuse_bidirectional, KvStore};
use super::super::kv_layout::LayerLayout;
use super::super::kv_pool::{KvPool, LayerArrays};
use super::super::paged::{attend_paged, encode_slots};
use anyhow::{bail, Result};
use mlx_rs::{
    ops::{arange, indexing::scatter_single},
    Array,
};
use rmlx_plugin_api::{
    author::kv::{LayerDims, Paged},
    PluginError,
};

/// The pool lent to one traced [B, 1] forward.
pub(super) struct TracedPool<'a> {
    /// The pool's families and layouts (its arrays are the trace's inputs).
    pool: &'a KvPool,
    /// int32 [B]: each row's tokens already cached (its new token's position).
    pos: Array,
    /// int32 [B, W]: each row's block ids (padding: the scratch block).
    tables: Array,
    /// int32 [B]: the slot each row's new token goes to.
    write: Array,
    /// Per layer, the key and value components ([slots, ...] each).
    layers: Vec<LayerArrays>,
    /// bool [B, 1, 1, W * block]: row b sees table positions 0..=pos[b].
    mask: Option<Array>,
}

impl<'a> TracedPool<'a> {
    /// `arrays`: per layer of `pool`, its key components then its value components.
    pub(super) fn new(pool: &'a KvPool, pos: Array, tables: Array, write: Array, arrays: Vec<Array>) -> Result<Self> {
        let mut it = arrays.into_iter();
        let mut layers = Vec::new();
        for l in pool.layouts() {
            let LayerLayout::Own { k, v } = l else { bail!("the compiled decode step takes layers that store their own K/V") };
            let kc: Vec<Array> = (&mut it).take(k.comps.len()).collect();
            let vc: Vec<Array> = (&mut it).take(v.comps.len()).collect();
            if kc.len() != k.comps.len() || vc.len() != v.comps.len() {
                bail!("too few pool arrays for the compiled decode step");
            }
            layers.push((kc, vc));
        }
        if it.next().is_some() {
            bail!("too many pool arrays for the compiled decode step");
        }
        Ok(Self { pool, pos, tables, write, layers, mask: None })
    }

    /// Every layer's components, written (inputs as they were for a layer
    /// the forward did not attend in).
    pub(super) fn into_layers(self) -> Vec<Array> {
        self.layers.into_iter().flat_map(|(k, v)| k.into_iter().chain(v)).collect()
    }

    fn mask(&mut self) -> Result<Array, PluginError> {
        if let Some(m) = &self.mask {
            return Ok(m.clone());
        }
        let (b, ctx) = (self.pos.dim(0), self.tables.dim(1) * self.pool.block_size as i32);
        let slots = arange::<_, i32>(0, ctx, None)?.reshape(&[1, ctx])?;
        let m = slots.le(&self.pos.reshape(&[b, 1])?)?.reshape(&[b, 1, 1, ctx])?;
        self.mask = Some(m.clone());
        Ok(m)
    }
}

impl KvStore for TracedPool<'_> {
    fn batch(&self) -> u32 {
        self.pos.dim(0) as u32
    }

    /// Unknown while tracing; architectures take positions from `offsets()`.
    fn offset(&self) -> i32 {
        0
    }

    fn offsets(&self) -> Array {
        self.pos.clone()
    }

    /// q: [B, H, 1, hd], k/v: [B, K, 1, hd] -> [B, H, 1, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &rmlx_plugin_api::author::AttendOpts<'_>) -> Result<Array, PluginError> {
        refuse_bidirectional(opts)?;
        if opts.window != 0 {
            return Err(PluginError::unsupported("the compiled paged decode step serves no sliding window"));
        }
        let b = self.pos.dim(0);
        if q.ndim() != 4 || q.dim(0) != b || q.dim(2) != 1 {
            return Err(PluginError::other(format!("the compiled decode step got q of shape {:?} for {b} rows of one token", q.shape())));
        }
        let l = layer as usize;
        let (ks, vs) = match self.pool.layout(l) {
            Some(LayerLayout::Own { k, v }) => (k, v),
            _ => return Err(PluginError::other(format!("layer {layer} stores no K/V of its own"))),
        };
        let fits = |x: &Array, d: &LayerDims| x.ndim() == 4 && x.dim(0) == b && x.dim(1) == d.kv_heads && x.dim(2) == 1 && x.dim(3) == d.head_dim;
        if !fits(&k, &ks.dims) || !fits(&v, &vs.dims) {
            return Err(PluginError::other(format!("attention got k {:?} and v {:?}: they do not fit the KV pool's layer {layer}", k.shape(), v.shape())));
        }
        // [B, K, 1, hd] is [B, K, hd] in memory -> components [B, ...] -> [B, 1, ...]: one update per slot.
        let encode = |side: &super::super::kv_pool::KvSide, shape: &super::super::kv_layout::SideShape, x: &Array| -> Result<Vec<Array>, PluginError> {
            encode_slots(side.codec_for(l), &side.family, shape, &x.reshape(&[b, x.dim(1), x.dim(3)])?)
        };
        let uk = encode(&self.pool.k, ks, &k)?;
        let uv = encode(&self.pool.v, vs, &v)?;
        let (pk, pv) = self.layers.get(l).ok_or_else(|| PluginError::other(format!("attention layer {layer} out of range")))?;
        let scatter = |pool: &[Array], upd: Vec<Array>| -> Result<Vec<Array>, PluginError> {
            pool.iter().zip(upd).map(|(p, u)| Ok(scatter_single(p, &self.write, u, 0)?)).collect()
        };
        let (pk, pv) = (scatter(pk, uk)?, scatter(pv, uv)?);
        let mask = self.mask()?;
        let bs = self.pool.block_size as i32;
        let paged = Paged { tables: &self.tables, block_size: bs, ctx: self.tables.dim(1) * bs, mask: Some(&mask), opts: *opts };
        let out = attend_paged(self.pool, l, &q, &pk, &pv, (&ks.dims, &vs.dims), &paged)?;
        self.layers[l] = (pk, pv);
        Ok(out)
    }
}
