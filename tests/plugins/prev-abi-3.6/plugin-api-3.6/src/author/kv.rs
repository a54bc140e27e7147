//! The plain-Rust side of the KvFamily capability (ABI 3.2), for plugin authors.
//!
//! A KV family is a *codec* for one side of the cache (keys or values): it
//! names the component arrays one token slot holds (codes, scales, norms, ...),
//! encodes new k/v into them, and reads them back in attention. The host owns
//! everything else: which blocks a sequence has, block tables, the prefix
//! cache, the SSD tier (which stores the components as they are) and budgets.
//!
//! Pools: for each component, one array `[slots, ...shape]`, where physical
//! block `b` is slots `b * block_size .. (b + 1) * block_size`. A batch's rows
//! read their blocks through `tables` (int32 `[B, nblk]`).
//!
//! Attention with keys of family K and values of family V:
//! - `K == V`: `K::attend` (a family may fuse it; the default is composed);
//! - otherwise [`composed_attend`]: `K::scores`, then soft-cap, mask, sinks and
//!   softmax (here, once for every family), then `V::mix`.
use super::Result;
use crate::PluginError;
use mlx_rs::{
    ops::{
        concatenate,
        indexing::{take_axis, TryIndexOp},
        matmul, maximum, softmax_axis, tanh,
    },
    Array, Dtype,
};

/// What a family needs to know about one layer's K or V.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerDims {
    /// KV heads of the layer.
    pub kv_heads: i32,
    /// Dimension of one head's key (or value) vector.
    pub head_dim: i32,
    /// The model's activation dtype (what `encode` receives and `decode` returns).
    pub dtype: Dtype,
}

/// One component array of a slot: `[slots, ...shape]` of `dtype` in the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub name: String,
    pub dtype: Dtype,
    /// Per-slot shape, e.g. `[kv_heads, head_dim / 2]` for packed 4-bit codes.
    pub shape: Vec<i32>,
}

impl Component {
    pub fn new(name: &str, dtype: Dtype, shape: &[i32]) -> Self {
        Self { name: name.into(), dtype, shape: shape.to_vec() }
    }
    /// Bytes one slot of this component takes.
    pub fn bytes_per_slot(&self) -> usize {
        self.shape.iter().map(|&d| d.max(0) as usize).product::<usize>() * dtype_bytes(self.dtype)
    }
}

/// Bytes of one element of `dtype`.
pub fn dtype_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Bool | Dtype::Uint8 | Dtype::Int8 => 1,
        Dtype::Uint16 | Dtype::Int16 | Dtype::Float16 | Dtype::Bfloat16 => 2,
        Dtype::Uint32 | Dtype::Int32 | Dtype::Float32 => 4,
        Dtype::Uint64 | Dtype::Int64 | Dtype::Float64 | Dtype::Complex64 => 8,
    }
}

/// One batch's attention over paged pools.
pub struct Paged<'a> {
    /// int32 [B, nblk]: row b's block ids for positions 0..ctx (padding: any
    /// valid block id; the mask hides it).
    pub tables: &'a Array,
    pub block_size: i32,
    /// Positions gathered per row (<= nblk * block_size).
    pub ctx: i32,
    /// bool [B, 1, L, ctx]: which positions each query sees. None: plain
    /// causal over the last L positions when L > 1, all of them when L = 1.
    pub mask: Option<&'a Array>,
    pub opts: AttendOpts<'a>,
}

pub use super::AttendOpts;

