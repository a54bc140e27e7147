//! The plain-Rust side of the contract, for plugin authors.
//!
//! Implement [`PluginImpl`] (and [`ModelImpl`], [`QuantImpl`], ... for what the
//! plugin provides) with mlx-rs types, then call [`crate::export_plugin!`].
//! The adapters here turn those into `StableAbi` trait objects, catching every
//! panic so none crosses the boundary.
use crate::{
    arch::{Attention, ForwardCtxMut, LayerCache, Model, ModelSpec, Model_TO, WeightSourceMut},
    error::ErrorKind,
    wquant::{
        Embedding, EmbeddingBox, Embedding_TO, Linear, LinearBox, Linear_TO, NamedArray, QuantParams, WeightQuant,
        WeightQuant_TO,
    },
    Manifest, MlxArray, ModelBox, PResult, PluginError, WeightQuantBox,
};
use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RBox, RErr, ROk, RResult, RStr, RString, RVec, Tuple2},
};
use mlx_rs::Array;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub mod attend;
pub mod kv;

pub use attend::{Attend, AttendOpts, Output};
use attend::{with_ctx, LegacyAttend};

pub type Result<T> = std::result::Result<T, PluginError>;

/// Runs `f`, turning a panic into a [`PluginError`] of kind `Panic`.
pub fn guard<T>(f: impl FnOnce() -> Result<T>) -> PResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RErr(e),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            RErr(PluginError::new(ErrorKind::Panic, format!("plugin panicked: {msg}")))
        }
    }
}

fn into_result<T>(r: PResult<T>) -> Result<T> {
    match r {
        ROk(v) => Ok(v),
        RErr(e) => Err(e),
    }
}

/// A plugin. Implement the methods for the capabilities its manifest lists.
pub trait PluginImpl: 'static {
    fn manifest() -> Manifest;
    fn load_model(model_type: &str, config_json: &str, weights: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        let _ = (config_json, weights);
        Err(PluginError::unsupported(format!("no architecture {model_type}")))
    }
    /// Checks a config.json for `model_type` without loading weights (ABI 3.1):
    /// refuse, by name, any option this architecture does not implement.
    /// The default accepts every config.
    fn check_config(model_type: &str, config_json: &str) -> Result<()> {
        let _ = (model_type, config_json);
        Ok(())
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        Err(PluginError::unsupported(format!("no weight format {mode}")))
    }
    /// The codec of a KV family the manifest lists (ABI 3.2).
    fn kv_codec(name: &str) -> Result<Box<dyn kv::KvCodecImpl>> {
        Err(PluginError::unsupported(format!("no KV family {name}")))
    }
}

pub trait ModelImpl: Send + 'static {
    fn spec(&self) -> ModelSpec;
    /// `tokens`: int32 [B, L] -> what `attn.output()` asks for: logits
    /// [B, 1 | L, vocab], or the final hidden states [B, L, hidden].
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array>;
    /// Each layer's cache when layers differ beyond windows (state layers,
    /// KV sharing, per-layer head sizes); empty: as `spec()` says.
    fn layers(&self) -> Vec<LayerCache> {
        Vec::new()
    }
    /// ABI 3.6: a drafter head's conditioning layers (`Model::conditioning`);
    /// empty for a plain model.
    fn conditioning(&self) -> Vec<i32> {
        Vec::new()
    }
}

pub trait LinearImpl: Send + 'static {
    fn forward(&self, x: &Array) -> Result<Array>;
    /// (in_features, out_features)
    fn dims(&self) -> (u32, u32);
}

pub trait EmbeddingImpl: Send + 'static {
    fn lookup(&self, ids: &Array) -> Result<Array>;
    fn as_linear(&self, x: &Array) -> Result<Array>;
    /// (vocab, dim)
    fn dims(&self) -> (u32, u32);
}

