//! The abi_stable root module every plugin exports.
use crate::{
    arch::{ModelBox, WeightSourceMut},
    drafter::DrafterBox,
    kv::{KvCodecBox, KvFamilyBox},
    wquant::{NamedArray, QuantParams, SwitchLinearBox, WeightQuantBox},
    Manifest, PResult,
};
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RStr, RVec},
    StableAbi,
};

/// Entry points. A capability a plugin lacks is `None`. Append-only: new
/// fields go after the last one, with `missing_field(default)`, so that a
/// plugin built for an older minor ABI (a prefix of these fields) loads and
/// reads as `None` for the fields it lacks.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    pub manifest: extern "C" fn() -> Manifest,
    /// Architecture: build a model of `model_type` from config.json text and weights.
    pub load_model: Option<extern "C" fn(RStr<'_>, RStr<'_>, WeightSourceMut<'_>) -> PResult<ModelBox>>,
    /// WeightQuant: the layer builder for a `quantization.mode`.
    pub weight_quant: Option<extern "C" fn(RStr<'_>) -> PResult<WeightQuantBox>>,
    /// KvCache (3.0, never implemented; superseded by `kv_codec`).
    pub kv_family: Option<extern "C" fn(RStr<'_>) -> PResult<KvFamilyBox>>,
    /// Drafter: a drafter of a kind, with its config JSON.
    #[sabi(last_prefix_field)]
    pub drafter: Option<extern "C" fn(RStr<'_>, RStr<'_>) -> PResult<DrafterBox>>,
    // ---- ABI 3.1 (optional: absent in plugins built for 3.0) ----
    /// Architecture: checks a config.json for `model_type` without loading
    /// weights, refusing options it does not implement by name, so the host
    /// can list a model as unavailable with the reason before loading it.
    #[sabi(missing_field(default))]
    pub check_config: Option<extern "C" fn(RStr<'_>, RStr<'_>) -> PResult<()>>,
    // ---- ABI 3.2 ----
    /// KvCache: the codec of a KV family by name (`f16`, `q4`, `turbo3`, ...),
    /// for one side (keys or values) of the cache.
    #[sabi(missing_field(default))]
    pub kv_codec: Option<extern "C" fn(RStr<'_>) -> PResult<KvCodecBox>>,
    /// WeightQuant: all experts of an MoE projection in format `mode`, from
    /// the module's tensors (`weight` [experts, out, in], `scales`, ...).
    #[sabi(missing_field(default))]
    pub switch_linear: Option<extern "C" fn(RStr<'_>, RVec<NamedArray>, QuantParams) -> PResult<SwitchLinearBox>>,
    // ---- ABI 3.3 ----
    /// KvCache: the codec of a family for one layer's side, with the
    /// calibration arrays its `KvCodec::calibration` names (e.g. `mean` [K, D]).
    #[sabi(missing_field(default))]
    pub kv_codec_calibrated: Option<extern "C" fn(RStr<'_>, RVec<NamedArray>) -> PResult<KvCodecBox>>,
}

impl RootModule for PluginRef {
    declare_root_module_statics! {PluginRef}
    const BASE_NAME: &'static str = "rmlx_plugin";
    const NAME: &'static str = "rmlx_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
