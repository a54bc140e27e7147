//! Architecture: a model built from config.json and layers, and its forward pass.
use crate::{EmbeddingBox, LinearBox, MlxArray, PResult};
use abi_stable::{
    sabi_trait,
    sabi_types::RMut,
    std_types::{RBox, RErr, ROption, RStr, RString, RVec, Tuple2},
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

/// How one layer caches what it has seen (ABI 3.3, `Model::layers`).
pub mod cache_kind {
    /// K/V blocks for the whole context.
    pub const FULL: u32 = 0;
    /// K/V blocks for the last `window` tokens.
    pub const WINDOW: u32 = 1;
    /// Reads the K/V of the earlier layer `shared_with`; allocates nothing.
    /// The architecture calls `attend` on such a layer with its own queries
    /// and zero-length k/v (`[B, K, 0, hd]`), after the source layer has
    /// attended in the same forward (its new tokens are stored by then).
    pub const SHARED: u32 = 2;
    /// A fixed-size recurrent state per sequence (e.g. gated DeltaNet's conv
    /// and SSM state), through `ForwardCtx::state` / `set_state`.
    pub const STATE: u32 = 3;
}

/// One layer's cache (ABI 3.3). Heads and head size may differ per layer.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct LayerCache {
    /// One of [`cache_kind`]'s constants.
    pub kind: u32,
    /// WINDOW: the window in tokens.
    pub window: u32,
    /// FULL / WINDOW: K/V heads and head size of this layer.
    pub kv_heads: u32,
    pub head_dim: u32,
    /// SHARED: the layer whose K/V this one reads.
    pub shared_with: u32,
}

/// Attention options of one `ForwardCtx::attend` call (ABI 3.3). Passed by
/// value, so it never grows: a later option comes with a new `attend`
/// method appended to [`ForwardCtx`].
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct AttendSpec {
    /// Softmax scale, usually 1/sqrt(head_dim).
    pub scale: f32,
    /// Attention window in tokens, 0 for full attention.
    pub window: u32,
    /// Logit soft-cap `c`: scores become `c * tanh(scores / c)`; 0 for none.
    pub softcap: f32,
    /// float [H]: per-head attention-sink logits (gpt-oss), an extra softmax
    /// column that takes probability mass and no value.
    pub sinks: ROption<MlxArray>,
    /// False: no causal mask. In a cacheless forward (an encoder) every
    /// token sees every valid token of its row (`ForwardCtx::lengths`) and
    /// nothing is cached; where the host lends a cache (a DFlash drafter's
    /// context store), the new tokens see the whole cached context and each
    /// other. The paged pool of the server refuses it.
    pub causal: bool,
}

/// What the host wants back from `Model::forward_ctx` (`ForwardCtx::output`).
pub mod output {
    /// Logits of each row's last position: [B, 1, vocab].
    pub const LOGITS_LAST: u32 = 0;
    /// Logits of every position: [B, L, vocab] (verification, perplexity).
    pub const LOGITS_ALL: u32 = 1;
    /// The final hidden states after the last norm, without the LM head:
    /// [B, L, hidden] (embeddings, pooled outputs).
    pub const HIDDEN: u32 = 2;
    /// ABI 3.5: run the model's media encoder (a vision tower and its
    /// projector) instead of the language model. `input_embeddings()` lends
    /// the preprocessed media as features: pixel values [N, C, H, W] (channels
    /// first, normalised, as the model's `preprocessor_config.json` makes
    /// them; N images of one size), the mask unused; `tokens` is a
    /// placeholder [N, 1]. Returns [N, T, hidden]: per image, the T features
    /// that replace its T placeholder tokens in a later forward's
    /// `input_embeddings()` (in the language model's embedding scale, ready
    /// to merge). Nothing is cached; `attend` takes `causal: false`.
    /// A plugin that has no media encoder answers `Unsupported`. The host
    /// asks only plugins built for 3.5 or later.
    pub const MEDIA: u32 = 3;
}

