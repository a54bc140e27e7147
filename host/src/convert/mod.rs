//! GGUF -> MLX model directory (mlx-community layout), in pure Rust.
//!
//! ```ignore
//! let report = convert::convert_gguf(src, dst, &convert::GgufOptions { force: false, progress: true })?;
//! println!("{report}");
//! ```
//!
//! Output directory:
//! * `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards over
//!   5 GiB) with `{"format": "mlx"}` metadata, plus `model.safetensors.index.json`;
//! * `config.json` (Llama, or Gemma 1/2/3 for mlx-lm's `gemma`, `gemma2`,
//!   `gemma3_text`, with a mlx-lm `quantization` section copied to
//!   `quantization_config`), `generation_config.json`;
//! * `tokenizer.json`, `tokenizer_config.json` (with the chat template),
//!   `special_tokens_map.json`.
//!
//! Quantized GGUF tensors (Q4_0, Q4_1, Q8_0) become MLX affine-quantized
//! triples `<module>.weight` (uint32), `<module>.scales`, `<module>.biases`
//! (float16, shaped `[out, in/32]`), bit-identical to what MLX's own GGUF
//! loader (`mx.load("x.gguf")`) produces, except that the q/k projection rows
//! are un-permuted back to the Hugging Face rotary layout (llama only). F32/F16/BF16
//! tensors are copied as is, except Gemma norm weights, which lose the `+ 1`
//! llama.cpp adds on export. The data is streamed one tensor at a time.

// Public API for the CLI; not every helper is used by the binary.
#![allow(dead_code)]

pub mod gguf;
pub mod llama;
pub mod mlx;
pub mod quant;
pub mod tokenizer;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::tensor::{Dtype, View};
use serde_json::{json, Value};

use gguf::{GgmlType, GgufFile, GgufTensorInfo};
use quant::QuantKind;

/// Largest shard written (mlx-lm's `MAX_FILE_SIZE_GB = 5`, as `5 << 30`).
pub const MAX_SHARD_BYTES: u64 = 5 << 30;

/// Options for [`convert_gguf`].
#[derive(Debug, Clone, Default)]
pub struct GgufOptions {
    /// Replace `dst` if it already exists.
    pub force: bool,
    /// Show an indicatif progress bar on stderr.
    pub progress: bool,
}

/// Summary of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// GGUF version of the source.
    pub gguf_version: u32,
    /// Tensors in the GGUF file.
    pub gguf_tensors: usize,
    /// Tensors written to safetensors (a quantized tensor counts 3: weight, scales, biases).
    pub tensors_written: usize,
    /// Bytes of tensor data written to safetensors.
    pub tensor_bytes: u64,
    /// Bytes of all files written (safetensors including headers, JSON files).
    pub bytes_written: u64,
    /// Number of logical parameters (quantized weights counted unpacked).
    pub parameters: u64,
    /// Source GGUF tensor types and how many tensors had each (e.g. `"Q4_1": 210`).
    pub quant_types: BTreeMap<String, usize>,
    /// The `quantization` section written to config.json, if any.
    pub quantization: Option<Value>,
    /// Files written in `dst`, relative names.
    pub files: Vec<String>,
    /// Non-fatal issues.
    pub warnings: Vec<String>,
}

impl fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "converted {} -> {}",
            self.src.display(),
            self.dst.display()
        )?;
        writeln!(
            f,
            "  architecture {} (GGUF v{}), {} GGUF tensors -> {} safetensors tensors, {:.1} M parameters",
            self.architecture,
            self.gguf_version,
            self.gguf_tensors,
            self.tensors_written,
            self.parameters as f64 / 1e6
        )?;
        let types: Vec<String> = self
            .quant_types
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(f, "  source tensor types: {}", types.join(", "))?;
        writeln!(
            f,
            "  wrote {:.1} MiB of tensor data, {:.1} MiB in {} files",
            self.tensor_bytes as f64 / (1 << 20) as f64,
            self.bytes_written as f64 / (1 << 20) as f64,
            self.files.len()
        )?;
        if let Some(q) = &self.quantization {
            writeln!(
                f,
                "  quantization: group_size {}, bits {}, mode {}{}",
                q["group_size"],
                q["bits"],
                q["mode"],
                match q
                    .as_object()
                    .map(|o| o.len().saturating_sub(3))
                    .unwrap_or(0)
                {
                    0 => String::new(),
                    n => format!(" ({n} per-module overrides)"),
                }
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}

/// What one output safetensors entry is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// GGUF data copied (F32/F16/BF16/I*), possibly row-permuted.
    Raw,
    Weight(QuantKind),
    Scales(QuantKind),
    Biases(QuantKind),
    /// A K-quant (Q4_K, Q5_K, Q6_K) dequantized to float16.
    DequantF16(GgmlType),
    /// A Gemma norm weight copied with llama.cpp's `+ 1` taken off.
    RawMinusOne,
}