pub trait QuantImpl: Send + 'static {
    fn linear(&self, tensors: Tensors, params: &QuantParams) -> Result<Box<dyn LinearImpl>>;
    /// Whether every tensor of a layer in this format is per output row
    /// (`weight` [out, ...], `scales`/`biases` [out, ...], `bias` [out]), so
    /// that layers of one input stack into one linear along the output axis
    /// (ABI 3.4 `linear_fused`: q/k/v, gate/up). False (the default) keeps
    /// them apart, e.g. for a per-tensor scale or a packing across rows.
    fn rows_stack(&self) -> bool {
        false
    }
    fn embedding(&self, tensors: Tensors, params: &QuantParams) -> Result<Box<dyn EmbeddingImpl>>;
    /// All experts of an MoE projection (ABI 3.2): `weight` [experts, out, in]
    /// and the format's other tensors, stacked the same way.
    fn switch_linear(&self, tensors: Tensors, params: &QuantParams) -> Result<Box<dyn SwitchLinearImpl>> {
        let _ = tensors;
        Err(PluginError::unsupported(format!("weight format {} has no expert (switch) layers", params.mode)))
    }
}

/// All experts of one MoE projection, as mlx-lm's `SwitchLinear`.
pub trait SwitchLinearImpl: Send + 'static {
    /// `x` [..., 1 | k, 1, in], `indices` uint32 [..., k] -> [..., k, 1, out].
    fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array>;
    /// (experts, in_features, out_features)
    fn dims(&self) -> (u32, u32, u32);
}

/// The tensors of one module, by local name (`weight`, `scales`, `biases`, `bias`).
pub struct Tensors {
    pub prefix: String,
    map: BTreeMap<String, Array>,
}

impl Tensors {
    pub fn new(prefix: impl Into<String>, items: RVec<NamedArray>) -> Self {
        let map = items.into_iter().map(|n| (n.name.into_string(), n.array.into_array())).collect();
        Self { prefix: prefix.into(), map }
    }
    pub fn take(&mut self, name: &str) -> Result<Array> {
        self.map
            .remove(name)
            .ok_or_else(|| PluginError::missing(format!("missing tensor {}.{name}", self.prefix)))
    }
    pub fn take_opt(&mut self, name: &str) -> Option<Array> {
        self.map.remove(name)
    }
    pub fn names(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }

    /// Several layers' tensors stacked along the output axis (axis 0) into
    /// one, with each part's output rows (its `weight`'s first dimension).
    /// Every part must hold the same tensor names, each tensor's first
    /// dimension must be that part's rows, and the other dimensions must
    /// agree across parts.
    pub fn stack_rows(parts: Vec<Tensors>) -> Result<(Tensors, Vec<u32>)> {
        let first = parts.first().ok_or_else(|| PluginError::config("a fused linear of no layers"))?;
        let names: Vec<String> = first.map.keys().cloned().collect();
        let mut rows = Vec::with_capacity(parts.len());
        for p in &parts {
            if p.map.keys().ne(names.iter()) {
                return Err(PluginError::unsupported(format!("{}: tensors {:?} differ from {:?}", p.prefix, p.names(), names)));
            }
            let out = p.map.get("weight").ok_or_else(|| PluginError::missing(format!("missing tensor {}.weight", p.prefix)))?.dim(0);
            for (n, a) in &p.map {
                let same_tail = a.shape()[1..] == first.map[n].shape()[1..];
                if a.ndim() == 0 || a.dim(0) != out || !same_tail {
                    return Err(PluginError::unsupported(format!("{}.{n} of shape {:?} does not stack by output rows", p.prefix, a.shape())));
                }
            }
            rows.push(out as u32);
        }
        let mut map = BTreeMap::new();
        for n in names {
            let arrays: Vec<&Array> = parts.iter().map(|p| &p.map[&n]).collect();
            map.insert(n, mlx_rs::ops::concatenate(&arrays, 0)?);
        }
        let prefix = parts.iter().map(|p| p.prefix.as_str()).collect::<Vec<_>>().join("+");
        Ok((Tensors { prefix, map }, rows))
    }
    /// An expert layer's optional `bias`, which must be [experts, out].
    pub fn take_expert_bias(&mut self, experts: i32, out: i32) -> Result<Option<Array>> {
        let bias = self.take_opt("bias");
        if let Some(b) = bias.as_ref().filter(|b| b.shape() != [experts, out]) {
            return Err(PluginError::config(format!("{}bias: expected [{experts}, {out}], got {:?}", self.prefix, b.shape())));
        }
        Ok(bias)
    }
}

