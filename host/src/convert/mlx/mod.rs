//! MLX or Hugging Face safetensors -> MLX, with a quantization recipe.
//!
//! ```ignore
//! let opts = MlxOptions { quant: Some("q4".into()), layers: vec!["embed_tokens=q8".into()], ..Default::default() };
//! let report = convert::mlx::convert_dir(src, dst, &opts)?;
//! ```
//!
//! The source is a model directory: an MLX one (quantized in any mode rmlx
//! reads, or dense) or a Hugging Face checkpoint (bf16/f16/f32 safetensors,
//! sharded or not; llama/qwen3 tensor names are already MLX names; for
//! qwen3_moe / qwen3_next / deepseek_v3 the experts stored one by one are
//! stacked as mlx-lm's sanitize stacks them, see sanitize.rs; a recipe that
//! would quantize other model types' experts one by one is refused). Every
//! module with a 2-D `weight` (Linear, Embedding) or a 3-D one under `switch_mlp` / `experts`
//! (all experts of an MoE projection, [experts, out, in]) gets a target format
//! from the recipe: `--quant` for all of them (the model type's
//! `quant_predicate` aside: MoE routers at 8 bits, or dense), then each matching
//! `--layer PATTERN=SPEC` (the last match wins). The math is MLX's own (`mx.quantize` /
//! `mx.dequantize` with the mode, through mlx-c), so a dense source quantized
//! here is bit-identical to mlx-lm's `quantize_model` of the same weights.
//!
//! Specs: `q2 q3 q4 q5 q6 q8` (affine, that many bits), `affine` (4 bits),
//! `mxfp4`, `mxfp8`, `nvfp4`, `bf16 f16 f32` (dense in that dtype), `dense`
//! (dense, dequantized in the scales' dtype), `keep` (as in the source). A
//! `:G` suffix sets the group size (`q4:32`); `--group-size` sets it for
//! `--quant`. Without `--quant` modules stay as they are unless a `--layer`
//! names them. Like mlx-lm, a module whose input dimension does not divide by
//! the group size is left as it is (a warning says so).
//!
//! Output as mlx-lm's `save_model` writes it: `model.safetensors` or shards of
//! at most 5 GiB with `model.safetensors.index.json`, `{"format": "mlx"}`
//! metadata, config.json with a `quantization` section (defaults plus one
//! override per module that differs) copied to `quantization_config`, and the
//! tokenizer, template and generation files copied. Tensors are produced one
//! module at a time while the shard is written (never two copies of the
//! model in memory), into a temporary sibling directory renamed at the end.
mod plan;
mod produce;
mod recipe;
mod sanitize;

pub use recipe::{check_recipe, parse_spec, Format, Rule, Spec};

use super::{temp_sibling, write_json, TempDirGuard};
use crate::model::{files::ModelDir, quant::QuantSpec, safetensors as st};
use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::Array;
use plan::{plan_modules, plan_outputs, quantization_section, st_dtype, OutPlan, SrcTensor};
use produce::{LazyView, Producer};
use recipe::dtype_name;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Options for [`convert_dir`].
#[derive(Debug, Clone, Default)]
pub struct MlxOptions {
    /// Target for every Linear/Embedding (`q4`, `mxfp4`, `bf16`, ...).
    pub quant: Option<String>,
    /// Group size for `quant` (default: the mode's default).
    pub group_size: Option<i32>,
    /// `PATTERN=SPEC` rules, applied in order (the last match wins).
    pub layers: Vec<String>,
    pub force: bool,
    pub progress: bool,
}

/// Summary of a conversion.
#[derive(Debug, Clone)]
pub struct MlxReport {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub model_type: String,
    /// Module format -> how many modules have it in the output.
    pub formats: BTreeMap<String, usize>,
    pub tensors_written: usize,
    pub tensor_bytes: u64,
    pub parameters: u64,
    pub quantization: Option<Value>,
    pub files: Vec<String>,
    pub warnings: Vec<String>,
}

impl MlxReport {
    /// Bits per weight as mlx-lm computes it: all tensor bytes over all parameters.
    pub fn bits_per_weight(&self) -> f64 {
        self.tensor_bytes as f64 * 8.0 / self.parameters.max(1) as f64
    }
}

impl fmt::Display for MlxReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "converted {} -> {}", self.src.display(), self.dst.display())?;
        writeln!(
            f,
            "  {} model, {:.2} M parameters, {} tensors, {:.1} MiB, {:.3} bits per weight",
            self.model_type,
            self.parameters as f64 / 1e6,
            self.tensors_written,
            self.tensor_bytes as f64 / (1u64 << 20) as f64,
            self.bits_per_weight()
        )?;
        for (k, n) in &self.formats {
            writeln!(f, "  {n:4} modules {k}")?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}

/// Files of a model directory that are not weights or config: tokenizer,
/// template, generation config, ... (copied as they are).
fn side_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else { continue };
        if !p.is_file() || name == "config.json" || name.starts_with('.') {
            continue;
        }
        let weights = [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json", ".h5", ".msgpack"];
        if weights.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        v.push(p);
    }
    v.sort();
    Ok(v)
}

