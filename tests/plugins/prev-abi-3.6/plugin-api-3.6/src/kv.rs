//! KvCache capability: how K/V blocks are stored, encoded and attended.
//!
//! 3.0 declared `KvFamily` (a layout only) and no plugin ever implemented it;
//! its root-module field stays for layout compatibility. ABI 3.2 adds the
//! real capability, [`KvCodec`], under the root module's `kv_codec` entry: a
//! codec for one side (keys or values) of the cache. The author-side trait
//! and the composed attention are in [`crate::author::kv`]; this file is what
//! crosses the boundary. Dtypes cross as MLX's `mlx_dtype` codes (u32).
use crate::{MlxArray, PResult};
use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RString, RVec},
    StableAbi,
};

/// Storage layout of one KV block for a family (3.0; superseded by
/// [`KvCodec::components`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct BlockLayout {
    /// Tokens per block.
    pub block_tokens: u32,
    /// Bytes per token per layer for K and V together.
    pub bytes_per_token: u32,
}

#[sabi_trait]
pub trait KvFamily: Send {
    /// Block layout for a layer with `kv_heads` heads of `head_dim`.
    fn layout(&self, kv_heads: u32, head_dim: u32) -> BlockLayout;
}

pub type KvFamilyBox = KvFamily_TO<'static, RBox<()>>;

/// One layer's keys or values as a codec sees them.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub struct KvDims {
    pub kv_heads: i32,
    pub head_dim: i32,
    /// The activation dtype (`mlx_dtype` code).
    pub dtype: u32,
}

/// One component array per token slot: `[slots, ...shape]` of `dtype`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct KvComponent {
    pub name: RString,
    /// `mlx_dtype` code.
    pub dtype: u32,
    pub shape: RVec<i32>,
}

/// One batch's paged attention (see `author::kv::Paged`).
#[repr(C)]
#[derive(StableAbi)]
pub struct KvPaged {
    /// int32 [B, nblk]
    pub tables: MlxArray,
    pub block_size: i32,
    pub ctx: i32,
    /// bool [B, 1, L, ctx], or none for plain causal.
    pub mask: ROption<MlxArray>,
    pub scale: f32,
    /// 0 for none.
    pub softcap: f32,
    /// float [H] attention-sink logits.
    pub sinks: ROption<MlxArray>,
}

/// A KV family's codec for one side of the cache (ABI 3.2).
#[sabi_trait]
pub trait KvCodec: Send + Sync {
    /// The component arrays of one slot.
    fn components(&self, dims: KvDims) -> PResult<RVec<KvComponent>>;
    /// x [N, K, D] -> per component [N, ...shape].
    fn encode(&self, x: MlxArray, dims: KvDims) -> PResult<RVec<MlxArray>>;
    /// Components [B, T, ...] -> [B, K, T, D].
    fn decode(&self, comps: RVec<MlxArray>, dims: KvDims) -> PResult<MlxArray>;
    /// q [B, H, L, D] against keys [B, T, ...] -> unscaled float32 scores [B, H, L, T].
    fn scores(&self, q: MlxArray, comps: RVec<MlxArray>, dims: KvDims) -> PResult<MlxArray>;
    /// p [B, H, L, T] against values [B, T, ...] -> [B, H, L, D].
    fn mix(&self, p: MlxArray, comps: RVec<MlxArray>, dims: KvDims) -> PResult<MlxArray>;
    /// Keys and values both of this family: q [B, H, L, D] over the pools
    /// (per component `[slots, ...]`) read through the tables -> [B, H, L, D].
    fn attend(
        &self,
        q: MlxArray,
        k_pools: RVec<MlxArray>,
        v_pools: RVec<MlxArray>,
        paged: &KvPaged,
        k_dims: KvDims,
        v_dims: KvDims,
    ) -> PResult<MlxArray>;
    /// ABI 3.3: the per-model calibration this family uses, by name
    /// (`mean`: a per-layer, per-head mean vector [K, D] of its side,
    /// which `rmlx kv-calibrate` fits), or empty when it needs none. A
    /// calibrated codec comes from the root module's `kv_codec_calibrated`.
    fn calibration(&self) -> RString {
        RString::new()
    }
}

pub type KvCodecBox = KvCodec_TO<'static, RBox<()>>;
