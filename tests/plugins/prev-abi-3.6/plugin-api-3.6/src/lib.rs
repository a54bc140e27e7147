//! `rmlx-plugin-api`: the only contract between the rmlx host and its plugins.
//!
//! Everything that crosses the boundary is `StableAbi` (abi_stable): the root
//! module [`PluginModule`], the [`Manifest`], trait objects built with
//! `#[sabi_trait]`, and MLX arrays as owned mlx-c handles ([`MlxArray`]).
//! mlx-rs types never cross; plugins use mlx-rs inside and convert at the edge.
//!
//! Plugin authors implement the plain-Rust traits in [`author`] and call
//! [`export_plugin!`]; the adapters in this crate catch every panic and turn
//! every MLX error into a [`PluginError`] carrying MLX's own message.
//!
//! The API is append-only: new capabilities and methods go at the end of
//! prefix types (abi_stable), and [`ABI_MINOR`] counts those additions; an
//! older plugin whose root module is a prefix of today's still loads. Only a
//! breaking change bumps [`ABI_VERSION`] (the major), which the host refuses
//! on mismatch.

#![allow(non_local_definitions)] // abi_stable 0.11 macros

pub mod arch;
pub mod array;
pub mod author;
pub mod drafter;
pub mod error;
pub mod export;
pub mod kv;
pub mod manifest;
pub mod module;
pub mod wquant;

pub use abi_stable;
pub use arch::{
    cache_kind, output, AttendOptions, HEAD_STATE, LayerCache, AttendSpec, Attention, ForwardCtx, ForwardCtxMut, Model, ModelBox, ModelSpec, WeightSource,
    WeightSourceMut,
};
pub use array::MlxArray;
pub use error::{ErrorKind, PResult, PluginError};
pub use manifest::Manifest;
pub use module::{PluginModule, PluginRef};
pub use wquant::{
    Embedding, EmbeddingBox, Linear, LinearBox, NamedArray, QuantParams, SwitchLinear, SwitchLinearBox, WeightQuant,
    WeightQuantBox,
};

/// The plugin ABI's major version. The host refuses plugins built for another.
/// 2: `Attention` gained per-sequence offsets (`offsets()`, `batch()`) for batching.
/// 3: architectures take positions from `offsets()` for every batch size,
///    because the host may trace `forward` into a compiled graph.
pub const ABI_VERSION: u32 = 3;

/// The plugin ABI's minor version: appended, optional fields of the root
/// module. A plugin of an older minor (the same major) loads, and the host
/// treats its missing fields as absent; a plugin of a newer minor than the
/// host is refused, since it may rely on what the host does not provide.
/// 3.0: manifest, load_model, weight_quant, kv_family, drafter.
/// 3.1: `check_config` (an architecture vets a config without loading weights).
/// 3.2: `kv_codec` (KV-cache families: components, encode, attend);
///      `switch_linear` (MoE expert layers) and `WeightSource::switch_linear`.
/// 3.3: `Model::forward_ctx` with a host-lent `ForwardCtx`: attention options
///      (soft-cap, sinks, non-causal), logits of all/last positions or final
///      hidden states, hidden states of named layers, input embeddings,
///      per-row lengths, recurrent state (`state`/`set_state`); and
///      `Model::layers`: per-layer cache kinds (full, window, shared, state)
///      with per-layer heads and head size.
/// 3.4: fused linears (`WeightQuant::linear_fused`, `WeightSource::linear_fused`):
///      q/k/v and gate/up as one matmul, in every format whose tensors are
///      per output row.
/// 3.5: `arch::output::MEDIA`: a forward that runs the model's media encoder
///      (vision tower + projector) on pixel values and returns the features
///      that replace the image's placeholder tokens.
/// 3.6: drafter heads: `Model::conditioning` (the verifier layers an MTP or
///      Eagle-3 head conditions on, lent through `input_embeddings()`) and
///      `arch::HEAD_STATE` (the head's own state for chained draft steps).
pub const ABI_MINOR: u32 = 6;

/// Exported by every plugin as a plain C symbol, read before anything else.
pub const ABI_VERSION_SYMBOL: &[u8] = b"rmlx_plugin_abi_version\0";
/// Exported by plugins of ABI 3.1 and later: [`ABI_MINOR`] (absent means 0).
pub const ABI_MINOR_SYMBOL: &[u8] = b"rmlx_plugin_abi_minor\0";
/// Exported by every plugin: its id as a NUL-terminated string.
pub const ID_SYMBOL: &[u8] = b"rmlx_plugin_id\0";