/// An expert layer's output `y` [..., k, 1, out] plus each picked expert's
/// bias (`bias` [E, out], `indices` [..., k]), as mlx-lm's SwitchLinear adds it.
pub fn add_expert_bias(y: Array, bias: Option<&Array>, indices: &Array) -> Result<Array> {
    Ok(match bias {
        Some(b) => y.add(b.take_axis(indices, 0)?.expand_dims(-2)?)?,
        None => y,
    })
}

/// The host's weights as an architecture sees them while loading.
pub struct Weights<'a, 'b> {
    src: &'a mut WeightSourceMut<'b>,
}

impl<'a, 'b> Weights<'a, 'b> {
    pub fn new(src: &'a mut WeightSourceMut<'b>) -> Self {
        Self { src }
    }
    pub fn linear(&mut self, prefix: &str) -> Result<LinearLayer> {
        into_result(self.src.linear(RStr::from(prefix))).map(LinearLayer)
    }
    pub fn embedding(&mut self, prefix: &str) -> Result<EmbeddingLayer> {
        into_result(self.src.embedding(RStr::from(prefix))).map(EmbeddingLayer)
    }
    /// Layers of one input (`q_proj`, `k_proj`, `v_proj`; `gate_proj`,
    /// `up_proj`) as one fused linear where their format stacks (ABI 3.4),
    /// else one linear each: [`Linears::forward`] gives the same outputs
    /// either way.
    pub fn linears(&mut self, prefixes: &[&str]) -> Result<Linears> {
        let names: RVec<RString> = prefixes.iter().map(|p| RString::from(*p)).collect();
        match into_result(self.src.linear_fused(names)) {
            Ok(Tuple2(layer, rows)) if rows.len() == prefixes.len() => {
                Ok(Linears::Fused(LinearLayer(layer), rows.iter().map(|&r| r as i32).collect()))
            }
            Ok(_) => Err(PluginError::other("a fused linear answered a part count unlike the request")),
            Err(e) if e.kind == crate::ErrorKind::Unsupported => {
                prefixes.iter().map(|p| self.linear(p)).collect::<Result<Vec<_>>>().map(Linears::Separate)
            }
            Err(e) => Err(e),
        }
    }
    pub fn tensor(&mut self, name: &str) -> Result<Array> {
        into_result(self.src.tensor(RStr::from(name))).map(MlxArray::into_array)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(RStr::from(name))
    }
    /// All experts of an MoE projection, in whatever format the checkpoint has.
    pub fn switch_linear(&mut self, prefix: &str) -> Result<SwitchLayer> {
        into_result(self.src.switch_linear(RStr::from(prefix))).map(SwitchLayer)
    }
}

/// An MoE projection built by whichever WeightQuant plugin owns its format.
pub struct SwitchLayer(pub crate::wquant::SwitchLinearBox);

impl SwitchLayer {
    /// `x` [..., 1 | k, 1, in], `indices` uint32 [..., k] -> [..., k, 1, out].
    pub fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
        into_result(self.0.forward(MlxArray::from_ref(x), MlxArray::from_ref(indices), sorted)).map(MlxArray::into_array)
    }
    /// (experts, in_features, out_features)
    pub fn dims(&self) -> (u32, u32, u32) {
        let t = self.0.dims();
        (t.0, t.1, t.2)
    }
}

/// A linear layer built by whichever WeightQuant plugin owns its format.
pub struct LinearLayer(pub LinearBox);

impl LinearLayer {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        into_result(self.0.forward(MlxArray::from_ref(x))).map(MlxArray::into_array)
    }
}

/// Layers of one input: one fused linear with each part's output features,
/// or one linear each (see [`Weights::linears`]).
pub enum Linears {
    Fused(LinearLayer, Vec<i32>),
    Separate(Vec<LinearLayer>),
}

impl Linears {
    /// `x` [..., in] -> one output per layer, [..., out_i], in order.
    pub fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        match self {
            Linears::Separate(ls) => ls.iter().map(|l| l.forward(x)).collect(),
            Linears::Fused(l, rows) => {
                let y = l.forward(x)?;
                let mut at = 0;
                let mut cuts = Vec::with_capacity(rows.len().saturating_sub(1));
                for r in &rows[..rows.len().saturating_sub(1)] {
                    at += r;
                    cuts.push(at);
                }
                Ok(y.split_at_indices(&cuts, -1)?)
            }
        }
    }
    /// Whether the layers run as one matmul.
    pub fn is_fused(&self) -> bool {
        matches!(self, Linears::Fused(..))
    }
}

