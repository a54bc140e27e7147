//! WeightQuant: builds linear and embedding layers from a module's tensors.
//!
//! Architecture code asks the host for `linear("model.layers.0.mlp.up_proj")`;
//! the host finds the format of that module (config.json's `quantization`,
//! with per-layer overrides) and asks the plugin that owns the format to build
//! it from the module's tensors (`weight`, `scales`, `biases`, `bias`, ...).
use crate::{MlxArray, PResult};
use abi_stable::{
    sabi_trait,
    std_types::{RBox, RString, RVec, Tuple2},
    StableAbi,
};

/// How one module is stored. `mode` is `none` for dense weights.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct QuantParams {
    pub mode: RString,
    pub bits: i32,
    pub group_size: i32,
}

/// One tensor of a module, named relative to the module (`weight`, `scales`, ...).
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct NamedArray {
    pub name: RString,
    pub array: MlxArray,
}

#[sabi_trait]
pub trait Linear: Send {
    /// `x`: [..., in] -> [..., out].
    fn forward(&self, x: MlxArray) -> PResult<MlxArray>;
    /// (in_features, out_features).
    fn dims(&self) -> abi_stable::std_types::Tuple2<u32, u32>;
}

#[sabi_trait]
pub trait Embedding: Send {
    /// `ids`: int [...] -> [..., dim].
    fn lookup(&self, ids: MlxArray) -> PResult<MlxArray>;
    /// Tied output head: `x` [..., dim] -> [..., vocab].
    fn as_linear(&self, x: MlxArray) -> PResult<MlxArray>;
    /// (vocab, dim).
    fn dims(&self) -> abi_stable::std_types::Tuple2<u32, u32>;
}

#[sabi_trait]
pub trait WeightQuant: Send {
    fn linear(&self, tensors: RVec<NamedArray>, params: QuantParams) -> PResult<LinearBox>;
    fn embedding(&self, tensors: RVec<NamedArray>, params: QuantParams) -> PResult<EmbeddingBox>;
    /// ABI 3.4: one linear computing several layers of the same input and
    /// format at once (q/k/v, gate/up): `parts`' tensors stacked along the
    /// output axis. Returns the layer and each part's output features, in
    /// order. A format whose tensors are not per output row (or a plugin
    /// built for 3.3 or earlier, through this default) answers
    /// `Unsupported`, and the architecture keeps the layers apart.
    fn linear_fused(&self, parts: RVec<RVec<NamedArray>>, params: QuantParams) -> PResult<Tuple2<LinearBox, RVec<u32>>> {
        let _ = parts;
        PResult::RErr(crate::PluginError::unsupported(format!("weight format {} builds no fused linear", params.mode)))
    }
}

/// All experts of one MoE projection (ABI 3.2): what mlx-lm's `SwitchLinear`
/// computes, through MLX's `gather_mm` / `gather_qmm` in the layer's format.
#[sabi_trait]
pub trait SwitchLinear: Send {
    /// `x`: [..., 1 | k, 1, in] (as mlx-lm's SwitchGLU passes it), `indices`:
    /// uint32 [..., k] expert ids -> [..., k, 1, out]. `sorted`: the indices
    /// are sorted (MLX then reads each expert's weights once).
    fn forward(&self, x: MlxArray, indices: MlxArray, sorted: bool) -> PResult<MlxArray>;
    /// (experts, in_features, out_features).
    fn dims(&self) -> abi_stable::std_types::Tuple3<u32, u32, u32>;
}

pub type LinearBox = Linear_TO<'static, RBox<()>>;
pub type SwitchLinearBox = SwitchLinear_TO<'static, RBox<()>>;
pub type EmbeddingBox = Embedding_TO<'static, RBox<()>>;
pub type WeightQuantBox = WeightQuant_TO<'static, RBox<()>>;
