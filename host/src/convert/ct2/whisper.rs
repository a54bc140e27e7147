//! CTranslate2 `WhisperSpec` -> mlx-whisper's layout.
//!
//! Output directory:
//! * `config.json`: `model_type: "whisper"` and mlx-whisper's
//!   `ModelDimensions` (`n_mels`, `n_audio_ctx`, `n_audio_state`,
//!   `n_audio_head`, `n_audio_layer`, `n_vocab`, `n_text_ctx`,
//!   `n_text_state`, `n_text_head`, `n_text_layer`) and nothing else
//!   (mlx-whisper passes every other key to `ModelDimensions`);
//! * `weights.safetensors` with mlx-whisper's parameter names (below), and
//!   `alignment_heads` ([N, 2] int64, from the CT2 config; mlx-whisper's
//!   converter saves it too, and `load_model` sets it);
//! * `generation_config.json` (Hugging Face's Whisper keys: special token
//!   ids, `suppress_tokens`, `begin_suppress_tokens`, `alignment_heads`,
//!   `lang_to_id`, `task_to_id`), from the CT2 `config.json` and vocabulary;
//! * `tokenizer.json`: the source's own if it has one, else built from the
//!   vocabulary ([`super::tokenizer`]); `vocabulary.json` (the CT2 vocabulary).
//!
//! The tensor names and shapes are in [`super::whisper_map`].
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::whisper_map::{alignment_heads, check_options, out_dtype, Mapper, OutTensor};
pub use super::whisper_map::{dims, sinusoids, Dims};
use super::Ct2Model;
use crate::convert::{temp_sibling, TempDirGuard};

/// Options for [`convert_ct2`].
#[derive(Debug, Clone, Default)]
pub struct Ct2Options {
    /// Replace `dst` if it exists.
    pub force: bool,
}

/// Summary of a conversion.
#[derive(Debug, Clone)]
pub struct Ct2Report {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub spec: String,
    pub revision: u32,
    pub binary_version: u32,
    pub dims: Dims,
    /// Source variable types and counts (e.g. "float16": 148).
    pub source_types: BTreeMap<String, usize>,
    /// Type written ("float16", "float32", "bfloat16").
    pub out_dtype: String,
    pub tensors_written: usize,
    pub parameters: u64,
    /// "copied" or "built from the vocabulary".
    pub tokenizer: String,
    pub files: Vec<String>,
    pub warnings: Vec<String>,
}

impl fmt::Display for Ct2Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "converted {} -> {}", self.src.display(), self.dst.display())?;
        let d = &self.dims;
        writeln!(
            f,
            "  {} rev {} (model.bin v{}): whisper, {} mels, encoder {}x{} ({} heads), decoder {}x{} ({} heads), vocab {}, {:.1} M parameters",
            self.spec,
            self.revision,
            self.binary_version,
            d.n_mels,
            d.n_audio_layer,
            d.n_audio_state,
            d.n_audio_head,
            d.n_text_layer,
            d.n_text_state,
            d.n_text_head,
            d.n_vocab,
            self.parameters as f64 / 1e6
        )?;
        let types: Vec<String> = self.source_types.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(f, "  source types: {}; wrote {} tensors as {}", types.join(", "), self.tensors_written, self.out_dtype)?;
        writeln!(f, "  tokenizer.json {}; files: {}", self.tokenizer, self.files.join(", "))?;
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}

/// Reads `vocabulary.json` (a JSON list) or `vocabulary.txt` (one token a line).
pub fn read_vocabulary(dir: &Path) -> Result<Vec<String>> {
    let j = dir.join("vocabulary.json");
    if j.is_file() {
        let s = fs::read_to_string(&j).with_context(|| format!("reading {}", j.display()))?;
        return serde_json::from_str(&s).with_context(|| format!("{}: expected a JSON list of strings", j.display()));
    }
    let t = dir.join("vocabulary.txt");
    if t.is_file() {
        let s = fs::read_to_string(&t).with_context(|| format!("reading {}", t.display()))?;
        let mut v: Vec<String> = s.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect();
        if v.last().is_some_and(|l| l.is_empty()) {
            v.pop();
        }
        return Ok(v);
    }
    bail!("{}: no vocabulary.json or vocabulary.txt", dir.display())
}