/// A KV family: the codec of one side (keys or values) of the cache.
pub trait KvCodecImpl: Send + Sync + 'static {
    /// Storage bits per cached value (for `rmlx plugins`): all components'
    /// bits over `kv_heads * head_dim` values.
    fn bits_per_value(&self, dims: &LayerDims) -> f32 {
        let bytes: usize = self.components(dims).iter().map(Component::bytes_per_slot).sum();
        (bytes * 8) as f32 / (dims.kv_heads * dims.head_dim).max(1) as f32
    }
    /// Whether this family can store a layer of `dims` (e.g. affine needs a
    /// head_dim that its group size divides): the boundary's `components`
    /// calls it first, so the host refuses an unsupported layer at load, not
    /// at the first encode. The default accepts every layer.
    fn check(&self, dims: &LayerDims) -> Result<()> {
        let _ = dims;
        Ok(())
    }
    /// The component arrays of one slot (for dims that `check` accepts).
    fn components(&self, dims: &LayerDims) -> Vec<Component>;
    /// `x` [N, K, D] -> one array per component, [N, ...shape].
    fn encode(&self, x: &Array, dims: &LayerDims) -> Result<Vec<Array>>;
    /// Components [B, T, ...shape] -> [B, K, T, D] in `dims.dtype` (the
    /// reference path, and the default `scores`/`mix`).
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array>;
    /// Keys side: `q` [B, H, L, D] (H a multiple of K) against gathered keys
    /// [B, T, ...] -> unscaled scores [B, H, L, T], float32.
    fn scores(&self, q: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let k = self.decode(comps, dims)?; // [B, K, T, D]
        gqa_matmul(q, &k.transpose_axes(&[0, 1, 3, 2])?)
    }
    /// Values side: probabilities `p` [B, H, L, T] -> [B, H, L, D].
    fn mix(&self, p: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let v = self.decode(comps, dims)?; // [B, K, T, D]
        gqa_matmul(p, &v)
    }
    /// Attention when keys and values are both of this family, reading the
    /// pools through the tables. The default is [`composed_attend`]; a
    /// family may fuse it (a kernel, or MLX's fused sdpa).
    fn attend(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Array> {
        composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
    }
    /// The per-model calibration this family uses (ABI 3.3): `Some("mean")`
    /// for a per-layer, per-head mean vector of its side, which the codec
    /// subtracts before encoding and adds back exactly in `decode`, `scores`
    /// (`q·μ`) and `mix` (`Σp·μ`): the compressed part is what differs from
    /// the mean, which is where the rotation families lose little. None
    /// (the default): the family needs no calibration.
    fn calibration(&self) -> Option<String> {
        None
    }
}

/// `codec` calibrated with `data` (what its `calibration` names).
pub fn calibrated(codec: Box<dyn KvCodecImpl>, mut data: super::Tensors) -> Result<Box<dyn KvCodecImpl>> {
    match codec.calibration().as_deref() {
        Some("mean") => {
            let mean = data.take("mean")?.as_dtype(Dtype::Float32)?; // [K, D]
            if mean.ndim() != 2 {
                return Err(PluginError::config(format!("{}mean: expected [kv_heads, head_dim], got {:?}", data.prefix, mean.shape())));
            }
            mean.eval()?;
            let (k, d) = (mean.dim(0), mean.dim(1));
            Ok(Box::new(Centered { inner: codec, mean: mean.as_slice::<f32>().to_vec(), k, d }))
        }
        Some(other) => Err(PluginError::unsupported(format!("unknown KV calibration `{other}`"))),
        None => Err(PluginError::unsupported("this KV family needs no calibration")),
    }
}

/// A codec over `x - mean` with the mean added back exactly (see
/// [`KvCodecImpl::calibration`]).
pub struct Centered {
    inner: Box<dyn KvCodecImpl>,
    /// float32 [K, D], row-major (host memory: codecs are `Sync`, arrays are not).
    mean: Vec<f32>,
    k: i32,
    d: i32,
}

impl Centered {
    fn check_dims(&self, dims: &LayerDims) -> Result<()> {
        if (self.k, self.d) != (dims.kv_heads, dims.head_dim) {
            return Err(PluginError::config(format!(
                "calibration mean is [{}, {}], the layer has [{}, {}]: recalibrate (`rmlx kv-calibrate`)",
                self.k,
                self.d,
                dims.kv_heads,
                dims.head_dim
            )));
        }
        Ok(())
    }
    /// [1, K, 1, D]
    fn mean4(&self) -> Result<Array> {
        Ok(Array::from_slice(&self.mean, &[1, self.k, 1, self.d]))
    }
}