/// An embedding built by whichever WeightQuant plugin owns its format.
pub struct EmbeddingLayer(pub EmbeddingBox);

impl EmbeddingLayer {
    pub fn lookup(&self, ids: &Array) -> Result<Array> {
        into_result(self.0.lookup(MlxArray::from_ref(ids))).map(MlxArray::into_array)
    }
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        into_result(self.0.as_linear(MlxArray::from_ref(x))).map(MlxArray::into_array)
    }
}

// ---- adapters: plain Rust -> StableAbi trait objects ----

struct ModelAdapter {
    inner: Box<dyn ModelImpl>,
    spec: ModelSpec,
    layers: Vec<LayerCache>,
}

impl Model for ModelAdapter {
    fn spec(&self) -> ModelSpec {
        self.spec.clone()
    }
    fn forward(&mut self, tokens: MlxArray, attention: Attention, last_only: bool) -> PResult<MlxArray> {
        guard(|| {
            let tokens = tokens.into_array();
            let mut a = LegacyAttend { attention, last_only };
            self.inner.forward(&tokens, &mut a).map(MlxArray::from_array)
        })
    }
    fn forward_ctx(&mut self, tokens: MlxArray, ctx: ForwardCtxMut<'_>) -> PResult<MlxArray> {
        guard(|| {
            let tokens = tokens.into_array();
            with_ctx(ctx, |a| self.inner.forward(&tokens, a)).map(MlxArray::from_array)
        })
    }
    fn layers(&self) -> RVec<LayerCache> {
        self.layers.iter().cloned().collect()
    }
    fn conditioning(&self) -> RVec<i32> {
        self.inner.conditioning().into_iter().collect()
    }
}

struct LinearAdapter(Box<dyn LinearImpl>);

impl Linear for LinearAdapter {
    fn forward(&self, x: MlxArray) -> PResult<MlxArray> {
        guard(|| self.0.forward(&x.into_array()).map(MlxArray::from_array))
    }
    fn dims(&self) -> Tuple2<u32, u32> {
        let (i, o) = self.0.dims();
        Tuple2(i, o)
    }
}

struct EmbeddingAdapter(Box<dyn EmbeddingImpl>);

impl Embedding for EmbeddingAdapter {
    fn lookup(&self, ids: MlxArray) -> PResult<MlxArray> {
        guard(|| self.0.lookup(&ids.into_array()).map(MlxArray::from_array))
    }
    fn as_linear(&self, x: MlxArray) -> PResult<MlxArray> {
        guard(|| self.0.as_linear(&x.into_array()).map(MlxArray::from_array))
    }
    fn dims(&self) -> Tuple2<u32, u32> {
        let (v, d) = self.0.dims();
        Tuple2(v, d)
    }
}

struct QuantAdapter(Box<dyn QuantImpl>);

impl WeightQuant for QuantAdapter {
    fn linear(&self, tensors: RVec<NamedArray>, params: QuantParams) -> PResult<LinearBox> {
        guard(|| {
            let layer = self.0.linear(Tensors::new("", tensors), &params)?;
            Ok(Linear_TO::from_value(LinearAdapter(layer), TD_Opaque))
        })
    }
    fn embedding(&self, tensors: RVec<NamedArray>, params: QuantParams) -> PResult<EmbeddingBox> {
        guard(|| {
            let layer = self.0.embedding(Tensors::new("", tensors), &params)?;
            Ok(Embedding_TO::from_value(EmbeddingAdapter(layer), TD_Opaque))
        })
    }
    fn linear_fused(&self, parts: RVec<RVec<NamedArray>>, params: QuantParams) -> PResult<Tuple2<LinearBox, RVec<u32>>> {
        guard(|| {
            if !self.0.rows_stack() {
                return Err(PluginError::unsupported(format!("weight format {} builds no fused linear", params.mode)));
            }
            let parts = parts.into_iter().map(|t| Tensors::new("", t)).collect();
            let (tensors, rows) = Tensors::stack_rows(parts)?;
            let layer = self.0.linear(tensors, &params)?;
            Ok(Tuple2(Linear_TO::from_value(LinearAdapter(layer), TD_Opaque), rows.into_iter().collect()))
        })
    }
}

