//! The forward's host side as an architecture sees it: [`Attend`] over a
//! 3.3 host's `ForwardCtx` or an older host's `Attention`, the attention
//! options [`AttendOpts`], and what a forward returns ([`Output`]).
use super::{into_result, Result};
use crate::{
    arch::{output, AttendOptions, AttendSpec, Attention, ForwardCtxMut},
    MlxArray, PluginError,
};
use abi_stable::std_types::{RNone, RSome, Tuple2};
use mlx_rs::Array;

/// What one forward returns (the host's choice, [`Attend::output`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Logits of each row's last position: [B, 1, vocab].
    LastLogits,
    /// Logits of every position: [B, L, vocab].
    AllLogits,
    /// Final hidden states after the last norm, no LM head: [B, L, hidden].
    Hidden,
    /// ABI 3.5: the media encoder (`arch::output::MEDIA`): pixel values
    /// [N, C, H, W] in `input_embeddings()` -> features [N, T, hidden].
    Media,
}

/// Attention options, as architectures and KV families see them.
#[derive(Clone, Copy, Debug)]
pub struct AttendOpts<'a> {
    /// Softmax scale, usually 1/sqrt(head_dim).
    pub scale: f32,
    /// Attention window in tokens, 0 for full attention.
    pub window: u32,
    /// Logit soft-cap `c`: scores become `c * tanh(scores / c)`; 0 for none.
    pub softcap: f32,
    /// float [H]: per-head attention-sink logits (gpt-oss), an extra column
    /// in the softmax that takes probability mass and no value.
    pub sinks: Option<&'a Array>,
    /// False: no causal mask (encoders, without a cache; a DFlash block over
    /// its context store). See `arch::AttendSpec::causal`.
    pub causal: bool,
}

impl<'a> AttendOpts<'a> {
    /// Causal, full attention with softmax scale `scale`.
    pub fn plain(scale: f32) -> Self {
        Self { scale, window: 0, softcap: 0.0, sinks: None, causal: true }
    }
    pub fn window(self, window: u32) -> Self {
        Self { window, ..self }
    }
    pub fn softcap(self, softcap: f32) -> Self {
        Self { softcap, ..self }
    }
    pub fn sinks(self, sinks: Option<&'a Array>) -> Self {
        Self { sinks, ..self }
    }
    pub fn bidirectional(self) -> Self {
        Self { causal: false, ..self }
    }
    /// Whether only the 3.0 options (scale, window, causal) are set.
    pub fn is_plain(&self) -> bool {
        self.softcap == 0.0 && self.sinks.is_none() && self.causal
    }
}

/// The host's side of one forward, as an architecture sees it: the
/// batch's positions, attention over its cache, and what to return. The
/// host of ABI 3.3 lends a [`crate::ForwardCtx`]; an older host lends an
/// [`Attention`], which knows only scale and window.
pub trait Attend {
    /// B, the rows of `tokens`.
    fn batch(&self) -> u32;
    /// Row 0's cached tokens, for shape decisions outside traces (0 while tracing).
    fn offset(&self) -> i32;
    /// int32 [B]: each row's cached tokens (its first new position).
    fn offsets(&self) -> Array;
    /// q: [B, H, L, D], k/v: [B, K, L, D] -> [B, H, L, D].
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array>;
    /// What the forward returns.
    fn output(&self) -> Output;
    /// Whether the host wants layer `layer`'s output hidden states.
    fn wants_hidden(&self, layer: u32) -> bool {
        let _ = layer;
        false
    }
    /// Hands the host layer `layer`'s output hidden states [B, L, hidden].
    fn put_hidden(&mut self, layer: u32, hidden: &Array) -> Result<()> {
        let _ = (layer, hidden);
        Ok(())
    }
    /// (features [B, L, hidden], mask bool [B, L]) replacing token embeddings.
    fn input_embeddings(&self) -> Option<(Array, Array)> {
        None
    }
    /// int32 [B]: valid tokens per row (padded at the end), when the host gives them.
    fn lengths(&self) -> Option<Array> {
        None
    }
    /// A STATE layer's recurrent state, each array [B, ...]; empty for new
    /// sequences (start from zeros).
    fn state(&mut self, layer: u32) -> Result<Vec<Array>> {
        let _ = layer;
        Err(PluginError::unsupported("this host keeps no recurrent state (it predates ABI 3.3)"))
    }
    /// The state of a STATE layer after this forward's tokens.
    fn set_state(&mut self, layer: u32, state: Vec<Array>) -> Result<()> {
        let _ = (layer, state);
        Err(PluginError::unsupported("this host keeps no recurrent state (it predates ABI 3.3)"))
    }
}