impl KvCodecImpl for Centered {
    fn bits_per_value(&self, dims: &LayerDims) -> f32 {
        self.inner.bits_per_value(dims)
    }
    fn check(&self, dims: &LayerDims) -> Result<()> {
        self.check_dims(dims)?;
        self.inner.check(dims)
    }
    fn components(&self, dims: &LayerDims) -> Vec<Component> {
        self.inner.components(dims)
    }
    /// x [N, K, D] -> the inner codec's components of x - mean.
    fn encode(&self, x: &Array, dims: &LayerDims) -> Result<Vec<Array>> {
        self.check_dims(dims)?;
        let mean = Array::from_slice(&self.mean, &[self.k, self.d]);
        let c = x.as_dtype(Dtype::Float32)?.subtract(&mean)?.as_dtype(x.dtype())?;
        self.inner.encode(&c, dims)
    }
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let x = self.inner.decode(comps, dims)?; // [B, K, T, D]
        Ok(x.as_dtype(Dtype::Float32)?.add(self.mean4()?)?.as_dtype(dims.dtype)?)
    }
    /// q·(k̂ + μ) = q·k̂ + q·μ: [B, H, L, T] + [B, H, L, 1]
    fn scores(&self, q: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let s = self.inner.scores(q, comps, dims)?;
        let qm = gqa_matmul(&q.as_dtype(Dtype::Float32)?, &self.mean4()?.swap_axes(-1, -2)?)?; // [B, H, L, 1]
        Ok(s.as_dtype(Dtype::Float32)?.add(qm)?)
    }
    /// Σp(v̂ + μ) = Σp·v̂ + (Σp)·μ: [B, H, L, D] + [B, H, L, 1] x [K, 1, D]
    fn mix(&self, p: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let o = self.inner.mix(p, comps, dims)?;
        let mass = p.as_dtype(Dtype::Float32)?.sum_axis(-1, true)?; // [B, H, L, 1]
        let add = gqa_matmul(&mass, &self.mean4()?)?; // [B, H, L, D]
        Ok(o.as_dtype(Dtype::Float32)?.add(add)?.as_dtype(o.dtype())?)
    }
}

/// `a` [B, H, L, X] times `b` [B, K, X, Y] with H = g * K query heads per KV
/// head -> [B, H, L, Y], float32 accumulation in `a`'s dtype.
pub fn gqa_matmul(a: &Array, b: &Array) -> Result<Array> {
    let (bs, h, l, x) = (a.dim(0), a.dim(1), a.dim(2), a.dim(3));
    let kh = b.dim(1);
    if kh == 0 || h % kh != 0 {
        return Err(PluginError::other(format!("{h} query heads do not group over {kh} KV heads")));
    }
    let b = if b.dtype() != a.dtype() { b.as_dtype(a.dtype())? } else { b.clone() };
    // [B, K, g*L, X] @ [B, K, X, Y] -> [B, K, g*L, Y] -> [B, H, L, Y]
    let a = a.reshape(&[bs, kh, (h / kh) * l, x])?;
    let out = matmul(&a, &b)?;
    Ok(out.reshape(&[bs, h, l, out.dim(3)])?)
}

