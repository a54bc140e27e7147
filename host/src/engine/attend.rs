//! The host's KV stores lent to an architecture's forward: one `KvStore`
//! trait for every store (the one-sequence `KvCache`, the paged
//! `PagedForward`, the compiled step's traced buffers, the encoder's
//! cacheless attention), lent through ABI 3.3's `ForwardCtx` or, to a plugin
//! built before 3.3, the older `Attention` callbacks.
use mlx_rs::Array;
use rmlx_plugin_api::{
    abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RNone, ROption, RSome, RVec, Tuple2},
    },
    arch::{ForwardCtx, ForwardCtx_TO, NO_FORWARD_CTX},
    author::{guard, AttendOpts, Output},
    output, AttendOptions, AttendSpec, Attention, ErrorKind, MlxArray, ModelBox, PResult, PluginError,
};
use std::ffi::c_void;

pub trait KvStore {
    /// B, the rows of the forward.
    fn batch(&self) -> u32;
    /// Row 0's tokens already cached (for shape decisions; 0 while tracing).
    fn offset(&self) -> i32;
    /// int32 [B]: each row's tokens already cached.
    fn offsets(&self) -> Array;
    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError>;
    /// A recurrent-state layer's state, each [B, ...]; empty for new rows.
    fn state(&mut self, layer: u32) -> Result<Vec<Array>, PluginError> {
        let _ = layer;
        Err(no_state())
    }
    /// Keeps a recurrent-state layer's state after this forward.
    fn set_state(&mut self, layer: u32, state: Vec<Array>) -> Result<(), PluginError> {
        let _ = (layer, state);
        Err(no_state())
    }
    /// int32 [3, B, L]: the new tokens' multimodal-RoPE positions (ABI 3.7,
    /// engine/mrope.rs), or None: `offsets()[b] + l` on every axis.
    fn positions(&self) -> Option<Array> {
        None
    }
}

/// The error of a store that keeps no recurrent state.
pub(crate) fn no_state() -> PluginError {
    PluginError::unsupported(
        "recurrent-state layers (gated DeltaNet) need a KV store that keeps per-sequence state: `rmlx generate`/`chat`'s caches and the server's engine do; this one (the encoder's) does not",
    )
}

/// What the host asks of one forward besides its tokens.
#[derive(Default)]
pub struct ForwardRequest {
    pub output: Option<Output>,
    /// Layers whose output hidden states to return (drafters), ascending.
    pub hidden_layers: Vec<u32>,
    /// (features [B, L, hidden], mask bool [B, L]) replacing token embeddings.
    pub inputs: Option<(Array, Array)>,
    /// int32 [B]: valid tokens per row (rows padded at the end).
    pub lengths: Option<Array>,
}

impl ForwardRequest {
    pub fn logits(last_only: bool) -> Self {
        Self { output: Some(if last_only { Output::LastLogits } else { Output::AllLogits }), ..Self::default() }
    }
    fn needs_ctx(&self) -> bool {
        matches!(self.output, Some(Output::Hidden | Output::Media)) || !self.hidden_layers.is_empty() || self.inputs.is_some()
    }
}

/// One forward's results.
pub struct ForwardOut {
    /// Logits [B, 1 | L, V], or the final hidden states [B, L, hidden].
    pub out: Array,
    /// (layer, hidden [B, L, hidden]) for each requested layer.
    pub hidden: Vec<(u32, Array)>,
}

/// Runs `model`'s forward over `store`: ABI 3.3's `forward_ctx`, or the
/// older `forward` for a plugin built before it (which can only return logits).
pub fn forward<T: KvStore>(
    model: &mut ModelBox,
    tokens: &Array,
    store: &mut T,
    req: ForwardRequest,
) -> Result<ForwardOut, PluginError> {
    let needs_ctx = req.needs_ctx();
    let last_only = req.output != Some(Output::AllLogits);
    let mut ctx = Ctx { store, req, hidden: Vec::new() };
    let r = model.forward_ctx(MlxArray::from_ref(tokens), ForwardCtx_TO::from_ptr(&mut ctx, TD_Opaque));
    match r.into_result() {
        Ok(out) => Ok(ForwardOut { out: out.into_array(), hidden: ctx.hidden }),
        Err(e) if e.kind == ErrorKind::Unsupported && e.message.as_str() == NO_FORWARD_CTX => {
            if needs_ctx {
                return Err(PluginError::unsupported(
                    "this architecture plugin predates ABI 3.3: it returns logits only (no hidden states or input embeddings); rebuild it against rmlx-plugin-api 3.3",
                ));
            }
            let out = model.forward(MlxArray::from_ref(tokens), lend(ctx.store), last_only).into_result()?;
            Ok(ForwardOut { out: out.into_array(), hidden: Vec::new() })
        }
        Err(e) => Err(e),
    }
}

