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
//! Names (CT2 -> mlx-whisper), `E` = `encoder/layer_i`, `D` = `decoder/layer_i`:
//!
//! | CT2 | mlx-whisper | shape change |
//! |---|---|---|
//! | `encoder/conv{1,2}/weight` | `encoder.conv{1,2}.weight` | `[out, in, k]` -> `[out, k, in]` |
//! | `E/self_attention/linear_0` (fused q, k, v) | `encoder.blocks.i.attn.{query,key,value}` | rows split in 3; k has no bias |
//! | `E/self_attention/linear_1` | `...attn.out` | |
//! | `E/self_attention/layer_norm/{gamma,beta}` | `...attn_ln.{weight,bias}` | |
//! | `E/ffn/linear_{0,1}`, `E/ffn/layer_norm` | `...mlp1`, `...mlp2`, `...mlp_ln` | |
//! | `encoder/layer_norm` | `encoder.ln_post` | |
//! | `encoder/position_encodings/encodings` | (none: mlx-whisper computes the sinusoids; checked equal) | |
//! | `decoder/embeddings/weight` | `decoder.token_embedding.weight` | |
//! | `decoder/position_encodings/encodings` | `decoder.positional_embedding` | |
//! | `D/self_attention/linear_0`, `linear_1`, `layer_norm` | `decoder.blocks.i.attn.{query,key,value}`, `.out`, `attn_ln` | |
//! | `D/attention/linear_0` (q), `linear_1` (fused k, v), `linear_2`, `layer_norm` | `...cross_attn.query`, `.key`/`.value`, `.out`, `cross_attn_ln` | |
//! | `D/ffn/...` | `...mlp1`, `mlp2`, `mlp_ln` | |
//! | `decoder/layer_norm` | `decoder.ln` | |
//! | `decoder/projection/weight` | (tied: must equal the embedding) | |
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::{Ct2Dtype, Ct2Model};
use crate::convert::{temp_sibling, TempDirGuard};

/// Options for [`convert_ct2`].
#[derive(Debug, Clone, Default)]
pub struct Ct2Options {
    /// Replace `dst` if it exists.
    pub force: bool,
}

/// mlx-whisper's `ModelDimensions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Dims {
    pub n_mels: usize,
    pub n_audio_ctx: usize,
    pub n_audio_state: usize,
    pub n_audio_head: usize,
    pub n_audio_layer: usize,
    pub n_vocab: usize,
    pub n_text_ctx: usize,
    pub n_text_state: usize,
    pub n_text_head: usize,
    pub n_text_layer: usize,
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

/// A tensor ready to write: values already in the output type's bytes.
struct OutTensor {
    shape: Vec<usize>,
    dtype: Dtype,
    data: Vec<u8>,
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// The CT2 -> mlx-whisper mapping over one model.
struct Mapper<'a> {
    m: &'a Ct2Model,
    dtype: Dtype,
    out: BTreeMap<String, OutTensor>,
    used: BTreeSet<String>,
    warnings: Vec<String>,
}