/// Each component pool `[slots, ...]` gathered through the tables into
/// `[B, ctx, ...]`: whole blocks, one index per block.
pub fn gather_blocks(pools: &[Array], paged: &Paged) -> Result<Vec<Array>> {
    let (b, nblk) = (paged.tables.dim(0), paged.tables.dim(1));
    let flat = paged.tables.reshape(&[b * nblk])?;
    pools
        .iter()
        .map(|p| {
            let rest: Vec<i32> = p.shape()[1..].to_vec();
            let per_slot: i32 = rest.iter().product();
            // [slots, ...] -> [blocks, block*per_slot] -> [B*nblk, ...] -> [B, nblk*block, ...]
            let blocks = p.reshape(&[p.dim(0) / paged.block_size, paged.block_size * per_slot])?;
            let mut shape = vec![b, nblk * paged.block_size];
            shape.extend(&rest);
            let x = take_axis(&blocks, &flat, 0)?.reshape(&shape)?;
            if paged.ctx == nblk * paged.block_size {
                Ok(x)
            } else {
                Ok(x.try_index((.., ..paged.ctx))?)
            }
        })
        .collect()
}

/// The composed attention every family falls back on: `k.scores`, scale,
/// soft-cap, mask, sinks, softmax (float32), `v.mix`.
#[allow(clippy::too_many_arguments)]
pub fn composed_attend<K: KvCodecImpl + ?Sized, V: KvCodecImpl + ?Sized>(
    k: &K,
    v: &V,
    q: &Array,
    k_pools: &[Array],
    v_pools: &[Array],
    paged: &Paged,
    k_dims: &LayerDims,
    v_dims: &LayerDims,
) -> Result<Array> {
    let kc = gather_blocks(k_pools, paged)?;
    let s = k.scores(q, &kc, k_dims)?.as_dtype(Dtype::Float32)?; // [B, H, L, T]
    let p = softmax_scores(&s, paged.mask, &paged.opts)?;
    let vc = gather_blocks(v_pools, paged)?;
    let out = v.mix(&p.as_dtype(q.dtype())?, &vc, v_dims)?; // [B, H, L, D]
    Ok(out.as_dtype(q.dtype())?)
}

/// Dense attention composed of ops, for every option: q [B, H, L, D] over
/// k/v [B, K, T, D] -> [B, H, L, D]. `mask` as in [`softmax_scores`].
pub fn dense_attend(q: &Array, k: &Array, v: &Array, mask: Option<&Array>, opts: &AttendOpts) -> Result<Array> {
    let kt = k.swap_axes(-1, -2)?; // [B, K, D, T]
    let s = gqa_matmul(&q.as_dtype(Dtype::Float32)?, &kt)?; // [B, H, L, T]
    let p = softmax_scores(&s, mask, opts)?;
    Ok(gqa_matmul(&p, &v.as_dtype(Dtype::Float32)?)?.as_dtype(q.dtype())?) // [B, H, L, D]
}

/// Unscaled float32 scores [B, H, L, T] -> probabilities [B, H, L, T]: scale,
/// soft-cap, mask, sinks, softmax. `mask` (bool, broadcast to [B, H, L, T]):
/// which keys each query sees; None: causal over the last L positions when
/// `opts.causal` and L > 1, else every key.
pub fn softmax_scores(s: &Array, mask: Option<&Array>, o: &AttendOpts) -> Result<Array> {
    let mut s = s.multiply(Array::from_f32(o.scale))?;
    if o.softcap > 0.0 {
        let c = Array::from_f32(o.softcap);
        s = tanh(&s.divide(&c)?)?.multiply(&c)?;
    }
    let (l, t) = (s.dim(2), s.dim(3));
    let neg = Array::from_f32(f32::NEG_INFINITY);
    s = match mask {
        Some(m) => mlx_rs::ops::select(m, &s, &neg)?,
        None if l > 1 && o.causal => {
            // query i (position t - l + i) sees j <= t - l + i
            let qi = Array::from_iter(0..l, &[l, 1]).add(Array::from_int(t - l))?;
            let kj = Array::from_iter(0..t, &[1, t]);
            mlx_rs::ops::select(&kj.le(&qi)?, &s, &neg)?
        }
        None => s,
    };
    match o.sinks {
        None => Ok(softmax_axis(&s, -1, true)?),
        Some(sinks) => {
            // An extra column per head: [H] -> [B, H, L, 1], softmax, drop it.
            let (b, h) = (s.dim(0), s.dim(1));
            let col = mlx_rs::ops::broadcast_to(
                sinks.as_dtype(Dtype::Float32)?.reshape(&[1, h, 1, 1])?,
                &[b, h, l, 1],
            )?;
            let p = softmax_axis(&concatenate(&[s, col], -1)?, -1, true)?;
            Ok(p.take_axis(&Array::from_iter(0..t, &[t]), -1)?)
        }
    }
}