/// One tensor of the output.
#[derive(Debug, Clone)]
struct OutTensor {
    name: String,
    /// Index into `GgufFile::tensors`.
    src: usize,
    part: Part,
    /// Undo llama.cpp's rotary permutation with this many heads.
    unpermute_heads: Option<usize>,
    dtype: Dtype,
    shape: Vec<usize>,
    nbytes: usize,
}

/// Shared state for the lazily produced tensor views.
struct Source<'a> {
    gguf: &'a GgufFile,
    file: RefCell<File>,
    error: RefCell<Option<anyhow::Error>>,
    pb: ProgressBar,
}

impl Source<'_> {
    fn produce(&self, t: &OutTensor) -> Result<Vec<u8>> {
        let info = &self.gguf.tensors[t.src];
        let mut raw = self
            .gguf
            .read_tensor_bytes(&mut self.file.borrow_mut(), info)?;
        if let Some(n_head) = t.unpermute_heads {
            let rows = *info.dims.last().unwrap() as usize;
            if !raw.len().is_multiple_of(rows) {
                bail!(
                    "tensor '{}': {} bytes do not split into {} rows",
                    info.name,
                    raw.len(),
                    rows
                );
            }
            let src_row = quant::unpermute_src_row(rows, n_head)
                .with_context(|| format!("tensor '{}'", info.name))?;
            raw = quant::permute_rows(&raw, raw.len() / rows, src_row);
        }
        let out = match t.part {
            Part::Raw => raw,
            Part::RawMinusOne => gguf::gemma::sub_one(t.dtype, &raw)?,
            Part::Weight(k) => quant::pack_weights(k, &raw)?,
            Part::Scales(k) => quant::scales(k, &raw)?,
            Part::Biases(k) => quant::biases(k, &raw)?,
            Part::DequantF16(ty) => quant::dequant_k(ty, &raw)?
                .into_iter()
                .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        if out.len() != t.nbytes {
            bail!(
                "internal error: tensor '{}' produced {} bytes, expected {}",
                t.name,
                out.len(),
                t.nbytes
            );
        }
        Ok(out)
    }
}

struct LazyView<'a> {
    src: &'a Source<'a>,
    t: &'a OutTensor,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.src.pb.set_message(self.t.name.clone());
        let data = match self.src.produce(self.t) {
            Ok(d) => d,
            Err(e) => {
                // View::data cannot fail: remember the first error, write
                // zeros of the right length, and abort after serialization.
                let mut slot = self.src.error.borrow_mut();
                if slot.is_none() {
                    *slot = Some(e.context(format!("producing tensor '{}'", self.t.name)));
                }
                vec![0u8; self.t.nbytes]
            }
        };
        self.src.pb.inc(self.t.nbytes as u64);
        Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.t.nbytes
    }
}

/// Removes the temporary output directory unless disarmed.
pub(crate) struct TempDirGuard(pub(crate) Option<PathBuf>);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn raw_dtype(t: GgmlType) -> Option<Dtype> {
    Some(match t {
        GgmlType::F32 => Dtype::F32,
        GgmlType::F16 => Dtype::F16,
        GgmlType::BF16 => Dtype::BF16,
        GgmlType::I8 => Dtype::I8,
        GgmlType::I16 => Dtype::I16,
        GgmlType::I32 => Dtype::I32,
        GgmlType::I64 => Dtype::I64,
        GgmlType::F64 => Dtype::F64,
        _ => return None,
    })
}

