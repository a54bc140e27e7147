//! KvCache capability: how K/V blocks are stored and attended.
//!
//! Declared in ABI 1 so plugins can advertise families in their manifest; the
//! engine's paged cache (a later milestone) calls it. The host's built-in
//! contiguous cache serves `fp16`/`bf16`/`f32` until then.
use abi_stable::{sabi_trait, std_types::RBox, StableAbi};

/// Storage layout of one KV block for a family.
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
