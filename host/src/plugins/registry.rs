//! Resolves (capability, key) to the plugin that provides it. Two plugins
//! claiming the same key is an error at start.
use super::loader::{load_dir, LoadedPlugin, Refusal};
use abi_stable::std_types::{RResult, RStr};
use anyhow::{anyhow, bail, Result};
use rmlx_plugin_api::{author::kv::RemoteCodec, ModelBox, WeightQuantBox, WeightSourceMut};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct Registry {
    pub plugins: Vec<LoadedPlugin>,
    pub refused: Vec<Refusal>,
    architectures: BTreeMap<String, usize>,
    weight_quants: BTreeMap<String, usize>,
    kv_families: BTreeMap<String, usize>,
    drafters: BTreeMap<String, usize>,
    quant_cache: RefCell<HashMap<String, std::rc::Rc<WeightQuantBox>>>,
    codec_cache: RefCell<HashMap<String, std::rc::Rc<RemoteCodec>>>,
}

impl Registry {
    /// Loads the plugin directory and indexes what each plugin provides.
    pub fn load(dir: &Path) -> Result<Self> {
        let (plugins, refused) = load_dir(dir)?;
        Self::from_plugins(plugins, refused)
    }

    pub fn from_plugins(plugins: Vec<LoadedPlugin>, refused: Vec<Refusal>) -> Result<Self> {
        let mut reg = Registry {
            plugins,
            refused,
            architectures: BTreeMap::new(),
            weight_quants: BTreeMap::new(),
            kv_families: BTreeMap::new(),
            drafters: BTreeMap::new(),
            quant_cache: RefCell::new(HashMap::new()),
            codec_cache: RefCell::new(HashMap::new()),
        };
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        for (i, p) in reg.plugins.iter().enumerate() {
            if let Some(j) = ids.insert(p.info.id.clone(), i) {
                bail!(
                    "two plugins have the id `{}`: {} and {}",
                    p.info.id,
                    reg.plugins[j].path.display(),
                    p.path.display()
                );
            }
            let claims = [
                ("model_type", &p.info.architectures, &mut reg.architectures),
                ("quantization mode", &p.info.weight_quants, &mut reg.weight_quants),
                ("KV family", &p.info.kv_families, &mut reg.kv_families),
                ("drafter", &p.info.drafters, &mut reg.drafters),
            ];
            for (what, keys, index) in claims {
                for key in keys {
                    if let Some(j) = index.insert(key.clone(), i) {
                        bail!(
                            "{what} `{key}` is provided by two plugins: `{}` ({}) and `{}` ({})",
                            reg.plugins[j].info.id,
                            reg.plugins[j].path.display(),
                            p.info.id,
                            p.path.display()
                        );
                    }
                }
            }
        }
        Ok(reg)
    }

