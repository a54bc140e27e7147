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
//! * `config.json` (Llama, Qwen2/Qwen2.5 for mlx-lm's `qwen2`, or Gemma
//!   1/2/3 for mlx-lm's `gemma`, `gemma2`, `gemma3_text`, with a mlx-lm `quantization` section copied to
//!   `quantization_config`), `generation_config.json`;
//! * `tokenizer.json`, `tokenizer_config.json` (with the chat template),
//!   `special_tokens_map.json`.
//!
//! Quantized GGUF weight matrices of the types MLX represents exactly (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0) become MLX affine-quantized triples
//! `<module>.weight` (uint32), `<module>.scales`, `<module>.biases` (float16,
//! shaped `[out, in/32]`), with the same values as the GGUF (for Q4_0/Q4_1/Q8_0
//! bit-identical to MLX's own GGUF loader), except that the q/k projection
//! rows are un-permuted back to the Hugging Face rotary layout (llama only).
//! The other llama.cpp types (Q2_K..Q6_K, IQ4_NL, IQ4_XS) are dequantized to
//! float16 ([`gguf::dequant`]); `rmlx convert --quant` then re-quantizes them
//! to the recipe. F32/F16/BF16 tensors are copied as is, except Gemma norm
//! weights, which lose the `+ 1` llama.cpp adds on export. The data is
//! streamed one tensor at a time ([`gguf::plan`]).

// Public API for the CLI; not every helper is used by the binary.
#![allow(dead_code)]

pub mod ct2;
pub mod gguf;
pub mod llama;
pub mod mlx;
pub mod quant;
pub mod tokenizer;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use gguf::plan::{plan_tensor, LazyView, OutTensor, Part, Source};
use gguf::GgufFile;

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

/// Removes the temporary output directory unless disarmed.
pub(crate) struct TempDirGuard(pub(crate) Option<PathBuf>);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
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

/// Writes `shards` into `tmp` as MLX safetensors (`model.safetensors`, or
/// `model-0000i-of-0000n.safetensors` when there are several), each tensor
/// read through `view`. `View::data` cannot fail, so a producer leaves its
/// first error in `error`, which stops the writing after that shard. Adds the
/// file names to `files`; returns the weight map (tensor -> file).
pub(crate) fn write_shards<'a, T, V: safetensors::View>(
    tmp: &Path,
    shards: &[Vec<&'a T>],
    name: impl Fn(&T) -> &str,
    view: impl Fn(&'a T) -> V,
    error: &RefCell<Option<anyhow::Error>>,
    files: &mut Vec<String>,
) -> Result<serde_json::Map<String, Value>> {
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        };
        let views: Vec<(String, V)> = shard.iter().map(|&t| (name(t).to_string(), view(t))).collect();
        let meta = HashMap::from([("format".to_string(), "mlx".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &tmp.join(&fname))
            .map_err(|e| anyhow!("writing {fname}: {e}"))?;
        if let Some(e) = error.borrow_mut().take() {
            return Err(e);
        }
        for &t in shard {
            weight_map.insert(name(t).to_string(), json!(fname));
        }
        files.push(fname);
    }
    Ok(weight_map)
}

/// Puts the finished `tmp` in place of `dst` and disarms `guard`. A `dst`
/// that appeared during the conversion is replaced only with `force`.
pub(crate) fn commit_dir(tmp: &Path, dst: &Path, force: bool, guard: &mut TempDirGuard) -> Result<()> {
    if dst.exists() {
        if !force {
            bail!("destination {} appeared during conversion", dst.display());
        }
        if dst.is_dir() {
            fs::remove_dir_all(dst).with_context(|| format!("removing old {}", dst.display()))?;
        } else {
            fs::remove_file(dst).with_context(|| format!("removing old {}", dst.display()))?;
        }
    }
    fs::rename(tmp, dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    guard.0 = None;
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
            "destination {} already exists (pass --force to overwrite it)",
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
            let bits = planned.iter().find_map(|t| match t.part {
                Part::Weight(k) => Some(k.bits()),
                _ => None,
            });
            modules.insert(mapped.module.clone(), bits);
        }
        outs.extend(planned);
    }
    let mut dequantized: BTreeMap<String, usize> = BTreeMap::new();
    for t in &outs {
        if let Part::DequantF16(ty) = t.part {
            *dequantized.entry(ty.name()).or_default() += 1;
        }
    }
    if !dequantized.is_empty() {
        let list: Vec<String> = dequantized.iter().map(|(k, v)| format!("{v} {k}")).collect();
        warnings.push(format!(
            "{} tensors have no exact MLX layout and were dequantized to float16 (pass --quant to re-quantize them)",
            list.join(", ")
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
    let weight_map = write_shards(&tmp, &shards, |t| &t.name, |t| LazyView { src: &source, t }, &source.error, &mut files)?;
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
    commit_dir(&tmp, dst, opts.force, &mut guard)?;

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