/// Everything the host lends to one forward (ABI 3.3): positions, attention
/// over the batch's cache, what to return, and optional inputs. Host-
/// implemented, so methods are appended as the contract grows; a plugin only
/// calls the methods of the ABI it was built for.
///
/// Rows: row b of `tokens` [B, L] is sequence b, whose first new token sits
/// at position `offsets()[b]`; take positions from `offsets()` for every B
/// (the host may trace `forward_ctx` into a compiled graph).
#[sabi_trait]
pub trait ForwardCtx {
    /// B, the number of rows.
    fn batch(&self) -> u32;
    /// int32 [B]: each row's tokens already cached (its first new position).
    fn offsets(&self) -> MlxArray;
    /// Row 0's offset, for shape decisions outside traces (0 while tracing).
    fn offset(&self) -> i32;
    /// q: [B, H, L, D], k/v: [B, K, L, D] -> [B, H, L, D]. Stores k/v in the
    /// layer's cache (causal) and attends over the cached context.
    fn attend(&mut self, layer: u32, q: MlxArray, k: MlxArray, v: MlxArray, spec: AttendSpec) -> PResult<MlxArray>;
    /// One of [`output`]'s constants.
    fn output(&self) -> u32;
    /// Layers whose output hidden states the host wants, ascending: layer i
    /// is the residual stream after block i, [B, L, hidden] (drafters).
    fn hidden_layers(&self) -> RVec<u32>;
    /// Hands the host layer `layer`'s hidden states [B, L, hidden].
    fn put_hidden(&mut self, layer: u32, hidden: MlxArray) -> PResult<()>;
    /// Features that replace the token embeddings where `mask` is true:
    /// (features [B, L, hidden], mask bool [B, L]); image or audio input.
    fn input_embeddings(&self) -> ROption<Tuple2<MlxArray, MlxArray>>;
    /// int32 [B]: each row's valid tokens (rows padded at the end); none
    /// when every row is whole.
    fn lengths(&self) -> ROption<MlxArray>;
    /// A STATE layer's recurrent state for the batch's rows, each array
    /// [B, ...] as the layer last `set_state` it; empty when the rows have
    /// none yet (a new sequence: start from zeros).
    fn state(&mut self, layer: u32) -> PResult<RVec<MlxArray>>;
    /// The state of a STATE layer after this forward's tokens, each [B, ...].
    fn set_state(&mut self, layer: u32, state: RVec<MlxArray>) -> PResult<()>;
}

pub type ForwardCtxMut<'a> = ForwardCtx_TO<'a, RMut<'a, ()>>;

#[sabi_trait]
pub trait Model: Send {
    fn spec(&self) -> ModelSpec;
    /// `tokens`: int32 [B, L]. Returns logits [B, L, vocab], or [B, 1, vocab]
    /// when `last_only`.
    fn forward(&mut self, tokens: MlxArray, attention: Attention, last_only: bool) -> PResult<MlxArray>;
    /// ABI 3.3: the forward with a [`ForwardCtx`]; returns what
    /// `ctx.output()` asks for. A plugin built for 3.2 or earlier lacks this
    /// method; the default then answers `Unsupported` and the host calls
    /// [`Model::forward`].
    fn forward_ctx(&mut self, tokens: MlxArray, ctx: ForwardCtxMut<'_>) -> PResult<MlxArray> {
        let _ = (tokens, ctx);
        RErr(crate::PluginError::unsupported(crate::arch::NO_FORWARD_CTX))
    }
    /// ABI 3.3: each layer's cache, when layers differ from what
    /// [`ModelSpec`] says for all of them (windows aside); empty (the
    /// default, and a pre-3.3 plugin's answer) means "as the spec says".
    fn layers(&self) -> RVec<LayerCache> {
        RVec::new()
    }
    /// ABI 3.6: non-empty when this model is a **drafter head** (an MTP
    /// head, an Eagle-3 head): the verifier layers whose hidden states it
    /// conditions on, numbered as [`ForwardCtx::hidden_layers`] numbers
    /// them, negative from the end (-1: the verifier's last block, the
    /// residual stream before its final norm). A head's forward takes
    /// `tokens` [B, L] and, through `input_embeddings()`, the conditioning
    /// (features [B, L, C], mask all true): for token t at position p, the
    /// hidden states of position p - 1, those layers' concatenated along the
    /// last axis, or, on a chained draft step, the head's own
    /// [`HEAD_STATE`] of the step before. A head may also read conditioning
    /// only on the rows the mask sets (a DFlash drafter: the context rows
    /// carry their own position's hidden states, the block's rows none).
    /// It caches its own layers' K/V through `attend` like any model (the
    /// host pages them); `offsets()` count the head's own cached positions.
    /// It loads from the verifier's checkpoint (the same `WeightSource`:
    /// shared embeddings and LM head, its own tensors under its prefix), or
    /// from a sidecar directory with the verifier's as its fallback
    /// (`LoadedModel::load_head_from`: Eagle-3, DFlash). Empty (the default, and a pre-3.6
    /// plugin's answer): a plain model.
    fn conditioning(&self) -> RVec<i32> {
        RVec::new()
    }
}

/// ABI 3.6: the hidden-layer id (in `ForwardCtx::hidden_layers` /
/// `put_hidden`) of a drafter head's own output state, [B, L, C]: what its
/// next chained draft step conditions on in place of the verifier's hidden
/// states (for Qwen3.5's MTP head, its normed output).
pub const HEAD_STATE: u32 = u32::MAX;

/// The message of the `Unsupported` error a pre-3.3 model answers to
/// `forward_ctx`.
pub const NO_FORWARD_CTX: &str = "this plugin was built before ABI 3.3 and has no forward_ctx";

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
    /// ABI 3.4: the layers under `prefixes` (same input, same format) as one
    /// linear, their outputs side by side in the order given, with each
    /// one's output features (`WeightQuant::linear_fused`). `Unsupported`
    /// when their formats differ or the format cannot stack them.
    fn linear_fused(&mut self, prefixes: RVec<RString>) -> PResult<Tuple2<LinearBox, RVec<u32>>>;
}

pub type WeightSourceMut<'a> = WeightSource_TO<'a, RMut<'a, ()>>;
