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
//! The API is append-only: new capabilities and methods go at the end, and
//! [`ABI_VERSION`] is bumped on any change a loaded plugin could observe.

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
pub use arch::{Attention, AttendOptions, Model, ModelBox, ModelSpec, WeightSource, WeightSourceMut};
pub use array::MlxArray;
pub use error::{ErrorKind, PResult, PluginError};
pub use manifest::Manifest;
pub use module::{PluginModule, PluginRef};
pub use wquant::{Embedding, EmbeddingBox, Linear, LinearBox, NamedArray, QuantParams, WeightQuant, WeightQuantBox};

/// The plugin ABI this crate speaks. The host refuses plugins built for another.
/// 2: `Attention` gained per-sequence offsets (`offsets()`, `batch()`) for batching.
/// 3: architectures take positions from `offsets()` for every batch size,
///    because the host may trace `forward` into a compiled graph.
pub const ABI_VERSION: u32 = 3;

/// Exported by every plugin as a plain C symbol, read before anything else.
pub const ABI_VERSION_SYMBOL: &[u8] = b"rmlx_plugin_abi_version\0";
/// Exported by every plugin: its id as a NUL-terminated string.
pub const ID_SYMBOL: &[u8] = b"rmlx_plugin_id\0";
