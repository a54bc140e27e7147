//! MLX or Hugging Face safetensors -> MLX, with a quantization recipe.
//!
//! ```ignore
//! let opts = MlxOptions { quant: Some("q4".into()), layers: vec!["embed_tokens=q8".into()], ..Default::default() };
//! let report = convert::mlx::convert_dir(src, dst, &opts)?;
//! ```
//!
//! The source is a model directory: an MLX one (quantized in any mode rmlx
//! reads, or dense) or a Hugging Face checkpoint (bf16/f16/f32 safetensors,
//! sharded or not; llama/qwen3 tensor names are already MLX names). Every
//! module with a 2-D `weight` (Linear, Embedding) gets a target format from the
//! recipe: `--quant` for all of them, then each matching `--layer PATTERN=SPEC`
//! (the last match wins). The math is MLX's own (`mx.quantize` /
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
use super::{temp_sibling, write_json, TempDirGuard};
use crate::model::{files::ModelDir, quant::QuantSpec, safetensors as st};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;
use mlx_rs::{Array, Dtype as MDtype};
use rmlx_wquant_fp::{check_mode, ops, MODES};
use safetensors::tensor::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
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

/// How one module is (or will be) stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Quant { mode: String, bits: i32, group_size: i32 },
    /// Dense; `None` keeps the source dtype (or the dequantized one).
    Dense(Option<Dtype>),
}

impl Format {
    fn describe(&self) -> String {
        match self {
            Format::Quant { mode, bits, group_size } if mode == "affine" => format!("affine {bits}-bit g{group_size}"),
            Format::Quant { mode, group_size, .. } => format!("{mode} g{group_size}"),
            Format::Dense(Some(d)) => format!("dense {}", dtype_name(*d)),
            Format::Dense(None) => "dense".into(),
        }
    }
}

/// A recipe target: a format, or "as in the source".
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Keep,
    To(Format),
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        _ => "other",
    }
}

/// Parses `q4`, `mxfp4`, `nvfp4:16`, `bf16`, `keep`, ...; `group` overrides the
/// group size (from `--group-size`); a `:G` suffix does the same.
pub fn parse_spec(s: &str, group: Option<i32>) -> Result<Spec> {
    let (name, g) = match s.split_once(':') {
        Some((n, g)) => {
            let g: i32 = g.parse().map_err(|_| anyhow!("bad group size in {s:?} (expected e.g. q4:64)"))?;
            (n, Some(g))
        }
        None => (s, group),
    };
    let name = name.trim().to_ascii_lowercase();
    let dense = |d| {
        if g.is_some() {
            bail!("{s:?}: a dense format takes no group size");
        }
        Ok(Spec::To(Format::Dense(d)))
    };
    let (mode, bits) = match name.as_str() {
        "keep" => {
            if g.is_some() {
                bail!("{s:?}: keep takes no group size");
            }
            return Ok(Spec::Keep);
        }
        "dense" | "none" => return dense(None),
        "bf16" | "bfloat16" => return dense(Some(Dtype::BF16)),
        "f16" | "fp16" | "float16" => return dense(Some(Dtype::F16)),
        "f32" | "fp32" | "float32" => return dense(Some(Dtype::F32)),
        "affine" => ("affine", None),
        "mxfp4" | "mxfp8" | "nvfp4" => (name.as_str(), None),
        q if q.starts_with('q') && q[1..].parse::<i32>().is_ok() => ("affine", Some(q[1..].parse::<i32>()?)),
        _ => {
            let modes: Vec<&str> = MODES.iter().map(|m| m.0).collect();
            bail!(
                "unknown quantization {s:?} (use q2, q3, q4, q5, q6, q8, {}, bf16, f16, f32, dense or keep)",
                modes.join(", ")
            )
        }
    };
    let (_, bit_list, groups) = MODES.iter().find(|m| m.0 == mode).expect("known mode");
    let bits = bits.unwrap_or(bit_list[0]);
    let group_size = g.unwrap_or(groups[0]);
    check_mode(mode, bits, group_size).map_err(|e| anyhow!("{s:?}: {e}"))?;
    Ok(Spec::To(Format::Quant { mode: mode.to_string(), bits, group_size }))
}

/// One `--layer PATTERN=SPEC` rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub spec: Spec,
}

