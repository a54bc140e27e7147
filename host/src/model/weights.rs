//! The host's side of `WeightSource`: hands an architecture its layers, each
//! built by the WeightQuant plugin that owns the module's format (chosen by
//! `QuantSpec::for_tensors` from the module's tensor names). A module marked
//! `at_load` (ParoQuant's dense `embed_tokens`/`lm_head`) is quantized here
//! with MLX's affine `quantize` first, as ParoQuant's own loader does.
use super::policy::{self, LoadPolicy};
use super::quant::{Quant, QuantSpec};
use crate::plugins::{registry::into_anyhow, Registry};
use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RStr, RString, RVec, Tuple2},
};
use anyhow::{anyhow, Result};
use mlx_rs::Array;
use rmlx_plugin_api::{
    arch::{WeightSource, WeightSource_TO},
    author::guard,
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
    /// Groups of modules built as one fused linear (`q_proj+k_proj+v_proj`).
    pub fused: Vec<String>,
    /// Affine layers become dense at load (`LoadPolicy::dequantize`).
    dequantize: bool,
    /// Where a module or tensor this source lacks is looked up next
    /// (`with_fallback`): a drafter head's sidecar directory first, then the
    /// verifier's checkpoint, each read under its own quantization config.
    fallback: Option<Box<HostWeights<'a>>>,
    /// Per-task LoRA adapters (adapters.rs): the layers of adapted modules
    /// are wrapped so that the selected task's update is added.
    adapters: Option<std::sync::Arc<super::adapters::TaskAdapters>>,
}

impl<'a> HostWeights<'a> {
    /// Maps every weight file (MLX reads tensor data lazily).
    /// Fails first if config.json's `quant_method` is one no loaded plugin serves.
    pub fn open(files: &[PathBuf], quant: &'a QuantSpec, registry: &'a Registry) -> Result<Self> {
        Self::open_with(files, quant, registry, policy::get())
    }

    /// `open` under an explicit load policy (compute dtype, dequantize).
    pub fn open_with(files: &[PathBuf], quant: &'a QuantSpec, registry: &'a Registry, policy: LoadPolicy) -> Result<Self> {
        quant.check_method(&|m| registry.weight_quant_plugin(m).is_ok())?;
        let mut tensors = HashMap::new();
        for f in files {
            let map = Array::load_safetensors(f).map_err(|e| anyhow!("{}: {e}", f.display()))?;
            tensors.extend(map);
        }
        let dtype = policy.dtype.target();
        if let Some(dt) = dtype {
            for a in tensors.values_mut() {
                if is_float(a.dtype()) && a.dtype() != dt {
                    *a = a.as_dtype(dt)?;
                }
            }
        }
        Ok(Self {
            tensors,
            quant,
            registry,
            used: BTreeSet::new(),
            layers: BTreeMap::new(),
            fused: Vec::new(),
            dequantize: policy.dequantize,
            fallback: None,
            adapters: None,
        })
    }

    /// Layers of the modules `adapters` adapts come wrapped with them.
    pub fn with_adapters(mut self, adapters: std::sync::Arc<super::adapters::TaskAdapters>) -> Self {
        self.adapters = Some(adapters);
        self
    }

    /// Two directories as one source: a module or tensor is this one's when
    /// it has it, else `next`'s (e.g. an Eagle-3 head's sidecar checkpoint,
    /// then the verifier's for the embedding it shares). `unused` reports
    /// this source's tensors only; `layers` and `fused` gather both.
    pub fn with_fallback(mut self, next: HostWeights<'a>) -> Self {
        self.fallback = Some(Box::new(next));
        self
    }

    /// Whether this source (not its fallback) holds module `prefix`: a
    /// tensor under `prefix.` or the bare tensor `prefix`.
    fn has_module(&self, prefix: &str) -> bool {
        let dot = format!("{prefix}.");
        self.tensors.contains_key(prefix) || self.tensors.keys().any(|n| n.strip_prefix(&dot).is_some_and(|l| !l.contains('.')))
    }