    pub fn architecture_plugin(&self, model_type: &str) -> Result<&LoadedPlugin> {
        self.architectures.get(model_type).map(|&i| &self.plugins[i]).ok_or_else(|| {
            anyhow!(
                "unknown model_type `{model_type}`: no loaded plugin provides it (known: {})",
                self.architectures.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn weight_quant_plugin(&self, mode: &str) -> Result<&LoadedPlugin> {
        self.weight_quants.get(mode).map(|&i| &self.plugins[i]).ok_or_else(|| {
            anyhow!(
                "unknown quantization mode `{mode}`: no loaded plugin provides it (known: {})",
                self.weight_quants.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The layer builder for a quantization mode (`none` for dense), made once.
    pub fn weight_quant(&self, mode: &str) -> Result<std::rc::Rc<WeightQuantBox>> {
        if let Some(q) = self.quant_cache.borrow().get(mode) {
            return Ok(q.clone());
        }
        let plugin = self.weight_quant_plugin(mode)?;
        let make = plugin
            .module
            .weight_quant()
            .ok_or_else(|| anyhow!("plugin `{}` lists mode `{mode}` but exports no weight_quant", plugin.info.id))?;
        let q = std::rc::Rc::new(into_anyhow(make(RStr::from(mode)), &plugin.info.id)?);
        self.quant_cache.borrow_mut().insert(mode.to_string(), q.clone());
        Ok(q)
    }

    /// The expert-layer (switch) builder of the plugin that owns `mode`.
    #[allow(clippy::type_complexity)]
    pub fn switch_linear_entry(
        &self,
        mode: &str,
    ) -> Result<
        extern "C" fn(
            RStr<'_>,
            abi_stable::std_types::RVec<rmlx_plugin_api::NamedArray>,
            rmlx_plugin_api::QuantParams,
        ) -> RResult<rmlx_plugin_api::SwitchLinearBox, rmlx_plugin_api::PluginError>,
    > {
        let plugin = self.weight_quant_plugin(mode)?;
        plugin.module.switch_linear().ok_or_else(|| {
            anyhow!("plugin `{}` builds no expert (switch) layers for `{mode}` (built for ABI 3.1 or older)", plugin.info.id)
        })
    }

    /// The KV family names the loaded plugins provide.
    pub fn kv_family_names(&self) -> Vec<String> {
        self.kv_families.keys().cloned().collect()
    }

    /// The codec of KV family `name` (ABI 3.2 `kv_codec`), made once.
    pub fn kv_codec(&self, name: &str) -> Result<std::rc::Rc<RemoteCodec>> {
        if let Some(c) = self.codec_cache.borrow().get(name) {
            return Ok(c.clone());
        }
        let plugin = self.kv_families.get(name).map(|&i| &self.plugins[i]).ok_or_else(|| {
            anyhow!(
                "unknown KV cache family `{name}` (known: {})",
                self.kv_families.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        let make = plugin.module.kv_codec().ok_or_else(|| {
            anyhow!("plugin `{}` lists KV family `{name}` but exports no kv_codec (built for ABI 3.1 or older)", plugin.info.id)
        })?;
        let c = std::rc::Rc::new(RemoteCodec(into_anyhow(make(RStr::from(name)), &plugin.info.id)?));
        self.codec_cache.borrow_mut().insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// The codec of family `name` for one layer's side, calibrated with
    /// `data` (what the family's `calibration()` names, e.g. `mean`).
    pub fn kv_codec_calibrated(&self, name: &str, data: Vec<(String, mlx_rs::Array)>) -> Result<RemoteCodec> {
        let plugin = self
            .kv_families
            .get(name)
            .map(|&i| &self.plugins[i])
            .ok_or_else(|| anyhow!("unknown KV cache family `{name}`"))?;
        let make = plugin.module.kv_codec_calibrated().ok_or_else(|| {
            anyhow!("plugin `{}` provides KV family `{name}` but takes no calibration (built before ABI 3.3)", plugin.info.id)
        })?;
        let data: abi_stable::std_types::RVec<rmlx_plugin_api::NamedArray> = data
            .into_iter()
            .map(|(n, a)| rmlx_plugin_api::NamedArray { name: n.into(), array: rmlx_plugin_api::MlxArray::from_array(a) })
            .collect();
        Ok(RemoteCodec(into_anyhow(make(RStr::from(name), data), &plugin.info.id)?))
    }

    /// Builds a model of `model_type` with the plugin that provides it.
    pub fn load_model(&self, model_type: &str, config_json: &str, weights: WeightSourceMut<'_>) -> Result<ModelBox> {
        let plugin = self.architecture_plugin(model_type)?;
        let load = plugin
            .module
            .load_model()
            .ok_or_else(|| anyhow!("plugin `{}` lists `{model_type}` but exports no load_model", plugin.info.id))?;
        into_anyhow(load(RStr::from(model_type), RStr::from(config_json), weights), &plugin.info.id)
    }

    /// Checks a model's config.json with the architecture plugin that would
    /// build it, without loading weights: an unknown `model_type`, or an
    /// option the plugin refuses, is an error naming it. Plugins built for
    /// ABI 3.0 have no check (`check_config` absent) and accept every config.
    pub fn check_config(&self, model_type: &str, config_json: &str) -> Result<()> {
        let plugin = self.architecture_plugin(model_type)?;
        match plugin.module.check_config() {
            Some(check) => into_anyhow(check(RStr::from(model_type), RStr::from(config_json)), &plugin.info.id),
            None => Ok(()),
        }
    }

    /// (capability, key, plugin id) for every claim, for `rmlx plugins`.
    pub fn claims(&self) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        for (what, index) in [
            ("architecture", &self.architectures),
            ("weight-quant", &self.weight_quants),
            ("kv-cache", &self.kv_families),
            ("drafter", &self.drafters),
        ] {
            for (k, &i) in index {
                out.push((what, k.clone(), self.plugins[i].info.id.clone()));
            }
        }
        out
    }
}

/// A plugin's error, with the plugin named.
pub fn into_anyhow<T>(r: RResult<T, rmlx_plugin_api::PluginError>, plugin: &str) -> Result<T> {
    match r {
        RResult::ROk(v) => Ok(v),
        RResult::RErr(e) => Err(anyhow!("{} (plugin `{plugin}`, {:?} error)", e.message, e.kind)),
    }
}
