//! Plugin loading (loader.rs) and capability lookup (registry.rs).
pub mod loader;
pub mod registry;

pub use loader::{LoadedPlugin, PluginInfo, Refusal};
pub use registry::Registry;