struct SwitchAdapter(Box<dyn SwitchLinearImpl>);

impl crate::wquant::SwitchLinear for SwitchAdapter {
    fn forward(&self, x: MlxArray, indices: MlxArray, sorted: bool) -> PResult<MlxArray> {
        guard(|| self.0.forward(&x.into_array(), &indices.into_array(), sorted).map(MlxArray::from_array))
    }
    fn dims(&self) -> abi_stable::std_types::Tuple3<u32, u32, u32> {
        let (e, i, o) = self.0.dims();
        abi_stable::std_types::Tuple3(e, i, o)
    }
}

/// Wraps a plain-Rust switch layer (for hosts and plugins that build layers).
pub fn switch_box(layer: Box<dyn SwitchLinearImpl>) -> crate::wquant::SwitchLinearBox {
    crate::wquant::SwitchLinear_TO::from_value(SwitchAdapter(layer), TD_Opaque)
}

/// Wraps a plain-Rust linear layer (for hosts and plugins that build layers).
pub fn linear_box(layer: Box<dyn LinearImpl>) -> LinearBox {
    Linear_TO::from_value(LinearAdapter(layer), TD_Opaque)
}

/// Wraps a plain-Rust embedding.
pub fn embedding_box(layer: Box<dyn EmbeddingImpl>) -> EmbeddingBox {
    Embedding_TO::from_value(EmbeddingAdapter(layer), TD_Opaque)
}

// ---- entry points, monomorphized per plugin by export_plugin! ----

pub extern "C" fn manifest_entry<P: PluginImpl>() -> crate::Manifest {
    match catch_unwind(P::manifest) {
        Ok(m) => m,
        Err(_) => Manifest::new("<panicked>", "0", "manifest() panicked"),
    }
}

pub extern "C" fn load_model_entry<P: PluginImpl>(
    model_type: RStr<'_>,
    config_json: RStr<'_>,
    mut weights: WeightSourceMut<'_>,
) -> PResult<ModelBox> {
    guard(|| {
        let mut w = Weights::new(&mut weights);
        let inner = P::load_model(model_type.as_str(), config_json.as_str(), &mut w)?;
        let (spec, layers) = (inner.spec(), inner.layers());
        Ok(Model_TO::from_value(ModelAdapter { inner, spec, layers }, TD_Opaque))
    })
}

pub extern "C" fn check_config_entry<P: PluginImpl>(model_type: RStr<'_>, config_json: RStr<'_>) -> PResult<()> {
    guard(|| P::check_config(model_type.as_str(), config_json.as_str()))
}

pub extern "C" fn weight_quant_entry<P: PluginImpl>(mode: RStr<'_>) -> PResult<WeightQuantBox> {
    guard(|| {
        let q = P::weight_quant(mode.as_str())?;
        Ok(WeightQuant_TO::from_value(QuantAdapter(q), TD_Opaque))
    })
}

pub extern "C" fn switch_linear_entry<P: PluginImpl>(
    mode: RStr<'_>,
    tensors: RVec<NamedArray>,
    params: QuantParams,
) -> PResult<crate::wquant::SwitchLinearBox> {
    guard(|| {
        let q = P::weight_quant(mode.as_str())?;
        Ok(switch_box(q.switch_linear(Tensors::new("", tensors), &params)?))
    })
}

pub extern "C" fn kv_codec_entry<P: PluginImpl>(name: RStr<'_>) -> PResult<crate::kv::KvCodecBox> {
    guard(|| Ok(kv::codec_box(P::kv_codec(name.as_str())?)))
}

pub extern "C" fn kv_codec_calibrated_entry<P: PluginImpl>(
    name: RStr<'_>,
    data: RVec<NamedArray>,
) -> PResult<crate::kv::KvCodecBox> {
    guard(|| {
        let codec = P::kv_codec(name.as_str())?;
        Ok(kv::codec_box(kv::calibrated(codec, Tensors::new(format!("{name} calibration "), data))?))
    })
}

#[doc(hidden)]
pub fn _unused(_: RBox<()>, _: RResult<(), ()>) {}