/// Converts the model directory `src` into an MLX model directory `dst`.
/// Fails if `dst` exists unless `opts.force`; nothing is left half-written.
pub fn convert_dir(src: &Path, dst: &Path, opts: &MlxOptions) -> Result<MlxReport> {
    // ---- the recipe (checked before anything is read) ----
    let (default, rules) = check_recipe(opts)?;
    if dst.exists() && !opts.force {
        bail!("output {} already exists (use --force to overwrite)", dst.display());
    }
    if src.canonicalize().ok().is_some_and(|s| dst.canonicalize().ok().is_some_and(|d| d == s)) {
        bail!("the output directory is the source directory");
    }

    // ---- the source ----
    let dir = ModelDir::open(src)?;
    let config = dir.config.clone();
    if let Some(qc) = config.get("quantization_config") {
        if qc.get("quant_method").is_some() && config.get("quantization").is_none() {
            bail!(
                "{}: the source is quantized with {} (a Hugging Face quantization); convert from a bf16/f16/f32 checkpoint or an MLX model",
                src.display(),
                qc["quant_method"]
            );
        }
    }
    let spec = QuantSpec::from_config(&config)?;
    let mut warnings = Vec::new();
    let mut src_tensors: BTreeMap<String, SrcTensor> = BTreeMap::new();
    for (i, f) in dir.weight_files.iter().enumerate() {
        for (name, info) in st::read_header(f)? {
            let dtype = st_dtype(&info.dtype).with_context(|| format!("{}: tensor {name}", f.display()))?;
            if src_tensors.insert(name.clone(), SrcTensor { file: i, dtype, shape: info.shape, derive: None }).is_some() {
                bail!("tensor {name} appears in more than one weight file");
            }
        }
    }
    // What mlx-lm's sanitize rewrites for this model type (experts stacked, ...).
    sanitize::sanitize(&dir.model_type, &config, &mut src_tensors, &mut warnings)?;
    // What mlx-lm's llama/qwen3 sanitize drops.
    let tied = config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
    let dropped: Vec<String> = src_tensors
        .keys()
        .filter(|k| k.ends_with("rotary_emb.inv_freq") || (tied && k.as_str() == "lm_head.weight"))
        .cloned()
        .collect();
    for k in dropped {
        warnings.push(format!("dropped {k} (not an MLX parameter)"));
        src_tensors.remove(&k);
    }

    // ---- modules: every 2-D `weight` (with its scales/biases if quantized) ----
    let predicate = sanitize::quant_predicate(&dir.model_type);
    let (modules, owned) = plan_modules(&src_tensors, &spec, &default, &rules, &predicate, &mut warnings)?;
    if modules.is_empty() {
        bail!("{}: no Linear or Embedding weights found", src.display());
    }
    sanitize::refuse_experts_one_by_one(&dir.model_type, &modules)?;
    let dense_cast = match &default {
        Spec::To(Format::Dense(Some(d))) => Some(*d),
        _ => None,
    };

    // ---- output tensors ----
    let cast = sanitize::cast_predicate(&dir.model_type);
    let OutPlan { outs, parameters, formats, per_module } = plan_outputs(&src_tensors, &owned, &modules, dense_cast, &cast);

    // ---- config.json ----
    let mut config = config;
    let obj = config.as_object_mut().ok_or_else(|| anyhow!("config.json is not an object"))?;
    obj.remove("quantization");
    obj.remove("quantization_config");
    let quantization = quantization_section(&default, &per_module);
    if let Some(q) = &quantization {
        obj.insert("quantization".into(), q.clone());
        obj.insert("quantization_config".into(), q.clone());
    }
    if let Some(d) = dense_cast {
        obj.insert("torch_dtype".into(), json!(dtype_name(d)));
    }

    // ---- write ----
    let arrays: Vec<HashMap<String, Array>> = dir
        .weight_files
        .iter()
        .map(|f| Array::load_safetensors(f).map_err(|e| anyhow!("{}: {e}", f.display())))
        .collect::<Result<_>>()?;
    let tmp = temp_sibling(dst)?;
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut guard = TempDirGuard(Some(tmp.clone()));
    let mut files = Vec::new();
    let shards = super::plan_shards(&outs, |t| t.nbytes as u64);
    let tensor_bytes: u64 = outs.iter().map(|t| t.nbytes as u64).sum();
    let pb = super::progress_bar(tensor_bytes, opts.progress);
    let producer = Producer {
        arrays: &arrays,
        src: &src_tensors,
        modules: &modules,
        pending: RefCell::new(HashMap::new()),
        error: RefCell::new(None),
        pb,
    };
    let weight_map = super::write_shards(&tmp, &shards, |t| &t.name, |t| LazyView { p: &producer, t }, &producer.error, &mut files)?;
    producer.pb.finish_and_clear();
    write_json(
        &tmp,
        "model.safetensors.index.json",
        &json!({"metadata": {"total_size": tensor_bytes, "total_parameters": parameters}, "weight_map": weight_map}),
        &mut files,
    )?;
    write_json(&tmp, "config.json", &config, &mut files)?;
    for f in side_files(src)? {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        fs::copy(&f, tmp.join(&name)).with_context(|| format!("copying {}", f.display()))?;
        files.push(name);
    }

    // ---- commit ----
    super::commit_dir(&tmp, dst, opts.force, &mut guard)?;

    Ok(MlxReport {
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        model_type: dir.model_type.clone(),
        formats,
        tensors_written: outs.len(),
        tensor_bytes,
        parameters,
        quantization,
        files,
        warnings,
    })
}