/// Hugging Face-style generation_config.json for Whisper, from the CT2
/// config.json and the vocabulary.
fn generation_config(cfg: &Value, vocab: &[String], n_text_ctx: usize) -> Value {
    let id = |t: &str| vocab.iter().position(|v| v == t).map(|i| json!(i)).unwrap_or(Value::Null);
    let lang_ids: Vec<u64> = cfg["lang_ids"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
    let lang_to_id: serde_json::Map<String, Value> =
        lang_ids.iter().filter_map(|&i| vocab.get(i as usize).map(|t| (t.clone(), json!(i)))).collect();
    let multilingual = vocab.len() >= 51865;
    json!({
        "alignment_heads": cfg.get("alignment_heads").cloned().unwrap_or(Value::Null),
        "begin_suppress_tokens": cfg.get("suppress_ids_begin").cloned().unwrap_or(json!([])),
        "bos_token_id": id("<|endoftext|>"),
        "decoder_start_token_id": id("<|startoftranscript|>"),
        "eos_token_id": id("<|endoftext|>"),
        "pad_token_id": id("<|endoftext|>"),
        "is_multilingual": multilingual,
        "lang_to_id": lang_to_id,
        "task_to_id": {"transcribe": id("<|transcribe|>"), "translate": id("<|translate|>")},
        "max_initial_timestamp_index": 50,
        "max_length": n_text_ctx,
        "no_timestamps_token_id": id("<|notimestamps|>"),
        "prev_sot_token_id": id("<|startofprev|>"),
        "timestamp_begin": id("<|0.00|>"),
        "suppress_tokens": cfg.get("suppress_ids").cloned().unwrap_or(json!([])),
    })
}

/// Convert the CTranslate2 Whisper directory `src` into an mlx-whisper
/// directory `dst` (written to a temporary sibling, renamed at the end).
pub fn convert_ct2(src: &Path, dst: &Path, opts: &Ct2Options) -> Result<Ct2Report> {
    if !src.is_dir() {
        bail!("{} is not a directory: --from-ct2 takes a CTranslate2 model directory (model.bin, config.json, vocabulary)", src.display());
    }
    if dst.exists() && !opts.force {
        bail!("destination {} already exists (pass --force to overwrite it)", dst.display());
    }
    let m = Ct2Model::open(src)?;
    if m.spec != "WhisperSpec" {
        bail!("{}: spec {:?}; only Whisper CTranslate2 models (WhisperSpec) are converted", m.path.display(), m.spec);
    }
    let mut warnings = Vec::new();
    check_options(&m, &mut warnings)?;
    let d = dims(&m)?;
    let dtype = out_dtype(&m)?;
    let mut source_types = BTreeMap::new();
    for v in m.vars.values().filter(|v| !v.shape.is_empty()) {
        *source_types.entry(v.dtype.to_string()).or_insert(0usize) += 1;
    }

    // ---- tensors ----
    let mut mp = Mapper { m: &m, dtype, out: BTreeMap::new(), used: BTreeSet::new(), warnings: Vec::new() };
    let (a, t) = (d.n_audio_state, d.n_text_state);
    mp.conv("encoder/conv1", "encoder.conv1", a, d.n_mels)?;
    mp.conv("encoder/conv2", "encoder.conv2", a, a)?;
    for i in 0..d.n_audio_layer {
        mp.block(&format!("encoder/layer_{i}"), &format!("encoder.blocks.{i}"), a, false)?;
    }
    mp.layer_norm("encoder/layer_norm", "encoder.ln_post", a)?;
    let (_, apos) = mp.get("encoder/position_encodings/encodings")?;
    let sin = sinusoids(d.n_audio_ctx, a);
    let dev = apos.iter().zip(&sin).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    if dev > 2e-3 {
        mp.warnings.push(format!(
            "encoder/position_encodings differ from the sinusoids mlx-whisper computes by up to {dev} (not written: mlx-whisper does not load them)"
        ));
    }
    mp.copy("decoder/embeddings/weight", "decoder.token_embedding.weight", &[d.n_vocab, t])?;
    mp.copy("decoder/position_encodings/encodings", "decoder.positional_embedding", &[d.n_text_ctx, t])?;
    for i in 0..d.n_text_layer {
        mp.block(&format!("decoder/layer_{i}"), &format!("decoder.blocks.{i}"), t, true)?;
    }
    mp.layer_norm("decoder/layer_norm", "decoder.ln", t)?;
    match m.aliases.get("decoder/projection/weight") {
        Some(target) if target == "decoder/embeddings/weight" => {}
        _ if m.vars.contains_key("decoder/projection/weight") => {
            let (_, p) = mp.get("decoder/projection/weight")?;
            let e = m.to_f32("decoder/embeddings/weight")?;
            if p != e {
                bail!("decoder/projection/weight differs from decoder/embeddings/weight: mlx-whisper ties them");
            }
        }
        Some(other) => bail!("decoder/projection/weight is an alias of {other}, not of the embedding"),
        None => warnings.push("no decoder/projection/weight: the embedding is used as the output projection".into()),
    }
    mp.used.insert("decoder/projection/weight".into());
    let unused: Vec<&String> = m
        .vars
        .iter()
        .filter(|(k, v)| !v.shape.is_empty() && !mp.used.contains(*k))
        .map(|(k, _)| k)
        .collect();
    if !unused.is_empty() {
        bail!("variables with no place in mlx-whisper's model: {unused:?}");
    }
    warnings.append(&mut mp.warnings);
    let mut tensors = std::mem::take(&mut mp.out);
    let parameters: u64 = tensors.values().map(|t| t.shape.iter().product::<usize>() as u64).sum();

    // ---- side files ----
    let vocab = read_vocabulary(src)?;
    if vocab.len() != d.n_vocab {
        warnings.push(format!("the vocabulary has {} tokens, the embedding {} rows", vocab.len(), d.n_vocab));
    }
    let cfg_path = src.join("config.json");
    let ct2_cfg: Value = if cfg_path.is_file() {
        serde_json::from_str(&fs::read_to_string(&cfg_path)?).with_context(|| format!("parsing {}", cfg_path.display()))?
    } else {
        warnings.push("no config.json: suppress_tokens, lang_ids and alignment_heads are empty".into());
        json!({})
    };
    let heads = alignment_heads(&ct2_cfg, &d, &mut warnings);
    tensors.insert(
        "alignment_heads".into(),
        OutTensor { shape: vec![heads.len(), 2], dtype: Dtype::I64, data: heads.iter().flatten().flat_map(|x| x.to_le_bytes()).collect() },
    );
    let own_tok = src.join("tokenizer.json");
    let built = super::tokenizer::build(&vocab);
    let (tokenizer_json, tokenizer) = if own_tok.is_file() {
        let own = fs::read_to_string(&own_tok).with_context(|| format!("reading {}", own_tok.display()))?;
        if let Ok(b) = &built {
            if let Some(w) = super::tokenizer::missing_merges(&own, &b.json) {
                warnings.push(w);
            }
        }
        (own, "copied".to_string())
    } else {
        let b = built?;
        warnings.extend(b.warnings);
        (b.json, "built from the vocabulary".to_string())
    };

    // ---- write ----
    let tmp = temp_sibling(dst)?;
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut guard = TempDirGuard(Some(tmp.clone()));
    let mut files = Vec::new();
    let mut config = serde_json::Map::new();
    config.insert("model_type".into(), json!("whisper"));
    if let Value::Object(o) = serde_json::to_value(d)? {
        config.extend(o);
    }
    let write_json = |name: &str, v: &Value, files: &mut Vec<String>| -> Result<()> {
        fs::write(tmp.join(name), serde_json::to_string_pretty(v)? + "\n").with_context(|| format!("writing {name}"))?;
        files.push(name.to_string());
        Ok(())
    };
    write_json("config.json", &Value::Object(config), &mut files)?;
    write_json("generation_config.json", &generation_config(&ct2_cfg, &vocab, d.n_text_ctx), &mut files)?;
    write_json("vocabulary.json", &json!(vocab), &mut files)?;
    fs::write(tmp.join("tokenizer.json"), tokenizer_json).context("writing tokenizer.json")?;
    files.push("tokenizer.json".into());
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).map_err(|e| anyhow!("{k}: {e}"))?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "mlx".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &tmp.join("weights.safetensors"))
        .map_err(|e| anyhow!("writing weights.safetensors: {e}"))?;
    files.push("weights.safetensors".into());
    if dst.exists() {
        if dst.is_dir() {
            fs::remove_dir_all(dst).with_context(|| format!("removing old {}", dst.display()))?;
        } else {
            fs::remove_file(dst).with_context(|| format!("removing old {}", dst.display()))?;
        }
    }
    fs::rename(&tmp, dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    guard.0 = None;
    Ok(Ct2Report {
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        spec: m.spec.clone(),
        revision: m.revision,
        binary_version: m.binary_version,
        dims: d,
        source_types,
        out_dtype: match dtype {
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            _ => "float32",
        }
        .to_string(),
        tensors_written: tensors.len(),
        parameters,
        tokenizer,
        files,
        warnings,
    })
}