/// Plan the output tensors for one GGUF tensor.
fn plan_tensor(
    idx: usize,
    info: &GgufTensorInfo,
    out_name: &llama::MappedName,
    unpermute_heads: Option<usize>,
) -> Result<Vec<OutTensor>> {
    let shape = info.shape();
    let n_el = info.n_elements() as usize;
    if let Some(k) = QuantKind::from_ggml(info.ggml_type) {
        if shape.len() < 2 {
            bail!(
                "tensor '{}' is a {}-dimensional {} tensor; only matrices can be quantized in MLX",
                info.name,
                shape.len(),
                info.ggml_type
            );
        }
        if out_name.suffix != "weight" {
            bail!(
                "tensor '{}' is quantized ({}), but only weights may be",
                info.name,
                info.ggml_type
            );
        }
        let last = *shape.last().unwrap();
        if !last.is_multiple_of(quant::GROUP_SIZE) {
            bail!(
                "tensor '{}' has inner dimension {} not divisible by 32",
                info.name,
                last
            );
        }
        let mut wshape = shape.clone();
        *wshape.last_mut().unwrap() = last * k.bits() as usize / 32;
        let mut sshape = shape.clone();
        *sshape.last_mut().unwrap() = last / quant::GROUP_SIZE;
        let n_groups = n_el / quant::GROUP_SIZE;
        let base = &out_name.module;
        Ok(vec![
            OutTensor {
                name: format!("{base}.weight"),
                src: idx,
                part: Part::Weight(k),
                unpermute_heads,
                dtype: Dtype::U32,
                nbytes: n_el * k.bits() as usize / 8,
                shape: wshape,
            },
            OutTensor {
                name: format!("{base}.scales"),
                src: idx,
                part: Part::Scales(k),
                unpermute_heads,
                dtype: Dtype::F16,
                nbytes: n_groups * 2,
                shape: sshape.clone(),
            },
            OutTensor {
                name: format!("{base}.biases"),
                src: idx,
                part: Part::Biases(k),
                unpermute_heads,
                dtype: Dtype::F16,
                nbytes: n_groups * 2,
                shape: sshape,
            },
        ])
    } else if quant::k_quant(info.ggml_type).is_some() {
        if shape.len() < 2 || out_name.suffix != "weight" || !shape.last().unwrap().is_multiple_of(quant::QK_K) {
            bail!(
                "tensor '{}' ({}, shape {:?}): only weight matrices with rows of whole 256-element super-blocks are supported",
                info.name,
                info.ggml_type.name(),
                shape
            );
        }
        Ok(vec![OutTensor {
            name: format!("{}.{}", out_name.module, out_name.suffix),
            src: idx,
            part: Part::DequantF16(info.ggml_type),
            unpermute_heads,
            dtype: Dtype::F16,
            nbytes: n_el * 2,
            shape,
        }])
    } else if let Some(dtype) = raw_dtype(info.ggml_type) {
        Ok(vec![OutTensor {
            name: format!("{}.{}", out_name.module, out_name.suffix),
            src: idx,
            part: Part::Raw,
            unpermute_heads,
            dtype,
            nbytes: n_el * dtype.bitsize() / 8,
            shape,
        }])
    } else {
        bail!(
            "tensor '{}' has unsupported type {} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, and Q4_K, Q5_K, Q6_K dequantized)",
            info.name,
            info.ggml_type
        )
    }
}

pub(crate) fn temp_sibling(dst: &Path) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .ok_or_else(|| anyhow!("destination {} has no final path component", dst.display()))?
        .to_string_lossy();
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id())))
}

fn write_json(dir: &Path, name: &str, v: &Value, files: &mut Vec<String>) -> Result<()> {
    let s = serde_json::to_string_pretty(v)?;
    fs::write(dir.join(name), s + "\n").with_context(|| format!("writing {name}"))?;
    files.push(name.to_string());
    Ok(())
}