impl Mapper<'_> {
    fn get(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let v = self.m.var(name).ok_or_else(|| anyhow!("{}: variable {name} is missing", self.m.path.display()))?;
        let shape = v.shape.clone();
        self.used.insert(name.to_string());
        if !v.dtype.is_float() {
            self.used.insert(format!("{name}_scale"));
        }
        Ok((shape, self.m.to_f32(name)?))
    }

    fn put(&mut self, name: String, shape: Vec<usize>, v: &[f32]) {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        self.out.insert(name, OutTensor { shape, dtype: self.dtype, data: encode(v, self.dtype) });
    }

    fn copy(&mut self, src: &str, dst: &str, want: &[usize]) -> Result<()> {
        let (shape, v) = self.get(src)?;
        if shape != want {
            bail!("{src}: expected shape {want:?}, found {shape:?}");
        }
        self.put(dst.to_string(), shape, &v);
        Ok(())
    }

    fn layer_norm(&mut self, src: &str, dst: &str, d: usize) -> Result<()> {
        self.copy(&format!("{src}/gamma"), &format!("{dst}.weight"), &[d])?;
        self.copy(&format!("{src}/beta"), &format!("{dst}.bias"), &[d])
    }

    fn linear(&mut self, src: &str, dst: &str, out: usize, inp: usize) -> Result<()> {
        self.copy(&format!("{src}/weight"), &format!("{dst}.weight"), &[out, inp])?;
        self.copy(&format!("{src}/bias"), &format!("{dst}.bias"), &[out])
    }

    /// A fused linear whose rows are `parts.len()` equal blocks; a part
    /// named with a trailing `!` has no bias in mlx-whisper (its CT2 bias
    /// block must be zero). [parts * d, d] -> parts x [d, d]
    fn split(&mut self, src: &str, parts: &[&str], d: usize) -> Result<()> {
        let n = parts.len();
        let (ws, w) = self.get(&format!("{src}/weight"))?;
        if ws != [n * d, d] {
            bail!("{src}/weight: expected shape [{}, {d}], found {ws:?}", n * d);
        }
        let (bs, b) = self.get(&format!("{src}/bias"))?;
        if bs != [n * d] {
            bail!("{src}/bias: expected shape [{}], found {bs:?}", n * d);
        }
        for (i, p) in parts.iter().enumerate() {
            let (p, has_bias) = match p.strip_suffix('!') {
                Some(p) => (p, false),
                None => (*p, true),
            };
            self.put(format!("{p}.weight"), vec![d, d], &w[i * d * d..(i + 1) * d * d]);
            let bias = &b[i * d..(i + 1) * d];
            if has_bias {
                self.put(format!("{p}.bias"), vec![d], bias);
            } else if let Some(x) = bias.iter().find(|x| **x != 0.0) {
                self.warnings.push(format!("{src}/bias: {p} has no bias in mlx-whisper, but CT2 stores {x} there (dropped)"));
            }
        }
        Ok(())
    }

    /// `[out, in, k]` -> `[out, k, in]` (MLX's conv1d weight layout).
    fn conv(&mut self, src: &str, dst: &str, out: usize, inp: usize) -> Result<()> {
        let (s, w) = self.get(&format!("{src}/weight"))?;
        if s.len() != 3 || s[0] != out || s[1] != inp {
            bail!("{src}/weight: expected shape [{out}, {inp}, k], found {s:?}");
        }
        let k = s[2];
        let mut t = vec![0f32; w.len()]; // [out, k, in]
        for o in 0..out {
            for i in 0..inp {
                for j in 0..k {
                    t[(o * k + j) * inp + i] = w[(o * inp + i) * k + j];
                }
            }
        }
        self.put(format!("{dst}.weight"), vec![out, k, inp], &t);
        self.copy(&format!("{src}/bias"), &format!("{dst}.bias"), &[out])
    }

    fn block(&mut self, ct: &str, mx: &str, d: usize, cross: bool) -> Result<()> {
        self.split(&format!("{ct}/self_attention/linear_0"), &[&format!("{mx}.attn.query"), &format!("{mx}.attn.key!"), &format!("{mx}.attn.value")], d)?;
        self.linear(&format!("{ct}/self_attention/linear_1"), &format!("{mx}.attn.out"), d, d)?;
        self.layer_norm(&format!("{ct}/self_attention/layer_norm"), &format!("{mx}.attn_ln"), d)?;
        if cross {
            self.linear(&format!("{ct}/attention/linear_0"), &format!("{mx}.cross_attn.query"), d, d)?;
            self.split(&format!("{ct}/attention/linear_1"), &[&format!("{mx}.cross_attn.key!"), &format!("{mx}.cross_attn.value")], d)?;
            self.linear(&format!("{ct}/attention/linear_2"), &format!("{mx}.cross_attn.out"), d, d)?;
            self.layer_norm(&format!("{ct}/attention/layer_norm"), &format!("{mx}.cross_attn_ln"), d)?;
        }
        let ff = self.m.var(&format!("{ct}/ffn/linear_0/weight")).map(|v| v.shape[0]).unwrap_or(4 * d);
        self.linear(&format!("{ct}/ffn/linear_0"), &format!("{mx}.mlp1"), ff, d)?;
        self.linear(&format!("{ct}/ffn/linear_1"), &format!("{mx}.mlp2"), d, ff)?;
        self.layer_norm(&format!("{ct}/ffn/layer_norm"), &format!("{mx}.mlp_ln"), d)
    }
}

/// mlx-whisper's `sinusoids(length, channels)`: [length, channels]
pub fn sinusoids(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let inc = (10000f64).ln() / (half as f64 - 1.0).max(1.0);
    let mut out = vec![0f32; length * channels];
    for t in 0..length {
        for i in 0..half {
            let x = t as f64 * (-inc * i as f64).exp();
            out[t * channels + i] = x.sin() as f32;
            out[t * channels + half + i] = x.cos() as f32;
        }
    }
    out
}