impl Rule {
    pub fn parse(s: &str) -> Result<Rule> {
        let Some((pattern, spec)) = s.split_once('=') else {
            bail!("--layer {s:?}: expected PATTERN=SPEC, e.g. embed_tokens=q8");
        };
        let pattern = pattern.trim();
        if pattern.is_empty() {
            bail!("--layer {s:?}: empty pattern");
        }
        Ok(Rule { pattern: pattern.to_string(), spec: parse_spec(spec, None).with_context(|| format!("--layer {s:?}"))? })
    }

    /// A pattern with `*` is a glob over the module path from any component on; otherwise it
    /// matches whole dot-separated components (`embed_tokens`, `mlp`,
    /// `layers.0`, `model.layers.3.self_attn.v_proj`).
    pub fn matches(&self, path: &str) -> bool {
        if self.pattern.contains('*') {
            // Anchored at any component start: `layers.1.*` matches `model.layers.1.mlp.up_proj`.
            return std::iter::once(0)
                .chain(path.match_indices('.').map(|(i, _)| i + 1))
                .any(|start| glob(&self.pattern, &path[start..]));
        }
        let p = format!(".{path}.");
        p.contains(&format!(".{}.", self.pattern))
    }
}

fn glob(pat: &str, s: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
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

#[derive(Debug, Clone)]
struct SrcTensor {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// What one output tensor is made from.
#[derive(Debug, Clone)]
enum Make {
    /// A source tensor, cast to `dtype` if it differs.
    Copy { src: String },
    /// A part (`weight`, `scales`, `biases`) of module `module` converted.
    Module { module: String, part: &'static str },
}

#[derive(Debug, Clone)]
struct Out {
    name: String,
    make: Make,
    dtype: Dtype,
    shape: Vec<usize>,
    nbytes: usize,
}

/// One module's conversion.
#[derive(Debug, Clone)]
struct ModulePlan {
    from: Format,
    to: Format,
    /// dtype of the dense weight the conversion goes through.
    dense_dtype: Dtype,
}

fn st_dtype(s: &str) -> Result<Dtype> {
    Ok(match s {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "U32" => Dtype::U32,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I32" => Dtype::I32,
        "I64" => Dtype::I64,
        "U16" => Dtype::U16,
        "I16" => Dtype::I16,
        "F64" => Dtype::F64,
        "BOOL" => Dtype::BOOL,
        other => bail!("unsupported safetensors dtype {other}"),
    })
}

fn mlx_dtype(d: Dtype) -> Result<MDtype> {
    Ok(match d {
        Dtype::F32 => MDtype::Float32,
        Dtype::F16 => MDtype::Float16,
        Dtype::BF16 => MDtype::Bfloat16,
        Dtype::U32 => MDtype::Uint32,
        Dtype::U8 => MDtype::Uint8,
        Dtype::I8 => MDtype::Int8,
        Dtype::I32 => MDtype::Int32,
        Dtype::I64 => MDtype::Int64,
        Dtype::U16 => MDtype::Uint16,
        Dtype::I16 => MDtype::Int16,
        Dtype::F64 => MDtype::Float64,
        Dtype::BOOL => MDtype::Bool,
        other => bail!("unsupported dtype {other:?}"),
    })
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

fn nbytes(d: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * d.bitsize() / 8
}

/// The raw bytes of an evaluated, row-contiguous array.
fn array_bytes(a: &Array) -> Result<Vec<u8>> {
    a.eval()?;
    fn raw<T: mlx_rs::ArrayElement>(a: &Array) -> Result<Vec<u8>> {
        let s: &[T] = a.try_as_slice().map_err(|e| anyhow!("reading array data: {e:?}"))?;
        // SAFETY: plain-old-data element types, reinterpreted as bytes.
        Ok(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }.to_vec())
    }
    match a.dtype() {
        MDtype::Float32 => raw::<f32>(a),
        MDtype::Float16 => raw::<half::f16>(a),
        MDtype::Bfloat16 => raw::<half::bf16>(a),
        MDtype::Uint32 => raw::<u32>(a),
        MDtype::Uint8 => raw::<u8>(a),
        MDtype::Int8 => raw::<i8>(a),
        MDtype::Int32 => raw::<i32>(a),
        MDtype::Int64 => raw::<i64>(a),
        MDtype::Uint16 => raw::<u16>(a),
        MDtype::Int16 => raw::<i16>(a),
        MDtype::Bool => raw::<bool>(a),
        d => bail!("cannot write an array of dtype {d:?}"),
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

struct Producer<'a> {
    arrays: &'a [HashMap<String, Array>],
    src: &'a BTreeMap<String, SrcTensor>,
    modules: &'a BTreeMap<String, ModulePlan>,
    pending: RefCell<HashMap<String, Array>>,
    error: RefCell<Option<anyhow::Error>>,
    pb: ProgressBar,
}

impl Producer<'_> {
    fn source(&self, name: &str) -> Result<Array> {
        let t = self.src.get(name).ok_or_else(|| anyhow!("missing source tensor {name}"))?;
        self.arrays[t.file].get(name).cloned().ok_or_else(|| anyhow!("MLX did not load tensor {name}"))
    }

    /// The module's weight as a dense array.
    fn dense_weight(&self, module: &str, plan: &ModulePlan) -> Result<Array> {
        let w = self.source(&format!("{module}.weight"))?;
        match &plan.from {
            Format::Dense(_) => Ok(w),
            Format::Quant { mode, bits, group_size } => {
                let scales = self.source(&format!("{module}.scales"))?;
                let biases = if mode == "affine" { Some(self.source(&format!("{module}.biases"))?) } else { None };
                let gs = if mode == "nvfp4" { self.src.contains_key(&format!("{module}.global_scale")) } else { false };
                let gs = if gs { Some(self.source(&format!("{module}.global_scale"))?) } else { None };
                Ok(ops::dequantize(&w, &scales, biases.as_ref(), *group_size, *bits, mode, gs.as_ref(), None)
                    .map_err(|e| anyhow!("dequantizing {module}: {e}"))?)
            }
        }
    }

    /// Computes every output part of `module` and keeps them until written.
    fn convert_module(&self, module: &str) -> Result<()> {
        let plan = self.modules.get(module).ok_or_else(|| anyhow!("internal: no plan for {module}"))?;
        let w = self.dense_weight(module, plan)?;
        let mut out = HashMap::new();
        match &plan.to {
            Format::Dense(d) => {
                let w = match d {
                    Some(d) => w.as_dtype(mlx_dtype(*d)?)?,
                    None => w,
                };
                out.insert("weight", w);
            }
            Format::Quant { mode, bits, group_size } => {
                let mut parts = ops::quantize(&w, *group_size, *bits, mode)
                    .map_err(|e| anyhow!("quantizing {module}: {e}"))?
                    .into_iter();
                out.insert("weight", parts.next().ok_or_else(|| anyhow!("quantize returned nothing"))?);
                out.insert("scales", parts.next().ok_or_else(|| anyhow!("quantize returned no scales"))?);
                if let Some(b) = parts.next() {
                    out.insert("biases", b);
                }
            }
        }
        let mut pending = self.pending.borrow_mut();
        for (k, v) in out {
            pending.insert(format!("{module}.{k}"), v);
        }
        Ok(())
    }

    fn produce(&self, t: &Out) -> Result<Vec<u8>> {
        let a = match &t.make {
            Make::Copy { src } => {
                let a = self.source(src)?;
                let want = mlx_dtype(t.dtype)?;
                if a.dtype() != want {
                    a.as_dtype(want)?
                } else {
                    a
                }
            }
            Make::Module { module, part } => {
                let key = format!("{module}.{part}");
                if !self.pending.borrow().contains_key(&key) {
                    self.convert_module(module)?;
                }
                self.pending.borrow_mut().remove(&key).ok_or_else(|| anyhow!("internal: {key} was not produced"))?
            }
        };
        let got_shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
        if got_shape != t.shape || a.dtype() != mlx_dtype(t.dtype)? {
            bail!(
                "internal error: tensor '{}' came out {:?} {:?}, planned {:?} {:?}",
                t.name,
                a.dtype(),
                got_shape,
                t.dtype,
                t.shape
            );
        }
        array_bytes(&a)
    }
}

struct LazyView<'a> {
    p: &'a Producer<'a>,
    t: &'a Out,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.p.pb.set_message(self.t.name.clone());
        let data = match self.p.produce(self.t) {
            Ok(d) if d.len() == self.t.nbytes => d,
            r => {
                let e = r.err().unwrap_or_else(|| anyhow!("wrong byte count"));
                let mut slot = self.p.error.borrow_mut();
                if slot.is_none() {
                    *slot = Some(e.context(format!("producing tensor '{}'", self.t.name)));
                }
                vec![0u8; self.t.nbytes]
            }
        };
        self.p.pb.inc(self.t.nbytes as u64);
        Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.t.nbytes
    }
}

fn quant_json(mode: &str, bits: i32, group_size: i32) -> Value {
    json!({"group_size": group_size, "bits": bits, "mode": mode})
}

/// Parses and checks the recipe of `opts`: the `--quant` spec and the rules.
pub fn check_recipe(opts: &MlxOptions) -> Result<(Spec, Vec<Rule>)> {
    let default = match &opts.quant {
        Some(q) => parse_spec(q, opts.group_size).with_context(|| format!("--quant {q}"))?,
        None => {
            if opts.group_size.is_some() {
                bail!("--group-size needs --quant");
            }
            Spec::Keep
        }
    };
    let rules: Vec<Rule> = opts.layers.iter().map(|s| Rule::parse(s)).collect::<Result<_>>()?;
    Ok((default, rules))
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
            if src_tensors.insert(name.clone(), SrcTensor { file: i, dtype, shape: info.shape }).is_some() {
                bail!("tensor {name} appears in more than one weight file");
            }
        }
    }
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
    let mut modules: BTreeMap<String, ModulePlan> = BTreeMap::new();
    let mut owned: HashMap<String, String> = HashMap::new(); // tensor -> module
    for (name, t) in &src_tensors {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        let has_scales = src_tensors.contains_key(&format!("{module}.scales"));
        if t.shape.len() != 2 || (!has_scales && !is_float(t.dtype)) {
            continue;
        }
        let from = if has_scales {
            let q = spec.for_module(module, true);
            if q.mode == "none" {
                bail!("{module} has scales but config.json's quantization says it is dense");
            }
            check_mode(&q.mode, q.bits, q.group_size).map_err(|e| anyhow!("{module}: {e}"))?;
            Format::Quant { mode: q.mode, bits: q.bits, group_size: q.group_size }
        } else {
            Format::Dense(None)
        };
        let cols = match &from {
            Format::Quant { bits, .. } => t.shape[1] * 32 / *bits as usize,
            Format::Dense(_) => t.shape[1],
        };
        // The spec that applies: the last matching rule, else --quant.
        let mut target = default.clone();
        for r in &rules {
            if r.matches(module) {
                target = r.spec.clone();
            }
        }
        let mut to = match target {
            Spec::Keep => from.clone(),
            Spec::To(f) => f,
        };
        if let Format::Quant { group_size, mode, .. } = &to {
            if cols % *group_size as usize != 0 {
                warnings.push(format!(
                    "{module}: input dimension {cols} is not a multiple of {mode}'s group size {group_size}; left as it is"
                ));
                to = from.clone();
            }
        }
        // The dtype of the dense weight the conversion goes through.
        let dense_dtype = match &from {
            Format::Dense(_) => t.dtype,
            Format::Quant { mode, .. } if mode == "affine" => src_tensors[&format!("{module}.scales")].dtype,
            Format::Quant { .. } => Dtype::BF16, // mx.dequantize's default for uint8 scales
        };
        for part in ["weight", "scales", "biases", "global_scale"] {
            let n = format!("{module}.{part}");
            if src_tensors.contains_key(&n) {
                owned.insert(n, module.to_string());
            }
        }
        modules.insert(module.to_string(), ModulePlan { from, to, dense_dtype });
    }
    if modules.is_empty() {
        bail!("{}: no Linear or Embedding weights found", src.display());
    }
    let dense_cast = match &default {
        Spec::To(Format::Dense(Some(d))) => Some(*d),
        _ => None,
    };

    // ---- output tensors ----
    let mut outs: Vec<Out> = Vec::new();
    let mut parameters = 0u64;
    for (name, t) in &src_tensors {
        if owned.contains_key(name) {
            continue;
        }
        let dtype = match dense_cast {
            Some(d) if is_float(t.dtype) => d,
            _ => t.dtype,
        };
        parameters += t.shape.iter().product::<usize>() as u64;
        outs.push(Out {
            name: name.clone(),
            make: Make::Copy { src: name.clone() },
            dtype,
            nbytes: nbytes(dtype, &t.shape),
            shape: t.shape.clone(),
        });
    }
    let mut formats: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_module: BTreeMap<String, (String, i32, i32)> = BTreeMap::new();
    for (module, plan) in &mut modules {
        let w = &src_tensors[&format!("{module}.weight")];
        let rows = w.shape[0];
        let cols = match &plan.from {
            Format::Quant { bits, .. } => w.shape[1] * 32 / *bits as usize,
            Format::Dense(_) => w.shape[1],
        };
        parameters += (rows * cols) as u64;
        *formats.entry(plan.to.describe()).or_default() += 1;
        if plan.to == plan.from {
            // Unchanged: copy its tensors as they are.
            for part in ["weight", "scales", "biases", "global_scale"] {
                let n = format!("{module}.{part}");
                if let Some(t) = src_tensors.get(&n) {
                    outs.push(Out {
                        name: n.clone(),
                        make: Make::Copy { src: n },
                        dtype: t.dtype,
                        nbytes: nbytes(t.dtype, &t.shape),
                        shape: t.shape.clone(),
                    });
                }
            }
        } else {
            let m = |part: &'static str, dtype: Dtype, shape: Vec<usize>| Out {
                name: format!("{module}.{part}"),
                make: Make::Module { module: module.clone(), part },
                dtype,
                nbytes: nbytes(dtype, &shape),
                shape,
            };
            match &plan.to {
                Format::Dense(d) => outs.push(m("weight", d.unwrap_or(plan.dense_dtype), vec![rows, cols])),
                Format::Quant { mode, bits, group_size } => {
                    let g = cols / *group_size as usize;
                    outs.push(m("weight", Dtype::U32, vec![rows, cols * *bits as usize / 32]));
                    if mode == "affine" {
                        outs.push(m("scales", plan.dense_dtype, vec![rows, g]));
                        outs.push(m("biases", plan.dense_dtype, vec![rows, g]));
                    } else {
                        outs.push(m("scales", Dtype::U8, vec![rows, g]));
                    }
                }
            }
        }
        if let Format::Quant { mode, bits, group_size } = &plan.to {
            per_module.insert(module.clone(), (mode.clone(), *bits, *group_size));
        }
    }
    outs.sort_by(|a, b| a.name.cmp(&b.name));

    // ---- config.json ----
    let mut config = config;
    let obj = config.as_object_mut().ok_or_else(|| anyhow!("config.json is not an object"))?;
    obj.remove("quantization");
    obj.remove("quantization_config");
    let quantization = if per_module.is_empty() {
        None
    } else {
        let (dm, db, dg) = match &default {
            Spec::To(Format::Quant { mode, bits, group_size }) => (mode.clone(), *bits, *group_size),
            _ => {
                // The most common format is the default.
                let mut count: BTreeMap<&(String, i32, i32), usize> = BTreeMap::new();
                for v in per_module.values() {
                    *count.entry(v).or_default() += 1;
                }
                let (k, _) = count.into_iter().max_by_key(|(_, n)| *n).unwrap();
                k.clone()
            }
        };
        let mut q = serde_json::Map::new();
        q.insert("group_size".into(), json!(dg));
        q.insert("bits".into(), json!(db));
        q.insert("mode".into(), json!(dm));
        for (module, (m, b, g)) in &per_module {
            if (m, *b, *g) != (&dm, db, dg) {
                q.insert(module.clone(), quant_json(m, *b, *g));
            }
        }
        Some(Value::Object(q))
    };
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
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        };
        let views: Vec<(String, LazyView)> = shard.iter().map(|t| (t.name.clone(), LazyView { p: &producer, t })).collect();
        let meta = HashMap::from([("format".to_string(), "mlx".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &tmp.join(&fname)).map_err(|e| anyhow!("writing {fname}: {e}"))?;
        if let Some(e) = producer.error.borrow_mut().take() {
            return Err(e);
        }
        for t in shard {
            weight_map.insert(t.name.clone(), json!(fname));
        }
        files.push(fname);
    }
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
    if dst.exists() {
        if !opts.force {
            bail!("output {} appeared during conversion", dst.display());
        }
        if dst.is_dir() {
            fs::remove_dir_all(dst).with_context(|| format!("removing old {}", dst.display()))?;
        } else {
            fs::remove_file(dst).with_context(|| format!("removing old {}", dst.display()))?;
        }
    }
    fs::rename(&tmp, dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    guard.0 = None;

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