/// Logits of `tokens` [B, L] over `store`: [B, 1 | L, V].
pub fn logits<T: KvStore>(model: &mut ModelBox, tokens: &Array, store: &mut T, last_only: bool) -> Result<Array, PluginError> {
    Ok(forward(model, tokens, store, ForwardRequest::logits(last_only))?.out)
}

/// The `ForwardCtx` of one forward.
struct Ctx<'s, T: KvStore> {
    store: &'s mut T,
    req: ForwardRequest,
    hidden: Vec<(u32, Array)>,
}

impl<T: KvStore> ForwardCtx for Ctx<'_, T> {
    fn batch(&self) -> u32 {
        self.store.batch()
    }
    fn offsets(&self) -> MlxArray {
        MlxArray::from_array(self.store.offsets())
    }
    fn offset(&self) -> i32 {
        self.store.offset()
    }
    fn attend(&mut self, layer: u32, q: MlxArray, k: MlxArray, v: MlxArray, spec: AttendSpec) -> PResult<MlxArray> {
        let sinks = match spec.sinks {
            RSome(s) => Some(s.into_array()),
            RNone => None,
        };
        let opts = AttendOpts {
            scale: spec.scale,
            window: spec.window,
            softcap: spec.softcap,
            sinks: sinks.as_ref(),
            causal: spec.causal,
        };
        guard(|| self.store.attend(layer, q.into_array(), k.into_array(), v.into_array(), &opts).map(MlxArray::from_array))
    }
    fn output(&self) -> u32 {
        match self.req.output {
            Some(Output::AllLogits) => output::LOGITS_ALL,
            Some(Output::Hidden) => output::HIDDEN,
            Some(Output::Media) => output::MEDIA,
            _ => output::LOGITS_LAST,
        }
    }
    fn hidden_layers(&self) -> RVec<u32> {
        self.req.hidden_layers.iter().copied().collect()
    }
    fn put_hidden(&mut self, layer: u32, hidden: MlxArray) -> PResult<()> {
        guard(|| {
            if self.req.hidden_layers.binary_search(&layer).is_err() {
                return Err(PluginError::other(format!("layer {layer}'s hidden states were not asked for")));
            }
            self.hidden.push((layer, hidden.into_array()));
            Ok(())
        })
    }
    fn input_embeddings(&self) -> ROption<Tuple2<MlxArray, MlxArray>> {
        match &self.req.inputs {
            Some((f, m)) => RSome(Tuple2(MlxArray::from_ref(f), MlxArray::from_ref(m))),
            None => RNone,
        }
    }
    fn state(&mut self, layer: u32) -> PResult<RVec<MlxArray>> {
        guard(|| Ok(self.store.state(layer)?.into_iter().map(MlxArray::from_array).collect()))
    }
    fn set_state(&mut self, layer: u32, state: RVec<MlxArray>) -> PResult<()> {
        guard(|| self.store.set_state(layer, state.into_iter().map(MlxArray::into_array).collect()))
    }
    fn lengths(&self) -> ROption<MlxArray> {
        match &self.req.lengths {
            Some(l) => RSome(MlxArray::from_ref(l)),
            None => RNone,
        }
    }
    fn positions(&self) -> ROption<MlxArray> {
        match self.store.positions() {
            Some(p) => RSome(MlxArray::from_array(p)),
            None => RNone,
        }
    }
}

/// Lends `store` to a pre-3.3 plugin's `forward` (it must outlive the `Attention`).
pub fn lend<T: KvStore>(store: &mut T) -> Attention {
    unsafe { Attention::new(store as *mut T as *mut c_void, offset_cb::<T>, attend_cb::<T>, offsets_cb::<T>, batch_cb::<T>) }
}

extern "C" fn offset_cb<T: KvStore>(state: *mut c_void) -> i32 {
    unsafe { &*(state as *const T) }.offset()
}

extern "C" fn offsets_cb<T: KvStore>(state: *mut c_void) -> MlxArray {
    MlxArray::from_array(unsafe { &*(state as *const T) }.offsets())
}

extern "C" fn batch_cb<T: KvStore>(state: *mut c_void) -> u32 {
    unsafe { &*(state as *const T) }.batch()
}

extern "C" fn attend_cb<T: KvStore>(
    state: *mut c_void,
    layer: u32,
    q: MlxArray,
    k: MlxArray,
    v: MlxArray,
    opts: AttendOptions,
) -> PResult<MlxArray> {
    let store = unsafe { &mut *(state as *mut T) };
    let opts = AttendOpts::plain(opts.scale).window(opts.window);
    guard(|| store.attend(layer, q.into_array(), k.into_array(), v.into_array(), &opts).map(MlxArray::from_array))
}

/// The error every cached store gives a non-causal attention call.
pub fn refuse_bidirectional(opts: &AttendOpts<'_>) -> Result<(), PluginError> {
    if opts.causal {
        Ok(())
    } else {
        Err(PluginError::unsupported("non-causal (encoder) attention runs without a KV cache: this forward has one"))
    }
}
