//! Per-task LoRA adapters stored beside a checkpoint, as PEFT saves a
//! multi-task adapter (jina-embeddings-v4's `MultiAdapterLinear`):
//! `adapters/adapter_config.json` (a PEFT `LoraConfig`) and
//! `adapters/adapter_model.safetensors`, whose tensors are
//! `base_model.model.<module>.lora_A.<task>.weight` [r, in] and
//! `...lora_B.<task>.weight` [out, r] for every adapted module and every task
//! of config.json's `task_names`.
//!
//! The host applies them, not the architecture: `HostWeights::linear` wraps
//! each adapted module's layer (built by its WeightQuant plugin as usual) in
//! a [`LoraLinear`] that computes `base(x) + s * B_t(A_t(x))` with `s =
//! lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`) and `t` the
//! task selected for the forward ([`TaskAdapters::select`]; none: the base
//! layer alone). So any architecture serves such a checkpoint unchanged, and
//! the task is chosen per request (the embedding engine selects it around
//! the forwards of one task's rows). Adapted modules are never fused
//! (`linear_fused` answers Unsupported for them, and the architecture keeps
//! q/k/v apart).
//!
//! Module names: `<module>` is the module's path in the live model, which may
//! differ from the stored base weights' names by a `language_model.` segment
//! (transformers >= 4.52 names Qwen2.5-VL's text layers
//! `model.language_model.layers.N` while the checkpoint stores
//! `model.layers.N`; mlx-vlm stores `language_model.model.layers.N`): names
//! are compared with every `language_model.` removed.
//!
//! Refused by name: `use_dora`, `fan_in_fan_out`, a `bias` other than
//! `none` (LoRA biases), `modules_to_save`, `rank_pattern` /
//! `alpha_pattern`, a tensor outside the naming above, a task missing from
//! `task_names`, a module without both matrices for every task, shapes that
//! do not match the base layer.
use abi_stable::std_types::{RResult, Tuple2};
use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::Array;
use rmlx_plugin_api::{
    author::{linear_box, LinearImpl},
    LinearBox, PluginError,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// No task selected: adapted layers compute the base layer alone.
const NONE: usize = usize::MAX;

/// One module's matrices per task, transposed for `x @ A^T @ B^T`.
#[derive(Clone)]
struct ModuleLora {
    a_t: Vec<Array>, // per task: [in, r]
    b_t: Vec<Array>, // per task: [r, out]
}

pub struct TaskAdapters {
    /// config.json's `task_names`, in order: a task's index selects it.
    pub tasks: Vec<String>,
    pub rank: i32,
    pub scale: f32,
    /// Normalised module path -> matrices.
    modules: BTreeMap<String, ModuleLora>,
    /// Modules some layer was built with.
    used: Mutex<BTreeSet<String>>,
    selected: Arc<AtomicUsize>,
}

/// A module path with every `language_model.` segment removed.
fn normalise(module: &str) -> String {
    module.replace("language_model.", "")
}

impl TaskAdapters {
    /// The adapters of the model in `dir` (None when it has no
    /// `adapters/adapter_config.json`), in `dtype`.
    pub fn open(dir: &Path, config: &Value, dtype: mlx_rs::Dtype) -> Result<Option<Self>> {
        let ad = dir.join("adapters");
        let cfg_path = ad.join("adapter_config.json");
        if !cfg_path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: malformed JSON: {e}", cfg_path.display()))?;
        let (rank, scale) = lora_scale(&cfg).with_context(|| format!("{}", cfg_path.display()))?;
        let tasks: Vec<String> = config
            .get("task_names")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{}: adapters/ holds task adapters but config.json has no `task_names` list", dir.display()))?
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| anyhow!("config.json: `task_names` must be strings")))
            .collect::<Result<_>>()?;
        if tasks.is_empty() {
            bail!("config.json: `task_names` is empty");
        }
        let file = ad.join("adapter_model.safetensors");
        if !file.is_file() {
            bail!("{}: adapters/adapter_config.json without adapters/adapter_model.safetensors", dir.display());
        }
        let tensors = Array::load_safetensors(&file).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        // module -> task -> (A, B)
        let mut found: BTreeMap<String, BTreeMap<usize, (Option<Array>, Option<Array>)>> = BTreeMap::new();
        for (name, array) in tensors {
            let bad = || anyhow!("{}: tensor `{name}` is not `base_model.model.<module>.lora_A|lora_B.<task>.weight`", file.display());
            let rest = name.strip_prefix("base_model.model.").ok_or_else(bad)?;
            let (module, which, tail) = if let Some((m, t)) = rest.split_once(".lora_A.") {
                (m, 'A', t)
            } else if let Some((m, t)) = rest.split_once(".lora_B.") {
                (m, 'B', t)
            } else {
                return Err(bad());
            };
            let task = tail.strip_suffix(".weight").ok_or_else(bad)?;
            let t = tasks
                .iter()
                .position(|x| x == task)
                .ok_or_else(|| anyhow!("{}: tensor `{name}` is for task `{task}`, which config.json's task_names {tasks:?} lacks", file.display()))?;
            let a = array.as_dtype(dtype)?;
            let slot = found.entry(normalise(module)).or_default().entry(t).or_insert((None, None));
            if which == 'A' {
                slot.0 = Some(a);
            } else {
                slot.1 = Some(a);
            }
        }
        if found.is_empty() {
            bail!("{}: no adapter tensors", file.display());
        }
        let mut modules = BTreeMap::new();
        for (m, per) in found {
            let (mut a_t, mut b_t) = (Vec::new(), Vec::new());
            for (t, task) in tasks.iter().enumerate() {
                let Some((Some(a), Some(b))) = per.get(&t) else {
                    bail!("{}: module `{m}` lacks lora_A or lora_B for task `{task}`", file.display());
                };
                if a.ndim() != 2 || b.ndim() != 2 || a.dim(0) != rank || b.dim(1) != rank {
                    bail!("{}: module `{m}` task `{task}`: A {:?} / B {:?} are not [r, in] / [out, r] with r = {rank}", file.display(), a.shape(), b.shape());
                }
                a_t.push(a.t()); // [in, r]
                b_t.push(b.t()); // [r, out]
            }
            modules.insert(m, ModuleLora { a_t, b_t });
        }
        Ok(Some(Self { tasks, rank, scale, modules, used: Mutex::new(BTreeSet::new()), selected: Arc::new(AtomicUsize::new(NONE)) }))
    }

    /// Whether module `prefix` (as the architecture names it) is adapted.
    pub fn adapts(&self, prefix: &str) -> bool {
        self.modules.contains_key(&normalise(prefix))
    }

    /// `base` with module `prefix`'s adapters, or `base` when it has none.
    pub fn wrap(&self, prefix: &str, base: LinearBox) -> Result<LinearBox, PluginError> {
        let key = normalise(prefix);
        let Some(m) = self.modules.get(&key) else {
            return Ok(base);
        };
        let Tuple2(din, dout) = base.dims();
        let (a, b) = (&m.a_t[0], &m.b_t[0]);
        if a.dim(0) != din as i32 || b.dim(1) != dout as i32 {
            return Err(PluginError::config(format!(
                "{prefix}: adapter matrices [{}, r] / [r, {}] do not fit the layer's ({din} -> {dout})",
                a.dim(0),
                b.dim(1)
            )));
        }
        self.used.lock().unwrap().insert(key);
        Ok(linear_box(Box::new(LoraLinear { base, lora: m.clone(), scale: self.scale, selected: self.selected.clone() })))
    }

    /// How many modules are adapted.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// Adapted modules no layer was built with (sorted).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        self.modules.keys().filter(|m| !used.contains(*m)).cloned().collect()
    }

    /// The task of the next forwards (an index into `tasks`), or none.
    pub fn select(&self, task: Option<usize>) {
        self.selected.store(task.filter(|&t| t < self.tasks.len()).unwrap_or(NONE), Ordering::SeqCst);
    }

    pub fn selected(&self) -> Option<usize> {
        let t = self.selected.load(Ordering::SeqCst);
        (t != NONE).then_some(t)
    }
}

