//! Architecture: a model built from config.json and layers, and its forward pass.
use crate::{EmbeddingBox, LinearBox, MlxArray, PResult};
use abi_stable::{
    sabi_trait,
    sabi_types::RMut,
    std_types::{RBox, RStr, RVec},
    StableAbi,
};
use std::ffi::c_void;

/// What the engine needs to know to build a KV cache for the model.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub vocab_size: u32,
    pub hidden_size: u32,
    /// Maximum context (config's `max_position_embeddings`), 0 when unknown.
    pub max_context: u32,
    /// Per layer: attention window in tokens, 0 for full attention.
    pub sliding_window: RVec<u32>,
}

/// Per-call attention options.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct AttendOptions {
    /// Softmax scale, usually 1/sqrt(head_dim).
    pub scale: f32,
    /// Attention window in tokens, 0 for full attention.
    pub window: u32,
}

/// The host's attention over the batch's KV cache, lent to `Model::forward`.
///
/// The architecture computes q, k, v (with RoPE applied at each sequence's
/// position: `offsets()` for a batch, `offset()` when B = 1), and the cache
/// stores k/v and returns attention output. The engine owns which cache
/// blocks a sequence has; the KV family owns how they are stored.
///
/// Batches: row b of `tokens` [B, L] belongs to sequence b, whose first new
/// token sits at position `offsets()[b]`. Architectures take positions from
/// `offsets()` (`fast::rope_dynamic`) for every B, including 1: the host may
/// trace `forward` into a compiled graph that it replays at later positions
/// (ABI 3), and only an array input follows along. `offset()` is row 0's
/// position for shape decisions outside such traces (0 while tracing).
#[repr(C)]
#[derive(StableAbi)]
pub struct Attention {
    state: *mut c_void,
    offset_fn: extern "C" fn(*mut c_void) -> i32,
    /// q: [B, n_heads, L, D], k/v: [B, n_kv_heads, L, D] -> [B, n_heads, L, D].
    attend_fn: extern "C" fn(*mut c_void, u32, MlxArray, MlxArray, MlxArray, AttendOptions) -> PResult<MlxArray>,
    /// int32 [B]: each row's position offset (ABI 2).
    offsets_fn: extern "C" fn(*mut c_void) -> MlxArray,
    /// B, the number of sequences in the batch (ABI 2).
    batch_fn: extern "C" fn(*mut c_void) -> u32,
}

impl Attention {
    /// # Safety
    /// `state` must stay valid and unaliased while the `Attention` is used, and
    /// the functions must accept it.
    pub unsafe fn new(
        state: *mut c_void,
        offset_fn: extern "C" fn(*mut c_void) -> i32,
        attend_fn: extern "C" fn(*mut c_void, u32, MlxArray, MlxArray, MlxArray, AttendOptions) -> PResult<MlxArray>,
        offsets_fn: extern "C" fn(*mut c_void) -> MlxArray,
        batch_fn: extern "C" fn(*mut c_void) -> u32,
    ) -> Self {
        Self { state, offset_fn, attend_fn, offsets_fn, batch_fn }
    }
    /// Number of sequences in the batch (rows of `tokens`).
    pub fn batch(&self) -> u32 {
        (self.batch_fn)(self.state)
    }
    /// int32 [B]: per row, the number of tokens already cached for that
    /// sequence (the position of its first new token).
    pub fn offsets(&self) -> MlxArray {
        (self.offsets_fn)(self.state)
    }
    /// Number of tokens already in the cache (the position of the first new
    /// token) for row 0; the whole batch's when B = 1.
    pub fn offset(&self) -> i32 {
        (self.offset_fn)(self.state)
    }
    pub fn attend(&mut self, layer: u32, q: MlxArray, k: MlxArray, v: MlxArray, opts: AttendOptions) -> PResult<MlxArray> {
        (self.attend_fn)(self.state, layer, q, k, v, opts)
    }
}

#[sabi_trait]
pub trait Model: Send {
    fn spec(&self) -> ModelSpec;
    /// `tokens`: int32 [B, L]. Returns logits [B, L, vocab], or [B, 1, vocab]
    /// when `last_only`.
    fn forward(&mut self, tokens: MlxArray, attention: Attention, last_only: bool) -> PResult<MlxArray>;
}

pub type ModelBox = Model_TO<'static, RBox<()>>;

/// The host's view of a model's weights, lent to an architecture while it loads.
#[sabi_trait]
pub trait WeightSource {
    /// A linear layer built by the WeightQuant plugin that owns its format.
    fn linear(&mut self, prefix: RStr<'_>) -> PResult<LinearBox>;
    /// An embedding built by the WeightQuant plugin that owns its format.
    fn embedding(&mut self, prefix: RStr<'_>) -> PResult<EmbeddingBox>;
    /// A plain tensor (norm weights, biases) in the model's compute dtype.
    fn tensor(&mut self, name: RStr<'_>) -> PResult<MlxArray>;
    /// Whether a tensor of that full name exists.
    fn contains(&self, name: RStr<'_>) -> bool;
    /// All experts of an MoE projection (ABI 3.2), built by the WeightQuant
    /// plugin that owns its format.
    fn switch_linear(&mut self, prefix: RStr<'_>) -> PResult<crate::wquant::SwitchLinearBox>;
}

pub type WeightSourceMut<'a> = WeightSource_TO<'a, RMut<'a, ()>>;
