//! A model built by its architecture plugin from a model directory.
use crate::model::{policy::LoadPolicy, quant::Quant, weights::HostWeights, ModelDir, QuantSpec};
use super::kv_pool::KvSide;
use super::attend::{ForwardOut, ForwardRequest, KvStore};
use mlx_rs::Array;
use crate::plugins::Registry;
use anyhow::{Context, Result};
use rmlx_plugin_api::{cache_kind, LayerCache, ModelBox, ModelSpec};
use std::collections::BTreeMap;
use std::path::Path;

pub struct LoadedModel {
    pub dir: ModelDir,
    pub model: ModelBox,
    pub spec: ModelSpec,
    /// Module path -> how it is stored.
    pub layers: BTreeMap<String, Quant>,
    /// Tensors in the files the architecture did not use.
    pub unused: Vec<String>,
    pub architecture_plugin: String,
    /// The plugin ABI (major, minor) the architecture plugin was built for.
    pub plugin_abi: (u32, u32),
    /// A drafter head's conditioning layers (`Model::conditioning`, ABI 3.6):
    /// the verifier layers whose hidden states it reads; empty for a model.
    pub conditioning: Vec<i32>,
    /// Bytes per activation value (the activations' dtype, after the load policy).
    pub kv_bytes: u64,
    /// The KV-cache families of its keys and values (`kv_family::resolve`).
    pub kv: (KvSide, KvSide),
    /// Per layer, how it caches (ABI 3.3 `Model::layers`); empty: every
    /// layer as `spec` says.
    pub cache_layers: Vec<LayerCache>,
    /// The directory's `kv_calibration.safetensors`, when it has one.
    pub kv_calibration: Option<std::rc::Rc<super::kv_calibration::KvCalibration>>,
    /// Groups of projections built as one fused linear (ABI 3.4), e.g. two
    /// per layer (q/k/v, gate/up) where the weight format stacks.
    pub fused_linears: usize,
    /// The server's drafters for speculative decoding (`rmlx serve
    /// --draft-model`, `--drafter`), loaded beside this one, one per kind;
    /// the first is the default, a request names another by kind
    /// (speculative/serve.rs).
    pub drafters: Vec<super::speculative::serve::Drafter>,
    /// Per-task LoRA adapters from the directory's `adapters/`
    /// (model/adapters.rs), applied in the layers they adapt; the task of
    /// the next forwards is chosen with [`LoadedModel::select_task`].
    pub adapters: Option<std::sync::Arc<crate::model::adapters::TaskAdapters>>,
}

impl LoadedModel {
    /// One forward of `tokens` [B, L] over `store`, as `req` asks.
    pub fn run<T: KvStore>(&mut self, tokens: &Array, store: &mut T, req: ForwardRequest) -> Result<ForwardOut> {
        let r = super::attend::forward(&mut self.model, tokens, store, req);
        r.map_err(|e| anyhow::anyhow!("{} (plugin `{}`, {:?} error)", e.message, self.architecture_plugin, e.kind))
    }

    /// Logits of `tokens` [B, L] over `store`: [B, 1 | L, V], lazily.
    pub fn logits<T: KvStore>(&mut self, tokens: &Array, store: &mut T, last_only: bool) -> Result<Array> {
        Ok(self.run(tokens, store, ForwardRequest::logits(last_only))?.out)
    }

    /// Whether keys and values both use the dense family of the activation
    /// dtype (the default; the contiguous cache and the compiled step serve it).
    pub fn kv_is_dense_default(&self) -> bool {
        let dense = super::kv_family::dense_family(self.kv.0.dims.dtype);
        self.kv.0.family == dense && self.kv.1.family == dense
    }

    /// A one-sequence contiguous cache for this model's layers (SHARED
    /// layers read their source's K/V; the declarations were checked at load).
    pub fn kv_cache(&self) -> super::cache::KvCache {
        let n = self.spec.num_layers as usize;
        super::cache::KvCache::for_layers(n, &self.cache_layers).unwrap_or_else(|_| super::cache::KvCache::new(n))
    }

    /// Whether some layer keeps a recurrent state (`cache_kind::STATE`):
    /// the server's engine keeps it per sequence (recurrent.rs); the
    /// compiled step and speculative decoding do not serve such models.
    pub fn has_state(&self) -> bool {
        self.cache_layers.iter().any(|l| l.kind == cache_kind::STATE)
    }

    /// Whether the language model's image tokens attend bidirectionally
    /// within each image: `use_bidirectional_attention: "vision"` in
    /// config.json's `text_config` (or at its top, for a config without
    /// one), the Hugging Face key Gemma 4 uses (vision_config's own key is
    /// the vision tower's and is not read). Prefill then keeps each image's
    /// placeholders in one chunk and lets them see each other (media.rs).
    pub fn bidirectional_media(&self) -> bool {
        let c = &self.dir.config;
        let text = c.get("text_config").unwrap_or(c);
        text.get("use_bidirectional_attention").and_then(|v| v.as_str()) == Some("vision")
    }