    /// The source that answers for module `prefix`: this one, or the
    /// fallback when only it has the module.
    fn owner_of_module(&mut self, prefix: &str) -> &mut Self {
        // (has_module scans the tensor names: only a stacked source pays it.)
        if self.fallback.is_some() && !self.has_module(prefix) && self.fallback.as_ref().is_some_and(|f| f.has_module(prefix)) {
            return self.fallback.as_mut().unwrap().owner_of_module(prefix);
        }
        self
    }

    /// The source that answers for tensor `name` (as `owner_of_module`).
    fn owner_of_tensor(&mut self, name: &str) -> &mut Self {
        if !self.tensors.contains_key(name) && self.fallback.as_ref().is_some_and(|f| f.contains_tensor(name)) {
            return self.fallback.as_mut().unwrap().owner_of_tensor(name);
        }
        self
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.fallback.as_ref().is_some_and(|f| f.contains_tensor(name))
    }

    /// Module path -> how it was built, over this source and its fallback.
    pub fn take_layers(&mut self) -> BTreeMap<String, Quant> {
        let mut layers = std::mem::take(&mut self.layers);
        if let Some(f) = &mut self.fallback {
            layers.extend(f.take_layers());
        }
        layers
    }

    /// Groups built as one fused linear, over this source and its fallback.
    pub fn fused_count(&self) -> usize {
        self.fused.len() + self.fallback.as_ref().map_or(0, |f| f.fused_count())
    }

    pub fn as_source(&mut self) -> rmlx_plugin_api::WeightSourceMut<'_> {
        WeightSource_TO::from_ptr(self, TD_Opaque)
    }

    /// The activations' dtype: float32 when `activation_bytes` is 4, else
    /// bfloat16 when the model's float tensors are, else float16.
    pub fn activation_dtype(&self) -> mlx_rs::Dtype {
        if self.activation_bytes() == 4 {
            mlx_rs::Dtype::Float32
        } else if self.tensors.values().any(|a| a.dtype() == mlx_rs::Dtype::Bfloat16) {
            mlx_rs::Dtype::Bfloat16
        } else {
            mlx_rs::Dtype::Float16
        }
    }

    /// Bytes per activation value (and so per KV-cache value): 4 when any
    /// norm-like (1-D) tensor or quantization scale is float32 (MLX promotes
    /// the activations to it), else 2.
    /// With a fallback, the wider of the two (the head computes in the
    /// verifier's dtype where it reads the verifier's tensors).
    pub fn activation_bytes(&self) -> u64 {
        let f32_seen = self
            .tensors
            .iter()
            .any(|(n, a)| a.dtype() == mlx_rs::Dtype::Float32 && (a.ndim() == 1 || n.ends_with(".scales")));
        if f32_seen || self.fallback.as_ref().is_some_and(|f| f.activation_bytes() == 4) {
            4
        } else {
            2
        }
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
        // A module stored as one bare tensor (Hugging Face's fused expert
        // parameters `experts.gate_up_proj` / `experts.down_proj`) is that
        // module's weight.
        if items.is_empty() {
            if let Some(array) = self.tensors.get(prefix) {
                items.push(NamedArray { name: "weight".into(), array: MlxArray::from_ref(array) });
                self.used.insert(prefix.to_string());
            }
        }
        if !items.iter().any(|n| n.name == "weight") {
            return Err(PluginError::missing(format!("missing tensor {prefix}.weight")));
        }
        let mut q = self.quant.for_tensors(prefix, &|local| items.iter().any(|n| n.name == local));
        if q.at_load {
            match quantize_at_load(&mut items, &q) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "{prefix}: input dimension not a multiple of group size {}; left dense",
                        q.group_size
                    );
                    q = Quant::dense();
                }
                Err(e) => return Err(PluginError::config(format!("{prefix}: quantizing at load: {e}"))),
            }
        }
        if self.dequantize && q.mode == "affine" && !q.at_load {
            dequantize_at_load(&mut items, &q).map_err(|e| PluginError::config(format!("{prefix}: dequantizing at load: {e}")))?;
            q = Quant::dense();
        }
        self.layers.insert(prefix.to_string(), q.clone());
        Ok((items, q))
    }

    fn quant_plugin(&self, q: &Quant) -> Result<std::rc::Rc<rmlx_plugin_api::WeightQuantBox>, PluginError> {
        self.registry.weight_quant(&q.mode).map_err(|e| PluginError::unsupported(format!("{e:#}")))
    }
}