/// Convert the GGUF file `src` into an MLX model directory `dst`.
///
/// Fails if `dst` exists unless `opts.force`. Everything is written into a
/// temporary sibling directory that is renamed to `dst` at the end; on error
/// it is removed and `dst` is left untouched.
pub fn convert_gguf(src: &Path, dst: &Path, opts: &GgufOptions) -> Result<ConvertReport> {
    if dst.exists() && !opts.force {
        bail!(
            "destination {} already exists (use force to overwrite)",
            dst.display()
        );
    }
    let g = GgufFile::open(src)?;
    let arch = g
        .get_str("general.architecture")?
        .ok_or_else(|| anyhow!("GGUF has no general.architecture"))?
        .to_string();
    let mut warnings = Vec::new();

    // ---- plan (all validation happens before anything is written) ----
    let model = gguf::arch::ModelPlan::new(&g, &arch)?;
    warnings.extend(model.warnings().iter().cloned());

    let mut outs: Vec<OutTensor> = Vec::new();
    let mut quant_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut parameters = 0u64;
    // module path -> Some(bits) if quantized, None if a dense 2-D weight
    let mut modules: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for (idx, info) in g.tensors.iter().enumerate() {
        *quant_types.entry(info.ggml_type.name()).or_default() += 1;
        let Some(mapped) = model.map_tensor_name(&info.name)? else {
            warnings.push(format!(
                "skipped tensor '{}' (not used by the MLX model)",
                info.name
            ));
            continue;
        };
        let heads = model.unpermute_heads(&mapped);
        let mut planned = plan_tensor(idx, info, &mapped, heads)?;
        if model.norm_offset(&mapped) {
            for t in &mut planned {
                if t.part != Part::Raw {
                    bail!("norm tensor '{}' has type {}; expected F32, F16 or BF16", info.name, info.ggml_type);
                }
                t.part = Part::RawMinusOne;
            }
        }
        parameters += info.n_elements();
        if mapped.suffix == "weight" && info.dims.len() == 2 {
            modules.insert(
                mapped.module.clone(),
                QuantKind::from_ggml(info.ggml_type).map(|k| k.bits()),
            );
        }
        outs.extend(planned);
    }
    let k_quants: usize = g.tensors.iter().filter(|t| quant::k_quant(t.ggml_type).is_some()).count();
    if k_quants > 0 {
        warnings.push(format!(
            "{k_quants} K-quant tensors (Q4_K/Q5_K/Q6_K) have no exact MLX layout: dequantized to float16 (re-quantize with --quant)"
        ));
    }
    let mut seen = HashMap::new();
    for t in &outs {
        if let Some(prev) = seen.insert(t.name.clone(), t.src) {
            bail!(
                "tensors '{}' and '{}' both map to '{}'",
                g.tensors[prev].name,
                g.tensors[t.src].name,
                t.name
            );
        }
    }
    outs.sort_by(|a, b| a.name.cmp(&b.name));

    let quantization = llama::quantization_config(&modules);
    let tok = if tokenizer::has_tokenizer(&g) {
        let t = tokenizer::build(&g, model.context_length())?;
        warnings.extend(t.warnings.iter().cloned());
        Some(t)
    } else {
        warnings.push("GGUF has no tokenizer metadata: no tokenizer files written".into());
        None
    };
    let config = model.config_json(&g, quantization.as_ref(), tok.as_ref())?;

    // ---- write ----
    let tmp = temp_sibling(dst)?;
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut guard = TempDirGuard(Some(tmp.clone()));
    let mut files = Vec::new();

    let shards = plan_shards(&outs, |t| t.nbytes as u64);
    let tensor_bytes: u64 = outs.iter().map(|t| t.nbytes as u64).sum();
    let pb = progress_bar(tensor_bytes, opts.progress);
    let source = Source {
        gguf: &g,
        file: RefCell::new(File::open(src).with_context(|| format!("opening {}", src.display()))?),
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
        let views: Vec<(String, LazyView)> = shard
            .iter()
            .map(|t| (t.name.clone(), LazyView { src: &source, t }))
            .collect();
        let meta = HashMap::from([("format".to_string(), "mlx".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &tmp.join(&fname))
            .map_err(|e| anyhow!("writing {fname}: {e}"))?;
        if let Some(e) = source.error.borrow_mut().take() {
            return Err(e);
        }
        for t in shard {
            weight_map.insert(t.name.clone(), json!(fname));
        }
        files.push(fname);
    }
    source.pb.finish_and_clear();
    write_json(
        &tmp,
        "model.safetensors.index.json",
        &json!({
            "metadata": {"total_size": tensor_bytes, "total_parameters": parameters},
            "weight_map": weight_map,
        }),
        &mut files,
    )?;
    write_json(&tmp, "config.json", &config, &mut files)?;
    write_json(
        &tmp,
        "generation_config.json",
        &model.generation_config(tok.as_ref()),
        &mut files,
    )?;
    if let Some(t) = &tok {
        fs::write(tmp.join("tokenizer.json"), &t.tokenizer_json)
            .context("writing tokenizer.json")?;
        files.push("tokenizer.json".into());
        write_json(
            &tmp,
            "tokenizer_config.json",
            &t.tokenizer_config,
            &mut files,
        )?;
        write_json(
            &tmp,
            "special_tokens_map.json",
            &t.special_tokens_map,
            &mut files,
        )?;
    }
    let mut bytes_written = 0;
    for f in &files {
        bytes_written += fs::metadata(tmp.join(f))?.len();
    }

    // ---- commit ----
    if dst.exists() {
        if !opts.force {
            bail!("destination {} appeared during conversion", dst.display());
        }
        if dst.is_dir() {
            fs::remove_dir_all(dst).with_context(|| format!("removing old {}", dst.display()))?;
        } else {
            fs::remove_file(dst).with_context(|| format!("removing old {}", dst.display()))?;
        }
    }
    fs::rename(&tmp, dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    guard.0 = None;

    Ok(ConvertReport {
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        architecture: arch,
        gguf_version: g.version,
        gguf_tensors: g.tensors.len(),
        tensors_written: outs.len(),
        tensor_bytes,
        bytes_written,
        parameters,
        quant_types,
        quantization,
        files,
        warnings,
    })
}

#[cfg(test)]
mod tests;

/// Splits `items` into shards of at most MAX_SHARD_BYTES (an item larger than
/// that gets a shard of its own), in order.
pub(crate) fn plan_shards<T>(items: &[T], bytes: impl Fn(&T) -> u64) -> Vec<Vec<&T>> {
    let mut shards: Vec<Vec<&T>> = Vec::new();
    let mut size = 0u64;
    for t in items {
        if shards.is_empty() || size + bytes(t) > MAX_SHARD_BYTES {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("a shard").push(t);
        size += bytes(t);
    }
    shards
}

/// A byte-counting progress bar, hidden unless `show`.
pub(crate) fn progress_bar(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}