/// An older host's [`Attention`] with the forward's `last_only`.
pub(super) struct LegacyAttend {
    pub(super) attention: Attention,
    pub(super) last_only: bool,
}

impl Attend for LegacyAttend {
    fn batch(&self) -> u32 {
        self.attention.batch()
    }
    fn offset(&self) -> i32 {
        self.attention.offset()
    }
    fn offsets(&self) -> Array {
        self.attention.offsets().into_array()
    }
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array> {
        if !opts.is_plain() {
            return Err(PluginError::unsupported(
                "this host predates ABI 3.3: soft-capped, sink or non-causal attention needs a newer rmlx",
            ));
        }
        let o = AttendOptions { scale: opts.scale, window: opts.window };
        into_result(self.attention.attend(layer, q.into(), k.into(), v.into(), o)).map(MlxArray::into_array)
    }
    fn output(&self) -> Output {
        if self.last_only {
            Output::LastLogits
        } else {
            Output::AllLogits
        }
    }
}

/// A host's [`crate::ForwardCtx`] (ABI 3.3).
struct CtxAttend<'a> {
    ctx: ForwardCtxMut<'a>,
    hidden: Vec<u32>,
}

impl Attend for CtxAttend<'_> {
    fn batch(&self) -> u32 {
        self.ctx.batch()
    }
    fn offset(&self) -> i32 {
        self.ctx.offset()
    }
    fn offsets(&self) -> Array {
        self.ctx.offsets().into_array()
    }
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array> {
        let spec = AttendSpec {
            scale: opts.scale,
            window: opts.window,
            softcap: opts.softcap,
            sinks: match opts.sinks {
                Some(s) => RSome(MlxArray::from_ref(s)),
                None => RNone,
            },
            causal: opts.causal,
        };
        into_result(self.ctx.attend(layer, q.into(), k.into(), v.into(), spec)).map(MlxArray::into_array)
    }
    fn output(&self) -> Output {
        match self.ctx.output() {
            output::LOGITS_ALL => Output::AllLogits,
            output::HIDDEN => Output::Hidden,
            output::MEDIA => Output::Media,
            _ => Output::LastLogits,
        }
    }
    fn wants_hidden(&self, layer: u32) -> bool {
        self.hidden.binary_search(&layer).is_ok()
    }
    fn put_hidden(&mut self, layer: u32, hidden: &Array) -> Result<()> {
        into_result(self.ctx.put_hidden(layer, MlxArray::from_ref(hidden)))
    }
    fn input_embeddings(&self) -> Option<(Array, Array)> {
        match self.ctx.input_embeddings() {
            RSome(Tuple2(f, m)) => Some((f.into_array(), m.into_array())),
            RNone => None,
        }
    }
    fn lengths(&self) -> Option<Array> {
        match self.ctx.lengths() {
            RSome(l) => Some(l.into_array()),
            RNone => None,
        }
    }
    fn state(&mut self, layer: u32) -> Result<Vec<Array>> {
        into_result(self.ctx.state(layer)).map(|v| v.into_iter().map(MlxArray::into_array).collect())
    }
    fn set_state(&mut self, layer: u32, state: Vec<Array>) -> Result<()> {
        into_result(self.ctx.set_state(layer, state.into_iter().map(MlxArray::from_array).collect()))
    }
}

/// Runs `f` with the host's `ctx` as an [`Attend`].
pub(super) fn with_ctx<T>(ctx: ForwardCtxMut<'_>, f: impl FnOnce(&mut dyn Attend) -> Result<T>) -> Result<T> {
    let mut hidden: Vec<u32> = ctx.hidden_layers().into_iter().collect();
    hidden.sort_unstable();
    let mut a = CtxAttend { ctx, hidden };
    f(&mut a)
}