/// Replaces a dense `weight` by MLX affine `weight`/`scales`/`biases` at
/// `q`'s bits and group size (what `mlx.nn.quantize` computes). `Ok(false)`:
/// the input dimension does not divide by the group size (left dense).
/// Expert weights [E, out, in] quantize along `in` like any other (MLX
/// quantizes the last axis), as mlx-lm's `SwitchLinear.to_quantized`.
fn quantize_at_load(items: &mut RVec<NamedArray>, q: &Quant) -> Result<bool, mlx_rs::error::Exception> {
    let i = items.iter().position(|n| n.name == "weight").expect("checked by module()");
    let w = items[i].array.clone().into_array();
    if !(2..=3).contains(&w.ndim()) || w.dim(-1) % q.group_size != 0 {
        return Ok(false);
    }
    let (wq, scales, biases) = mlx_rs::ops::quantize(&w, q.group_size, q.bits)?;
    items.remove(i);
    for (name, a) in [("weight", wq), ("scales", scales), ("biases", biases)] {
        items.push(NamedArray { name: name.into(), array: MlxArray::from_array(a) });
    }
    Ok(true)
}

/// Replaces affine `weight`/`scales`/`biases` by the dense `weight` they
/// encode, in the scales' dtype (what `mx.dequantize` computes); expert
/// layers' stacked [E, ...] tensors become a dense [E, out, in].
fn dequantize_at_load(items: &mut RVec<NamedArray>, q: &Quant) -> Result<(), mlx_rs::error::Exception> {
    let take = |items: &mut RVec<NamedArray>, name: &str| -> Option<Array> {
        let i = items.iter().position(|n| n.name == name)?;
        Some(items.remove(i).array.into_array())
    };
    let (Some(w), Some(scales)) = (take(items, "weight"), take(items, "scales")) else {
        return Ok(());
    };
    let biases = take(items, "biases");
    let dense = mlx_rs::ops::dequantize(&w, &scales, biases.as_ref(), q.group_size, q.bits)?;
    dense.eval()?;
    items.push(NamedArray { name: "weight".into(), array: MlxArray::from_array(dense) });
    Ok(())
}

fn is_float(d: mlx_rs::Dtype) -> bool {
    matches!(d, mlx_rs::Dtype::Float16 | mlx_rs::Dtype::Bfloat16 | mlx_rs::Dtype::Float32)
}

fn context<T>(r: PResult<T>, prefix: &str) -> Result<T, PluginError> {
    into_anyhow(r, "weight-quant").map_err(|e| PluginError::config(format!("{prefix}: {e:#}")))
}

