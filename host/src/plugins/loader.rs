//! Scans a directory for plugin libraries and loads each one, refusing files
//! that are not rmlx plugins or were built for another plugin ABI.
use abi_stable::library::{lib_header_from_path, RootModule};
use anyhow::{anyhow, bail, Context, Result};
use rmlx_plugin_api::{PluginRef, ABI_MINOR, ABI_MINOR_SYMBOL, ABI_VERSION, ABI_VERSION_SYMBOL, ID_SYMBOL};
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};

/// What a plugin says about itself (copied out of its manifest).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    pub id: String,
    pub version: String,
    pub description: String,
    /// The plugin ABI it was built for, `major.minor`.
    pub abi: String,
    pub architectures: Vec<String>,
    pub weight_quants: Vec<String>,
    pub kv_families: Vec<String>,
    pub drafters: Vec<String>,
}

pub struct LoadedPlugin {
    pub path: PathBuf,
    pub info: PluginInfo,
    pub module: PluginRef,
}

/// A file in the plugin directory that was not loaded, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub path: PathBuf,
    pub reason: String,
}

pub const LIB_EXT: &str = if cfg!(target_os = "macos") { "dylib" } else { "so" };

/// Loads every `*.so` (`*.dylib` on macOS) in `dir`, in name order.
pub fn load_dir(dir: &Path) -> Result<(Vec<LoadedPlugin>, Vec<Refusal>)> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("plugin directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == LIB_EXT))
        .collect();
    paths.sort();
    let mut loaded = Vec::new();
    let mut refused = Vec::new();
    for path in paths {
        match load_file(&path) {
            Ok(p) => loaded.push(p),
            Err(e) => refused.push(Refusal { path, reason: format!("{e:#}") }),
        }
    }
    Ok((loaded, refused))
}

/// Whether a plugin built for ABI `major.minor` can load here: the same
/// major, and a minor no newer than the host's (an older minor's root module
/// is a prefix of today's; its missing fields read as absent).
pub fn abi_check(id: &str, name: &str, major: u32, minor: u32) -> Result<()> {
    if major != ABI_VERSION {
        bail!(
            "plugin `{id}` ({name}) was built for plugin ABI {major}, but this rmlx speaks ABI {ABI_VERSION}: rebuild it against this rmlx-plugin-api"
        );
    }
    if minor > ABI_MINOR {
        bail!(
            "plugin `{id}` ({name}) was built for plugin ABI {major}.{minor}, newer than this rmlx's {ABI_VERSION}.{ABI_MINOR}: upgrade rmlx, or build the plugin against rmlx-plugin-api {ABI_VERSION}.{ABI_MINOR}"
        );
    }
    Ok(())
}

/// Loads one plugin. The library stays loaded for the life of the process.
pub fn load_file(path: &Path) -> Result<LoadedPlugin> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // 1. A loadable library at all?
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| anyhow!("{name}: not a loadable library: {e}"))?;
    // 2. An rmlx plugin, and of our ABI? Read plain C symbols before touching abi_stable.
    let abi: u32 = unsafe {
        let f = lib
            .get::<extern "C" fn() -> u32>(ABI_VERSION_SYMBOL)
            .map_err(|_| anyhow!("{name}: not an rmlx plugin (no rmlx_plugin_abi_version symbol)"))?;
        f()
    };
    let id = unsafe {
        lib.get::<extern "C" fn() -> *const c_char>(ID_SYMBOL)
            .ok()
            .map(|f| f())
            .filter(|p| !p.is_null())
            .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
            .unwrap_or_else(|| name.clone())
    };
    // Plugins built before ABI 3.1 export no minor: they are 3.0.
    let minor: u32 = unsafe { lib.get::<extern "C" fn() -> u32>(ABI_MINOR_SYMBOL).ok().map(|f| f()).unwrap_or(0) };
    abi_check(&id, &name, abi, minor)?;
    // 3. abi_stable checks the root module's layout and interface version.
    let incompatible = |e: &dyn std::fmt::Display| anyhow!("plugin `{id}` ({name}) has an incompatible interface: {e}");
    let header = lib_header_from_path(path).map_err(|e| incompatible(&e))?;
    let module = if minor < ABI_MINOR {
        // An older minor: its root module must be a prefix of ours. abi_stable
        // checks that a library has at least the interface's fields (a newer
        // library for an older host), so the older plugin's layout is checked
        // as the interface against ours; the fields it lacks read as absent
        // (`missing_field(default)`), because accessors look at the plugin's
        // own prefix metadata.
        let theirs = header.layout().ok_or_else(|| incompatible(&"its root module carries no layout"))?;
        abi_stable::abi_stability::abi_checking::check_layout_compatibility(theirs, <PluginRef as abi_stable::StableAbi>::LAYOUT)
            .map_err(|e| incompatible(&e))?;
        // SAFETY: the layout was just checked, as a prefix of the host's.
        unsafe { header.init_root_module_with_unchecked_layout::<PluginRef>() }.map_err(|e| incompatible(&e))?
    } else {
        header.init_root_module::<PluginRef>().map_err(|e| incompatible(&e))?
    };
    std::mem::forget(lib); // abi_stable also leaks it; plugins are never unloaded.
    let m = (module.manifest())();
    let strings = |v: &abi_stable::std_types::RVec<abi_stable::std_types::RString>| {
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let info = PluginInfo {
        id: m.id.to_string(),
        version: m.version.to_string(),
        description: m.description.to_string(),
        abi: format!("{abi}.{minor}"),
        architectures: strings(&m.architectures),
        weight_quants: strings(&m.weight_quants),
        kv_families: strings(&m.kv_families),
        drafters: strings(&m.drafters),
    };
    let _ = PluginRef::NAME;
    Ok(LoadedPlugin { path: path.to_path_buf(), info, module })
}
