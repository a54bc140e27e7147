//! `export_plugin!`: the one line a plugin crate needs to export itself.
use crate::{author::*, module::PluginModule, PluginRef};
use abi_stable::prefix_type::PrefixTypeTrait;
use std::ffi::{c_char, CString};
use std::sync::OnceLock;

/// Builds the root module for plugin `P`; capabilities follow its manifest.
pub fn root_module<P: PluginImpl>() -> PluginRef {
    let m = manifest_entry::<P>();
    PluginModule {
        manifest: manifest_entry::<P>,
        load_model: (!m.architectures.is_empty()).then_some(load_model_entry::<P> as _),
        weight_quant: (!m.weight_quants.is_empty()).then_some(weight_quant_entry::<P> as _),
        kv_family: None,
        drafter: None,
        check_config: (!m.architectures.is_empty()).then_some(check_config_entry::<P> as _),
        kv_codec: (!m.kv_families.is_empty()).then_some(kv_codec_entry::<P> as _),
        switch_linear: (!m.weight_quants.is_empty()).then_some(switch_linear_entry::<P> as _),
        kv_codec_calibrated: (!m.kv_families.is_empty()).then_some(kv_codec_calibrated_entry::<P> as _),
    }
    .leak_into_prefix()
}

/// The id symbol's backing string.
pub fn id_cstr<P: PluginImpl>(cell: &'static OnceLock<CString>) -> *const c_char {
    cell.get_or_init(|| {
        let id = manifest_entry::<P>().id.into_string();
        CString::new(id).unwrap_or_default()
    })
    .as_ptr()
}

/// Exports `$plugin` (a type implementing [`crate::author::PluginImpl`]) as an
/// rmlx plugin: the abi_stable root module plus two plain C symbols the host
/// reads first (`rmlx_plugin_abi_version`, `rmlx_plugin_abi_minor`,
/// `rmlx_plugin_id`).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[$crate::abi_stable::export_root_module]
        pub fn rmlx_plugin_root_module() -> $crate::PluginRef {
            $crate::export::root_module::<$plugin>()
        }

        #[no_mangle]
        pub extern "C" fn rmlx_plugin_abi_version() -> u32 {
            $crate::ABI_VERSION
        }

        #[no_mangle]
        pub extern "C" fn rmlx_plugin_abi_minor() -> u32 {
            $crate::ABI_MINOR
        }

        #[no_mangle]
        pub extern "C" fn rmlx_plugin_id() -> *const ::std::ffi::c_char {
            static ID: ::std::sync::OnceLock<::std::ffi::CString> = ::std::sync::OnceLock::new();
            $crate::export::id_cstr::<$plugin>(&ID)
        }
    };
}
