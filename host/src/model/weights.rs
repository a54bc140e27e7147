//! The host's side of `WeightSource`: hands an architecture its layers, each
//! built by the WeightQuant plugin that owns the module's format.
use super::quant::{Quant, QuantSpec};
use crate::plugins::{registry::into_anyhow, Registry};
use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RStr, RVec},
};
use anyhow::{anyhow, Result};
use mlx_rs::Array;
use rmlx_plugin_api::{
    author::guard,
    arch::{WeightSource, WeightSource_TO},
    EmbeddingBox, LinearBox, MlxArray, NamedArray, PResult, PluginError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

pub struct HostWeights<'a> {
    tensors: HashMap<String, Array>,
    quant: &'a QuantSpec,
    registry: &'a Registry,
    used: BTreeSet<String>,
    /// Module path -> how it was built, for `rmlx info`.
    pub layers: BTreeMap<String, Quant>,
}

impl<'a> HostWeights<'a> {
    /// Maps every weight file (MLX reads tensor data lazily).
    pub fn open(files: &[PathBuf], quant: &'a QuantSpec, registry: &'a Registry) -> Result<Self> {
        let mut tensors = HashMap::new();
        for f in files {
            let map = Array::load_safetensors(f).map_err(|e| anyhow!("{}: {e}", f.display()))?;
            tensors.extend(map);
        }
        Ok(Self { tensors, quant, registry, used: BTreeSet::new(), layers: BTreeMap::new() })
    }

    pub fn as_source(&mut self) -> rmlx_plugin_api::WeightSourceMut<'_> {
        WeightSource_TO::from_ptr(self, TD_Opaque)
    }

    /// Tensors the architecture never asked for.
    pub fn unused(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().filter(|k| !self.used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// The tensors of module `prefix` (`weight`, `scales`, ...) and its format.
    fn module(&mut self, prefix: &str) -> Result<(RVec<NamedArray>, Quant), PluginError> {
        let dot = format!("{prefix}.");
        let mut items = RVec::new();
        for (name, array) in &self.tensors {
            if let Some(local) = name.strip_prefix(&dot) {
                if !local.contains('.') {
                    items.push(NamedArray { name: local.into(), array: MlxArray::from_ref(array) });
                    self.used.insert(name.clone());
                }
            }
        }
        if !items.iter().any(|n| n.name == "weight") {
            return Err(PluginError::missing(format!("missing tensor {prefix}.weight")));
        }
        let has_scales = items.iter().any(|n| n.name == "scales");
        let q = self.quant.for_module(prefix, has_scales);
        self.layers.insert(prefix.to_string(), q.clone());
        Ok((items, q))
    }

    fn quant_plugin(&self, q: &Quant) -> Result<std::rc::Rc<rmlx_plugin_api::WeightQuantBox>, PluginError> {
        self.registry.weight_quant(&q.mode).map_err(|e| PluginError::unsupported(format!("{e:#}")))
    }
}

fn context<T>(r: PResult<T>, prefix: &str) -> Result<T, PluginError> {
    into_anyhow(r, "weight-quant").map_err(|e| PluginError::config(format!("{prefix}: {e:#}")))
}

impl WeightSource for HostWeights<'_> {
    fn linear(&mut self, prefix: RStr<'_>) -> PResult<LinearBox> {
        guard(|| {
            let (items, q) = self.module(prefix.as_str())?;
            let plugin = self.quant_plugin(&q)?;
            context(plugin.linear(items, q.params()), prefix.as_str())
        })
    }

    fn embedding(&mut self, prefix: RStr<'_>) -> PResult<EmbeddingBox> {
        guard(|| {
            let (items, q) = self.module(prefix.as_str())?;
            let plugin = self.quant_plugin(&q)?;
            context(plugin.embedding(items, q.params()), prefix.as_str())
        })
    }

    fn tensor(&mut self, name: RStr<'_>) -> PResult<MlxArray> {
        guard(|| {
            let a = self
                .tensors
                .get(name.as_str())
                .ok_or_else(|| PluginError::missing(format!("missing tensor {name}")))?;
            self.used.insert(name.to_string());
            Ok(MlxArray::from_ref(a))
        })
    }

    fn contains(&self, name: RStr<'_>) -> bool {
        self.tensors.contains_key(name.as_str())
    }
}