/// Max absolute difference between two arrays (float32), for tests.
pub fn max_abs_diff(a: &Array, b: &Array) -> Result<f32> {
    let d = a.as_dtype(Dtype::Float32)?.subtract(b.as_dtype(Dtype::Float32)?)?.abs()?;
    let m = maximum(d.max(None)?, Array::from_f32(0.0))?;
    Ok(m.item_exact::<f32>())
}

// ---- the boundary: plain Rust <-> KvCodec trait objects ----

use crate::kv::{KvCodec, KvCodecBox, KvCodec_TO, KvComponent, KvDims, KvPaged};
use crate::{MlxArray, PResult};
use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RNone, ROption, RSome, RVec},
};

impl From<LayerDims> for KvDims {
    fn from(d: LayerDims) -> Self {
        Self { kv_heads: d.kv_heads, head_dim: d.head_dim, dtype: d.dtype.into() }
    }
}

impl TryFrom<KvDims> for LayerDims {
    type Error = PluginError;
    fn try_from(d: KvDims) -> Result<Self> {
        Ok(Self { kv_heads: d.kv_heads, head_dim: d.head_dim, dtype: dtype_of(d.dtype)? })
    }
}

fn dtype_of(code: u32) -> Result<Dtype> {
    Dtype::try_from(code).map_err(|_| PluginError::other(format!("unknown mlx dtype code {code}")))
}

fn arrays(v: RVec<MlxArray>) -> Vec<Array> {
    v.into_iter().map(MlxArray::into_array).collect()
}

fn handles(v: &[Array]) -> RVec<MlxArray> {
    v.iter().map(MlxArray::from_ref).collect()
}

fn opt(a: &ROption<MlxArray>) -> Option<Array> {
    match a {
        RSome(x) => Some(x.to_array()),
        RNone => None,
    }
}

struct CodecAdapter(Box<dyn KvCodecImpl>);

impl KvCodec for CodecAdapter {
    fn calibration(&self) -> abi_stable::std_types::RString {
        self.0.calibration().unwrap_or_default().into()
    }
    fn components(&self, dims: KvDims) -> PResult<RVec<KvComponent>> {
        super::guard(|| {
            let d = LayerDims::try_from(dims)?;
            self.0.check(&d)?;
            Ok(self
                .0
                .components(&d)
                .into_iter()
                .map(|c| KvComponent { name: c.name.into(), dtype: c.dtype.into(), shape: c.shape.into() })
                .collect())
        })
    }
    fn encode(&self, x: MlxArray, dims: KvDims) -> PResult<RVec<MlxArray>> {
        super::guard(|| {
            let out = self.0.encode(&x.into_array(), &LayerDims::try_from(dims)?)?;
            Ok(out.into_iter().map(MlxArray::from_array).collect())
        })
    }
    fn decode(&self, comps: RVec<MlxArray>, dims: KvDims) -> PResult<MlxArray> {
        super::guard(|| Ok(MlxArray::from_array(self.0.decode(&arrays(comps), &LayerDims::try_from(dims)?)?)))
    }
    fn scores(&self, q: MlxArray, comps: RVec<MlxArray>, dims: KvDims) -> PResult<MlxArray> {
        super::guard(|| {
            let s = self.0.scores(&q.into_array(), &arrays(comps), &LayerDims::try_from(dims)?)?;
            Ok(MlxArray::from_array(s))
        })
    }
    fn mix(&self, p: MlxArray, comps: RVec<MlxArray>, dims: KvDims) -> PResult<MlxArray> {
        super::guard(|| {
            let o = self.0.mix(&p.into_array(), &arrays(comps), &LayerDims::try_from(dims)?)?;
            Ok(MlxArray::from_array(o))
        })
    }
    fn attend(
        &self,
        q: MlxArray,
        k_pools: RVec<MlxArray>,
        v_pools: RVec<MlxArray>,
        paged: &KvPaged,
        k_dims: KvDims,
        v_dims: KvDims,
    ) -> PResult<MlxArray> {
        super::guard(|| {
            let (tables, mask, sinks) = (paged.tables.to_array(), opt(&paged.mask), opt(&paged.sinks));
            let p = Paged {
                tables: &tables,
                block_size: paged.block_size,
                ctx: paged.ctx,
                mask: mask.as_ref(),
                opts: AttendOpts::plain(paged.scale).softcap(paged.softcap).sinks(sinks.as_ref()),
            };
            let out = self.0.attend(
                &q.into_array(),
                &arrays(k_pools),
                &arrays(v_pools),
                &p,
                &LayerDims::try_from(k_dims)?,
                &LayerDims::try_from(v_dims)?,
            )?;
            Ok(MlxArray::from_array(out))
        })
    }
}