    /// Why the paged pool cannot hold this model's layers in its KV
    /// families, if it cannot (a layer kind this host does not know, dims a
    /// family cannot store). Per-layer shapes, SHARED layers (kv_layout.rs)
    /// and recurrent-state layers (their state lives beside the sequence's
    /// blocks) are served.
    pub fn paged_refusal(&self) -> Option<String> {
        let n = self.spec.num_layers as usize;
        let e = super::kv_layout::for_layers(n, &self.kv.0, &self.kv.1, &self.cache_layers).err()?;
        Some(format!(
            "the paged KV pool cannot hold the layers of {}: {}; `rmlx generate` and `rmlx chat` run this model with its dense default KV cache",
            self.dir.model_type, e.message
        ))
    }

    /// Whether every layer keeps its own K/V in the model's one shape (no
    /// SHARED layers, no per-layer head sizes, no recurrent state): what
    /// the compiled step's traced buffers assume.
    pub fn uniform_layers(&self) -> bool {
        let (kh, hd) = (self.spec.num_kv_heads, self.spec.head_dim);
        self.cache_layers
            .iter()
            .all(|l| matches!(l.kind, cache_kind::FULL | cache_kind::WINDOW) && l.kv_heads == kh && l.head_dim == hd)
    }

    pub fn load(path: &Path, registry: &Registry) -> Result<Self> {
        let dir = ModelDir::open(path)?;
        Self::from_dir(dir, registry)
    }

    /// `load` under an explicit load policy (compute dtype, dequantize)
    /// instead of the process's (`--dtype`, `--dequantize`).
    pub fn load_with(path: &Path, registry: &Registry, policy: LoadPolicy) -> Result<Self> {
        Self::from_dir_with(ModelDir::open(path)?, registry, policy)
    }

    /// A drafter head of `kind` (`mtp`) stored in the verifier's own
    /// checkpoint at `path`: the architecture registered for
    /// `{model_type}_{kind}` (e.g. `qwen3_5_mtp`) loads from the same
    /// config and weights. Refused when no plugin builds one, or when the
    /// model it builds is not a drafter head (`Model::conditioning`, ABI 3.6).
    pub fn load_head(path: &Path, kind: &str, registry: &Registry, policy: LoadPolicy) -> Result<Self> {
        let mut dir = ModelDir::open(path)?;
        let verifier = dir.model_type.clone();
        dir.model_type = format!("{verifier}_{kind}");
        if registry.architecture_plugin(&dir.model_type).is_err() {
            anyhow::bail!(
                "{}: no architecture plugin builds a `{kind}` drafter head for model_type `{verifier}` (it would register `{}`)",
                path.display(),
                dir.model_type
            );
        }
        let head = Self::from_dir_with(dir, registry, policy)?;
        if head.conditioning.is_empty() {
            anyhow::bail!("{}: `{}` is not a drafter head (it names no verifier layers to condition on)", path.display(), head.dir.model_type);
        }
        Ok(head)
    }

    /// Loads under the process's policy setting, resolved for this model
    /// (`policy::resolve`: on a CPU, float32 and dense weights when they fit).
    pub fn from_dir(dir: ModelDir, registry: &Registry) -> Result<Self> {
        let r = crate::model::policy::resolve(&dir)?;
        tracing::info!("load policy for {}: {} ({})", dir.path.display(), r.summary(), r.why);
        Self::from_dir_with(dir, registry, r.policy)
    }

    pub fn from_dir_with(dir: ModelDir, registry: &Registry, policy: LoadPolicy) -> Result<Self> {
        let quant = QuantSpec::from_config(&dir.config)?;
        let mut weights = HostWeights::open_with(&dir.weight_files, &quant, registry, policy)?;
        let adapters = crate::model::adapters::TaskAdapters::open(&dir.path, &dir.config, weights.activation_dtype())
            .with_context(|| format!("the task adapters of {}", dir.path.display()))?
            .map(std::sync::Arc::new);
        if let Some(a) = &adapters {
            weights = weights.with_adapters(a.clone());
        }
        let mut m = Self::build(dir, registry, weights)?;
        if let Some(a) = &adapters {
            let unused = a.unused();
            if unused.len() == a.module_count() {
                anyhow::bail!(
                    "{}: the architecture built none of the modules its adapters/ adapt (e.g. `{}`): their names do not match the model's",
                    m.dir.path.display(),
                    unused[0]
                );
            }
            if !unused.is_empty() {
                tracing::warn!("{}: adapters of {} modules the architecture does not build are not applied: {:?}", m.dir.path.display(), unused.len(), unused);
            }
            tracing::info!("{}: LoRA adapters (r {}, scale {}) for tasks {:?}", m.dir.path.display(), a.rank, a.scale, a.tasks);
        }
        m.adapters = adapters;
        Ok(m)
    }

    /// The task whose adapters the next forwards apply (an index into the
    /// adapters' `tasks`), or none (the base model). A model without
    /// adapters refuses a task.
    pub fn select_task(&self, task: Option<usize>) -> Result<()> {
        match (&self.adapters, task) {
            (Some(a), t) => {
                if let Some(t) = t.filter(|&t| t >= a.tasks.len()) {
                    anyhow::bail!("task {t} is out of range: the model has tasks {:?}", a.tasks);
                }
                a.select(t);
                Ok(())
            }
            (None, None) => Ok(()),
            (None, Some(_)) => anyhow::bail!("model {} has no task adapters", self.dir.path.display()),
        }
    }

