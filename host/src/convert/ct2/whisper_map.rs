//! CTranslate2 `WhisperSpec` tensors -> mlx-whisper's names and layouts
//! (used by [`super::whisper::convert_ct2`]).
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
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Result};
use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::Value;

use super::{Ct2Dtype, Ct2Model};

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

/// A tensor ready to write: values already in the output type's bytes.
pub(super) struct OutTensor {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: Vec<u8>,
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// The CT2 -> mlx-whisper mapping over one model.
pub(super) struct Mapper<'a> {
    pub m: &'a Ct2Model,
    pub dtype: Dtype,
    pub out: BTreeMap<String, OutTensor>,
    pub used: BTreeSet<String>,
    pub warnings: Vec<String>,
}

impl Mapper<'_> {
    pub(super) fn get(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let v = self.m.var(name).ok_or_else(|| anyhow!("{}: variable {name} is missing", self.m.path.display()))?;
        let shape = v.shape.clone();
        self.used.insert(name.to_string());
        if !v.dtype.is_float() {
            self.used.insert(format!("{name}_scale"));
        }
        Ok((shape, self.m.to_f32(name)?))
    }

    pub(super) fn put(&mut self, name: String, shape: Vec<usize>, v: &[f32]) {
        debug_assert_eq!(shape.iter().product::<usize>(), v.len());
        self.out.insert(name, OutTensor { shape, dtype: self.dtype, data: encode(v, self.dtype) });
    }

    pub(super) fn copy(&mut self, src: &str, dst: &str, want: &[usize]) -> Result<()> {
        let (shape, v) = self.get(src)?;
        if shape != want {
            bail!("{src}: expected shape {want:?}, found {shape:?}");
        }
        self.put(dst.to_string(), shape, &v);
        Ok(())
    }

    pub(super) fn layer_norm(&mut self, src: &str, dst: &str, d: usize) -> Result<()> {
        self.copy(&format!("{src}/gamma"), &format!("{dst}.weight"), &[d])?;
        self.copy(&format!("{src}/beta"), &format!("{dst}.bias"), &[d])
    }

    pub(super) fn linear(&mut self, src: &str, dst: &str, out: usize, inp: usize) -> Result<()> {
        self.copy(&format!("{src}/weight"), &format!("{dst}.weight"), &[out, inp])?;
        self.copy(&format!("{src}/bias"), &format!("{dst}.bias"), &[out])
    }

    /// A fused linear whose rows are `parts.len()` equal blocks; a part
    /// named with a trailing `!` has no bias in mlx-whisper (its CT2 bias
    /// block must be zero). [parts * d, d] -> parts x [d, d]
    pub(super) fn split(&mut self, src: &str, parts: &[&str], d: usize) -> Result<()> {
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
    pub(super) fn conv(&mut self, src: &str, dst: &str, out: usize, inp: usize) -> Result<()> {
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

    pub(super) fn block(&mut self, ct: &str, mx: &str, d: usize, cross: bool) -> Result<()> {
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
pub(super) fn alignment_heads(cfg: &Value, d: &Dims, warnings: &mut Vec<String>) -> Vec<[i64; 2]> {
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
pub(super) fn check_options(m: &Ct2Model, warnings: &mut Vec<String>) -> Result<()> {
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
pub(super) fn out_dtype(m: &Ct2Model) -> Result<Dtype> {
    let v = m.var("decoder/layer_norm/gamma").ok_or_else(|| anyhow!("decoder/layer_norm/gamma is missing"))?;
    Ok(match v.dtype {
        Ct2Dtype::F16 => Dtype::F16,
        Ct2Dtype::Bf16 => Dtype::BF16,
        Ct2Dtype::F32 => Dtype::F32,
        d => bail!("decoder/layer_norm/gamma is {d}; expected a float type"),
    })
}