impl WeightSource for HostWeights<'_> {
    fn linear(&mut self, prefix: RStr<'_>) -> PResult<LinearBox> {
        guard(|| {
            let adapters = self.adapters.clone();
            let this = self.owner_of_module(prefix.as_str());
            let (items, q) = this.module(prefix.as_str())?;
            let plugin = this.quant_plugin(&q)?;
            let layer = context(plugin.linear(items, q.params()), prefix.as_str())?;
            match adapters {
                Some(a) => a.wrap(prefix.as_str(), layer),
                None => Ok(layer),
            }
        })
    }

    fn linear_fused(&mut self, prefixes: RVec<RString>) -> PResult<Tuple2<LinearBox, RVec<u32>>> {
        guard(|| {
            // RMLX_FUSED_LINEARS=0: load every projection on its own (A/B runs).
            if std::env::var("RMLX_FUSED_LINEARS").is_ok_and(|v| v == "0") {
                return Err(PluginError::unsupported("fused linears are off (RMLX_FUSED_LINEARS=0)"));
            }
            // Adapted modules stay apart: each adds its own low-rank update.
            if let Some(a) = &self.adapters {
                if let Some(p) = prefixes.iter().find(|p| a.adapts(p.as_str())) {
                    return Err(PluginError::unsupported(format!("{p} has LoRA adapters; not fused")));
                }
            }
            // Every part from one directory, or the layers stay apart.
            let owners: Vec<bool> = match self.fallback {
                Some(_) => prefixes.iter().map(|p| self.has_module(p.as_str())).collect(),
                None => Vec::new(),
            };
            if owners.iter().any(|&o| o != owners[0]) {
                return Err(PluginError::unsupported("the parts come from two directories; not fused"));
            }
            let this = match prefixes.first() {
                Some(p) => self.owner_of_module(p.as_str()),
                None => self,
            };
            let mut parts = RVec::with_capacity(prefixes.len());
            let mut params = None;
            for p in &prefixes {
                let (items, q) = this.module(p.as_str())?;
                let qp = q.params();
                match &params {
                    None => params = Some(qp),
                    Some(first) if *first != qp => {
                        return Err(PluginError::unsupported(format!("{p}: format {qp:?} differs from {first:?}; not fused")));
                    }
                    Some(_) => {}
                }
                parts.push(items);
            }
            let params = params.ok_or_else(|| PluginError::config("a fused linear of no layers"))?;
            let plugin = this.quant_plugin(&Quant::new(params.mode.as_str(), params.bits, params.group_size))?;
            let joined = prefixes.iter().map(|p| p.as_str()).collect::<Vec<_>>().join("+");
            match plugin.linear_fused(parts, params).into_result() {
                Ok(r) => {
                    this.fused.push(joined);
                    Ok(r)
                }
                Err(e) if e.kind == rmlx_plugin_api::ErrorKind::Unsupported => Err(e),
                Err(e) => Err(PluginError::config(format!("{joined}: {e}"))),
            }
        })
    }

    fn embedding(&mut self, prefix: RStr<'_>) -> PResult<EmbeddingBox> {
        guard(|| {
            let this = self.owner_of_module(prefix.as_str());
            let (items, q) = this.module(prefix.as_str())?;
            let plugin = this.quant_plugin(&q)?;
            context(plugin.embedding(items, q.params()), prefix.as_str())
        })
    }

    fn switch_linear(&mut self, prefix: RStr<'_>) -> PResult<rmlx_plugin_api::SwitchLinearBox> {
        guard(|| {
            let this = self.owner_of_module(prefix.as_str());
            let (items, q) = this.module(prefix.as_str())?;
            let make = this
                .registry
                .switch_linear_entry(&q.mode)
                .map_err(|e| PluginError::unsupported(format!("{prefix}: {e:#}")))?;
            context(make(RStr::from(q.mode.as_str()), items, q.params()), prefix.as_str())
        })
    }

    fn tensor(&mut self, name: RStr<'_>) -> PResult<MlxArray> {
        guard(|| {
            let this = self.owner_of_tensor(name.as_str());
            let a = this
                .tensors
                .get(name.as_str())
                .ok_or_else(|| PluginError::missing(format!("missing tensor {name}")))?;
            this.used.insert(name.to_string());
            Ok(MlxArray::from_ref(a))
        })
    }

    fn contains(&self, name: RStr<'_>) -> bool {
        self.contains_tensor(name.as_str())
    }
}