    /// A drafter head of `kind` stored in its own directory `sidecar` (an
    /// Eagle-3 head: config.json and safetensors of its own) that may lack
    /// tensors it shares with the verifier at `verifier` (the embedding):
    /// the architecture registered for `{sidecar model_type}_{kind}` (e.g.
    /// `llama_eagle3`) loads from a `WeightSource` over both directories,
    /// the sidecar's tensors first, each directory read under its own
    /// quantization config (`HostWeights::with_fallback`). Its config is
    /// the sidecar's config.json with the verifier's config.json added under
    /// `verifier_config` (unless the sidecar has that key), so a head can
    /// size itself against the verifier (e.g. Eagle-3's default layers).
    /// Refused when no plugin builds one, or when the model is not a
    /// drafter head (`Model::conditioning`, ABI 3.6).
    pub fn load_head_from(sidecar: &Path, verifier: &Path, kind: &str, registry: &Registry, policy: LoadPolicy) -> Result<Self> {
        let mut dir = ModelDir::open(sidecar).with_context(|| format!("the `{kind}` drafter head"))?;
        let vdir = ModelDir::open(verifier)?;
        let own = dir.model_type.clone();
        dir.model_type = format!("{own}_{kind}");
        if registry.architecture_plugin(&dir.model_type).is_err() {
            anyhow::bail!(
                "{}: no architecture plugin builds a `{kind}` drafter head of model_type `{own}` (it would register `{}`)",
                sidecar.display(),
                dir.model_type
            );
        }
        if let Some(obj) = dir.config.as_object_mut() {
            if !obj.contains_key("verifier_config") {
                obj.insert("verifier_config".into(), vdir.config.clone());
                dir.config_text = serde_json::to_string(&dir.config)?;
            }
        }
        let (quant, vquant) = (QuantSpec::from_config(&dir.config)?, QuantSpec::from_config(&vdir.config)?);
        let weights = HostWeights::open_with(&dir.weight_files, &quant, registry, policy)?
            .with_fallback(HostWeights::open_with(&vdir.weight_files, &vquant, registry, policy)?);
        let head = Self::build(dir, registry, weights)?;
        if head.conditioning.is_empty() {
            anyhow::bail!("{}: `{}` is not a drafter head (it names no verifier layers to condition on)", sidecar.display(), head.dir.model_type);
        }
        Ok(head)
    }

    /// The architecture plugin builds the model from `weights`.
    fn build(dir: ModelDir, registry: &Registry, mut weights: HostWeights<'_>) -> Result<Self> {
        let info = &registry.architecture_plugin(&dir.model_type)?.info;
        let architecture_plugin = info.id.clone();
        let plugin_abi = parse_abi(&info.abi);
        let model = registry
            .load_model(&dir.model_type, &dir.config_text, weights.as_source())
            .with_context(|| format!("loading {}", dir.path.display()))?;
        let spec = model.spec();
        let cache_layers: Vec<LayerCache> = model.layers().into_iter().collect();
        // ABI 3.6: a drafter head names the verifier layers it conditions on.
        let conditioning: Vec<i32> = if plugin_abi >= (3, 6) { model.conditioning().into_iter().collect() } else { Vec::new() };
        if !cache_layers.is_empty() && cache_layers.len() != spec.num_layers as usize {
            anyhow::bail!("{} declares {} layer caches for {} layers", dir.model_type, cache_layers.len(), spec.num_layers);
        }
        if let Err(e) = super::cache::KvCache::for_layers(spec.num_layers as usize, &cache_layers) {
            anyhow::bail!("{}: {}", dir.model_type, e.message);
        }
        let unused = weights.unused();
        if !unused.is_empty() {
            tracing::warn!("{} tensors unused by {}: {:?}", unused.len(), dir.model_type, &unused[..unused.len().min(8)]);
        }
        let layers = weights.take_layers();
        let fused_linears = weights.fused_count();
        if fused_linears > 0 {
            tracing::info!("{}: {fused_linears} groups of projections run as one matmul each (q/k/v, gate/up)", dir.model_type);
        }
        let kv_bytes = weights.activation_bytes();
        let choice = super::kv_family::default_choice();
        let kv_calibration = super::kv_calibration::KvCalibration::load(&dir.path, spec.num_layers as usize)?.map(std::rc::Rc::new);
        let kv = super::kv_family::resolve(registry, &spec, weights.activation_dtype(), &choice, kv_calibration.as_deref())
            .with_context(|| format!("the KV cache of {}", dir.path.display()))?;
        Ok(Self { dir, model, spec, layers, unused, architecture_plugin, plugin_abi, kv_bytes, kv, cache_layers, kv_calibration, fused_linears, conditioning, drafters: Vec::new(), adapters: None })
    }
}

/// "3.5" -> (3, 5); (0, 0) when unreadable.
fn parse_abi(s: &str) -> (u32, u32) {
    let mut it = s.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}