/// The model's dimensions, read from its variables.
pub fn dims(m: &Ct2Model) -> Result<Dims> {
    let shape = |n: &str| -> Result<Vec<usize>> {
        m.var(n).map(|v| v.shape.clone()).ok_or_else(|| anyhow!("{}: variable {n} is missing", m.path.display()))
    };
    let conv1 = shape("encoder/conv1/weight")?;
    let emb = shape("decoder/embeddings/weight")?;
    let apos = shape("encoder/position_encodings/encodings")?;
    let tpos = shape("decoder/position_encodings/encodings")?;
    if conv1.len() != 3 || emb.len() != 2 || apos.len() != 2 || tpos.len() != 2 {
        bail!("unexpected ranks: conv1 {conv1:?}, embeddings {emb:?}, positions {apos:?} / {tpos:?}");
    }
    let heads = |n: &str| -> Result<usize> {
        let h = m.int_scalar(n)?;
        usize::try_from(h).ok().filter(|&h| h > 0).ok_or_else(|| anyhow!("{n} = {h}"))
    };
    let d = Dims {
        n_mels: conv1[1],
        n_audio_ctx: apos[0],
        n_audio_state: conv1[0],
        n_audio_head: heads("encoder/num_heads")?,
        n_audio_layer: m.count_layers("encoder"),
        n_vocab: emb[0],
        n_text_ctx: tpos[0],
        n_text_state: emb[1],
        n_text_head: heads("decoder/num_heads")?,
        n_text_layer: m.count_layers("decoder"),
    };
    if d.n_audio_state % d.n_audio_head != 0 || d.n_text_state % d.n_text_head != 0 {
        bail!("state sizes {} / {} are not multiples of the head counts {} / {}", d.n_audio_state, d.n_text_state, d.n_audio_head, d.n_text_head);
    }
    if apos[1] != d.n_audio_state || tpos[1] != d.n_text_state {
        bail!("position encodings {apos:?} / {tpos:?} do not match the widths {} / {}", d.n_audio_state, d.n_text_state);
    }
    if d.n_audio_layer == 0 || d.n_text_layer == 0 {
        bail!("no encoder or decoder layers (encoder/layer_N, decoder/layer_N)");
    }
    Ok(d)
}

/// mlx-whisper's `alignment_heads` ([N, 2] int64 (layer, head) pairs, a
/// model attribute its converter saves with the weights): the CT2 config's
/// list, or mlx-whisper's default (every head of the last half of the layers).
fn alignment_heads(cfg: &Value, d: &Dims, warnings: &mut Vec<String>) -> Vec<[i64; 2]> {
    let default = || -> Vec<[i64; 2]> {
        (d.n_text_layer / 2..d.n_text_layer).flat_map(|l| (0..d.n_text_head).map(move |h| [l as i64, h as i64])).collect()
    };
    let Some(list) = cfg.get("alignment_heads").and_then(Value::as_array) else {
        return default();
    };
    let pairs: Option<Vec<[i64; 2]>> = list
        .iter()
        .map(|p| {
            let (l, h) = (p.get(0)?.as_i64()?, p.get(1)?.as_i64()?);
            ((0..d.n_text_layer as i64).contains(&l) && (0..d.n_text_head as i64).contains(&h)).then_some([l, h])
        })
        .collect();
    match pairs {
        Some(p) if !p.is_empty() => p,
        _ => {
            warnings.push("config.json's alignment_heads are not (layer, head) pairs of this model: mlx-whisper's default used".into());
            default()
        }
    }
}

/// Checks the scalar options of the spec that mlx-whisper's model fixes.
fn check_options(m: &Ct2Model, warnings: &mut Vec<String>) -> Result<()> {
    // ctranslate2 Activation enum: GELU = 3
    let expect: [(&str, i64, &str); 4] = [
        ("decoder/activation", 3, "GELU"),
        ("decoder/pre_norm", 1, "pre-norm"),
        ("decoder/alibi", 0, "no ALiBi"),
        ("decoder/scale_embeddings", 0, "unscaled embeddings"),
    ];
    for (name, want, what) in expect {
        if m.has(name) {
            let got = m.int_scalar(name)?;
            if got != want {
                bail!("{name} = {got}: mlx-whisper's model needs {what} ({want})");
            }
        }
    }
    if m.has("decoder/projection/bias") {
        bail!("decoder/projection has a bias: mlx-whisper ties the output projection to the embedding");
    }
    if m.vars.keys().any(|k| k.ends_with("weight_zero")) {
        bail!("the model has AWQ-style weights (weight_zero): not supported");
    }
    if m.revision > 3 {
        warnings.push(format!("WhisperSpec revision {} is newer than 3 (the newest known)", m.revision));
    }
    Ok(())
}

/// Picks the output float type: the type of the model's non-quantized
/// float variables (layer norms), as ctranslate2 does for its compute type.
fn out_dtype(m: &Ct2Model) -> Result<Dtype> {
    let v = m.var("decoder/layer_norm/gamma").ok_or_else(|| anyhow!("decoder/layer_norm/gamma is missing"))?;
    Ok(match v.dtype {
        Ct2Dtype::F16 => Dtype::F16,
        Ct2Dtype::Bf16 => Dtype::BF16,
        Ct2Dtype::F32 => Dtype::F32,
        d => bail!("decoder/layer_norm/gamma is {d}; expected a float type"),
    })
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