/// (r, scale) of a PEFT LoraConfig, refusing what this host does not apply.
fn lora_scale(cfg: &Value) -> Result<(i32, f32)> {
    if let Some(t) = cfg.get("peft_type").and_then(Value::as_str).filter(|t| *t != "LORA") {
        bail!("peft_type `{t}` is not supported (LORA is)");
    }
    let on = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    for k in ["use_dora", "fan_in_fan_out"] {
        if on(k) {
            bail!("`{k}: true` is not supported");
        }
    }
    if let Some(b) = cfg.get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        bail!("`bias: {b}` is not supported (none is)");
    }
    for k in ["modules_to_save", "rank_pattern", "alpha_pattern"] {
        let set = match cfg.get(k) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        if set {
            bail!("`{k}` is not supported");
        }
    }
    let r = cfg.get("r").and_then(Value::as_i64).filter(|&r| r > 0).ok_or_else(|| anyhow!("`r` must be a positive integer"))?;
    let alpha = cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let scale = if on("use_rslora") { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
    Ok((r as i32, scale as f32))
}

/// A linear layer plus the selected task's low-rank update.
struct LoraLinear {
    base: LinearBox,
    lora: ModuleLora,
    scale: f32,
    selected: Arc<AtomicUsize>,
}

impl LinearImpl for LoraLinear {
    /// x: [..., in] -> [..., out]
    fn forward(&self, x: &Array) -> rmlx_plugin_api::author::Result<Array> {
        let y = match self.base.forward(rmlx_plugin_api::MlxArray::from_ref(x)) {
            RResult::ROk(y) => y.into_array(), // [..., out]
            RResult::RErr(e) => return Err(e),
        };
        let t = self.selected.load(Ordering::SeqCst);
        if t >= self.lora.a_t.len() {
            return Ok(y);
        }
        let d = x.matmul(&self.lora.a_t[t])?.matmul(&self.lora.b_t[t])?; // [..., r] -> [..., out]
        let s = Array::from_f32(self.scale).as_dtype(d.dtype())?;
        Ok(y.add(&d.multiply(&s)?)?)
    }

    fn dims(&self) -> (u32, u32) {
        let Tuple2(i, o) = self.base.dims();
        (i, o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scales_and_refusals() {
        assert_eq!(lora_scale(&json!({"r": 4, "lora_alpha": 8})).unwrap(), (4, 2.0));
        assert_eq!(lora_scale(&json!({"r": 4, "lora_alpha": 8, "use_rslora": true})).unwrap(), (4, 4.0));
        for (cfg, word) in [
            (json!({"r": 4, "use_dora": true}), "use_dora"),
            (json!({"r": 4, "bias": "all"}), "bias"),
            (json!({"r": 4, "modules_to_save": ["lm_head"]}), "modules_to_save"),
            (json!({"r": 0}), "`r`"),
            (json!({"peft_type": "IA3", "r": 4}), "IA3"),
        ] {
            let e = lora_scale(&cfg).unwrap_err();
            assert!(format!("{e}").contains(word), "{e}");
        }
        assert_eq!(normalise("model.language_model.layers.0.mlp.up_proj"), "model.layers.0.mlp.up_proj");
        assert_eq!(normalise("language_model.model.layers.0.mlp.up_proj"), "model.layers.0.mlp.up_proj");
    }
}