/// Wraps a plain-Rust codec as the boundary's trait object.
pub fn codec_box(codec: Box<dyn KvCodecImpl>) -> KvCodecBox {
    KvCodec_TO::from_value(CodecAdapter(codec), TD_Opaque)
}

fn into<T>(r: PResult<T>) -> Result<T> {
    r.into_result()
}

/// A codec on the far side of the boundary, usable as a plain-Rust codec
/// (the host holds these: `composed_attend(&remote_k, &remote_v, ...)`).
pub struct RemoteCodec(pub KvCodecBox);

impl KvCodecImpl for RemoteCodec {
    fn calibration(&self) -> Option<String> {
        Some(self.0.calibration().into_string()).filter(|c| !c.is_empty())
    }
    fn components(&self, dims: &LayerDims) -> Vec<Component> {
        // A codec that cannot describe its layout serves nothing; the host
        // asks once at load (`try_components`) and refuses it there.
        self.try_components(dims).unwrap_or_default()
    }
    fn encode(&self, x: &Array, dims: &LayerDims) -> Result<Vec<Array>> {
        into(self.0.encode(MlxArray::from_ref(x), (*dims).into())).map(arrays)
    }
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        into(self.0.decode(handles(comps), (*dims).into())).map(MlxArray::into_array)
    }
    fn scores(&self, q: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        into(self.0.scores(MlxArray::from_ref(q), handles(comps), (*dims).into())).map(MlxArray::into_array)
    }
    fn mix(&self, p: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        into(self.0.mix(MlxArray::from_ref(p), handles(comps), (*dims).into())).map(MlxArray::into_array)
    }
    fn attend(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Array> {
        let p = KvPaged {
            tables: MlxArray::from_ref(paged.tables),
            block_size: paged.block_size,
            ctx: paged.ctx,
            mask: paged.mask.map(MlxArray::from_ref).into(),
            scale: paged.opts.scale,
            softcap: paged.opts.softcap,
            sinks: paged.opts.sinks.map(MlxArray::from_ref).into(),
        };
        into(self.0.attend(
            MlxArray::from_ref(q),
            handles(k_pools),
            handles(v_pools),
            &p,
            (*k_dims).into(),
            (*v_dims).into(),
        ))
        .map(MlxArray::into_array)
    }
}

impl RemoteCodec {
    /// The codec's components, or its error.
    pub fn try_components(&self, dims: &LayerDims) -> Result<Vec<Component>> {
        let cs = into(self.0.components((*dims).into()))?;
        cs.into_iter()
            .map(|c| Ok(Component { name: c.name.into_string(), dtype: dtype_of(c.dtype)?, shape: c.shape.into_vec() }))
            .collect()
    }
}
