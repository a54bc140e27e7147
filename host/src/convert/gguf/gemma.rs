//! Gemma-family specifics (`general.architecture` = `gemma`, `gemma2`,
//! `gemma3`): GGUF -> Hugging Face / mlx-lm tensor names, hyper-parameters and
//! `config.json` for mlx-lm's `gemma`, `gemma2` and `gemma3_text` models.
//!
//! What llama.cpp's `convert_hf_to_gguf.py` changes on export, and how it is
//! undone here:
//! * every tensor whose HF name ends in `norm.weight` gets `+ 1` (Gemma's
//!   RMSNorm scales by `1 + weight`; llama.cpp's by `weight`). That covers
//!   the layer norms, the final norm and Gemma 3's `q_norm`/`k_norm`; the
//!   converter subtracts 1 again ([`GemmaPlan::norm_offset`]).
//! * q/k rows are *not* permuted for Gemma, so nothing is un-permuted.
//! * `lm_head` is dropped (Gemma ties it to the embeddings); a Gemma 3 GGUF
//!   may carry an `output.weight`, which becomes `lm_head`.
//! * hyper-parameters that are not plain GGUF keys are fixed in llama.cpp:
//!   the attention scale (`query_pre_attn_scalar`) is `head_dim`, except for
//!   the 27B models (Gemma 2: 46 layers, Gemma 3: 62 layers) where it is
//!   `hidden_size / num_attention_heads`; Gemma 3's local rope base is
//!   10000 and its sliding-window pattern 6 (unless the GGUF has
//!   `gemma3.attention.sliding_window_pattern`).

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::GgufFile;
use crate::convert::llama::{eos_value, f32_as_f64, shared_module, split_name, Hparams, MappedName};
use crate::convert::tokenizer::TokenizerFiles;

/// Which Gemma generation a GGUF holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    Gemma,
    Gemma2,
    Gemma3,
}

impl Gen {
    pub fn from_arch(arch: &str) -> Option<Gen> {
        match arch {
            "gemma" => Some(Gen::Gemma),
            "gemma2" => Some(Gen::Gemma2),
            "gemma3" => Some(Gen::Gemma3),
            _ => None,
        }
    }

    /// GGUF `general.architecture` (and metadata key prefix).
    pub fn arch(self) -> &'static str {
        match self {
            Gen::Gemma => "gemma",
            Gen::Gemma2 => "gemma2",
            Gen::Gemma3 => "gemma3",
        }
    }

    /// mlx-lm / HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Gen::Gemma => "gemma",
            Gen::Gemma2 => "gemma2",
            Gen::Gemma3 => "gemma3_text",
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Gen::Gemma => "GemmaForCausalLM",
            Gen::Gemma2 => "Gemma2ForCausalLM",
            Gen::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Layer count of the 27B model, whose attention scale differs.
    fn layers_27b(self) -> Option<u64> {
        match self {
            Gen::Gemma => None,
            Gen::Gemma2 => Some(46),
            Gen::Gemma3 => Some(62),
        }
    }
}

/// Map a GGUF tensor name of a Gemma model; `Ok(None)` for dropped tensors.
pub fn map_tensor_name(gen: Gen, name: &str) -> Result<Option<MappedName>> {
    let unknown = || anyhow!("unknown tensor '{}' for a {} model", name, gen.arch());
    let n = split_name(name, &["weight"], gen.arch())?;
    let module = match (n.layer, n.part, gen) {
        (None, "output", Gen::Gemma3) => "lm_head".to_string(),
        (None, "output", _) => bail!(
            "tensor 'output.weight': mlx-lm's {} ties the output projection to the embeddings and has no lm_head",
            gen.model_type()
        ),
        (None, "rope_freqs", _) => bail!("tensor 'rope_freqs.weight' (llama 3 rope scaling) is not supported for Gemma"),
        (Some(layer), part, _) if shared_module(Some(layer), part).is_none() => {
            let sub = match (part, gen) {
                // Gemma 1 has two norms per layer; its second is HF's
                // post_attention_layernorm (a pre-FFN norm despite the name).
                ("ffn_norm", Gen::Gemma) => "post_attention_layernorm",
                ("ffn_norm", _) => "pre_feedforward_layernorm",
                ("post_attention_norm", Gen::Gemma2 | Gen::Gemma3) => "post_attention_layernorm",
                ("post_ffw_norm", Gen::Gemma2 | Gen::Gemma3) => "post_feedforward_layernorm",
                ("attn_q_norm", Gen::Gemma3) => "self_attn.q_norm",
                ("attn_k_norm", Gen::Gemma3) => "self_attn.k_norm",
                _ => return Err(unknown()),
            };
            format!("model.layers.{layer}.{sub}")
        }
        (layer, part, _) => shared_module(layer, part).ok_or_else(unknown)?,
    };
    Ok(Some(MappedName { module, suffix: "weight".to_string(), rotary: None }))
}

/// Hyper-parameters of a Gemma GGUF.
#[derive(Debug, Clone)]
pub struct GemmaPlan {
    pub gen: Gen,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: Option<u64>,
    pub vocab_size: u64,
    pub query_pre_attn_scalar: u64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: Option<u64>,
    pub sliding_window_pattern: u64,
    pub rope_scaling: Option<Value>,
    pub tie_word_embeddings: bool,
    pub warnings: Vec<String>,
}

impl GemmaPlan {
    pub fn new(g: &GgufFile, gen: Gen) -> Result<Self> {
        let p = |k: &str| format!("{}.{k}", gen.arch());
        let mut warnings = Vec::new();
        let Hparams {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps,
            vocab_size,
            intermediate_size,
            head_dim,
        } = Hparams::read(g, gen.arch())?;
        let default_theta = if gen == Gen::Gemma3 { 1_000_000.0 } else { 10_000.0 };
        let rope_theta = g.get_f64(&p("rope.freq_base"))?.unwrap_or(default_theta);
        let context_length = g.get_u64(&p("context_length"))?;

        if let Some(v) = g.get_u64(&p("attention.value_length"))? {
            if v != head_dim {
                bail!("value_length {} differs from key_length {}: not supported by mlx-lm's Gemma", v, head_dim);
            }
        }
        if let Some(rd) = g.get_u64(&p("rope.dimension_count"))? {
            if rd != head_dim {
                bail!("partial rotary embeddings ({} of head_dim {}) are not supported", rd, head_dim);
            }
        }
        let query_pre_attn_scalar =
            if gen.layers_27b() == Some(num_hidden_layers) { hidden_size / num_attention_heads } else { head_dim };

        let attn_logit_softcapping = g.get_f64(&p("attn_logit_softcapping"))?;
        let final_logit_softcapping = g.get_f64(&p("final_logit_softcapping"))?;
        let sliding_window = g.get_u64(&p("attention.sliding_window"))?;
        if gen == Gen::Gemma2 {
            // llama.cpp treats missing caps as 0 (no cap); HF's defaults are 50 and 30.
            if attn_logit_softcapping.is_none() || final_logit_softcapping.is_none() {
                warnings.push(
                    "gemma2 GGUF without attn_logit_softcapping/final_logit_softcapping: mlx-lm's defaults (50, 30) apply".into(),
                );
            }
        }
        if gen == Gen::Gemma && (attn_logit_softcapping.is_some() || final_logit_softcapping.is_some()) {
            warnings.push(
                "gemma (v1) GGUF has logit soft-capping keys; Gemma 1 has no soft-capping and they are ignored".into(),
            );
        }
        let pattern_key = p("attention.sliding_window_pattern");
        let sliding_window_pattern = match g.get(&pattern_key) {
            _ if sliding_window.unwrap_or(0) == 0 => 1,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => n,
                // llama.cpp also writes per-layer bool arrays (true = sliding);
                // mlx-lm needs a period: sliding layers, then one global layer.
                _ => match v.as_array().map(|a| a.iter().map(|x| x.as_bool()).collect::<Option<Vec<bool>>>()) {
                    Some(Some(layers)) if period_of(&layers).is_some() => period_of(&layers).unwrap(),
                    _ => bail!(
                        "{} = {:?} is not a period or a per-layer pattern mlx-lm's gemma3_text can express",
                        pattern_key,
                        v
                    ),
                },
            },
            // llama.cpp's fixed Gemma 3 pattern: 5 sliding layers, then a global one.
            None => 6,
        };
        if gen == Gen::Gemma3 && final_logit_softcapping.is_some() {
            warnings.push(
                "gemma3 final_logit_softcapping is written to config.json but mlx-lm's gemma3_text ignores it".into(),
            );
        }

        let rope_scaling = match g.get_str(&p("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let f = g.get_f64(&p("rope.scaling.factor"))?.unwrap_or(1.0);
                (f != 1.0).then(|| json!({"rope_type": "linear", "factor": f}))
            }
            Some(other) => bail!("unsupported rope scaling type '{}' for {}", other, gen.arch()),
        };
        if rope_scaling.is_some() && gen != Gen::Gemma3 {
            bail!("rope scaling is not supported by mlx-lm's {}", gen.model_type());
        }

        let tie_word_embeddings = g.tensor("output.weight").is_none();
        Ok(GemmaPlan {
            gen,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            context_length,
            vocab_size,
            query_pre_attn_scalar,
            attn_logit_softcapping,
            final_logit_softcapping,
            sliding_window,
            sliding_window_pattern,
            rope_scaling,
            tie_word_embeddings,
            warnings,
        })
    }

    /// Norm weights carry llama.cpp's `+ 1`; the converter subtracts it.
    pub fn norm_offset(&self, m: &MappedName) -> bool {
        m.module.ends_with("norm")
    }

    pub fn config_json(&self, g: &GgufFile, quant: Option<&Value>, tok: Option<&TokenizerFiles>) -> Result<Value> {
        let mut c = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            c.insert(k.to_string(), v);
        };
        put("architectures", json!([self.gen.hf_class()]));
        put("model_type", json!(self.gen.model_type()));
        put("hidden_size", json!(self.hidden_size));
        put("intermediate_size", json!(self.intermediate_size));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("num_key_value_heads", json!(self.num_key_value_heads));
        put("head_dim", json!(self.head_dim));
        put("hidden_activation", json!("gelu_pytorch_tanh"));
        put("rms_norm_eps", json!(f32_as_f64(self.rms_norm_eps)));
        put("rope_theta", json!(f32_as_f64(self.rope_theta)));
        put("vocab_size", json!(self.vocab_size));
        put("tie_word_embeddings", json!(self.tie_word_embeddings));
        put("attention_bias", json!(false));
        if let Some(n) = self.context_length {
            put("max_position_embeddings", json!(n));
        }
        if self.gen != Gen::Gemma {
            put("query_pre_attn_scalar", json!(self.query_pre_attn_scalar));
            put("sliding_window", json!(self.sliding_window));
            put("final_logit_softcapping", json!(self.final_logit_softcapping.map(f32_as_f64)));
        }
        match self.gen {
            Gen::Gemma => {}
            Gen::Gemma2 => {
                put("attn_logit_softcapping", json!(self.attn_logit_softcapping.map(f32_as_f64)));
            }
            Gen::Gemma3 => {
                put("sliding_window_pattern", json!(self.sliding_window_pattern));
                put("rope_local_base_freq", json!(10000.0));
                put("rope_scaling", self.rope_scaling.clone().unwrap_or(Value::Null));
            }
        }
        if let Some(b) = tok.and_then(|t| t.bos_token_id) {
            put("bos_token_id", json!(b));
        }
        if let Some(p) = tok.and_then(|t| t.pad_token_id) {
            put("pad_token_id", json!(p));
        }
        if let Some(e) = eos_value(tok) {
            put("eos_token_id", e);
        }
        if let Some(q) = quant {
            put("quantization", q.clone());
            put("quantization_config", q.clone());
        }
        if let Some(name) = g.get_str("general.name")? {
            put("_name_or_path", json!(name));
        }
        Ok(Value::Object(c))
    }
}

/// The period `n` of a per-layer sliding pattern where layer `i` is global
/// exactly when `(i + 1) % n == 0` (mlx-lm's gemma3_text rule).
fn period_of(sliding: &[bool]) -> Option<u64> {
    let n = sliding.iter().position(|s| !s).map_or(sliding.len() + 1, |i| i + 1);
    let ok = sliding.iter().enumerate().all(|(i, &s)| s != (i + 1).is_multiple_of(n));
    ok.then_some(n as u64)
}

/// Subtract 1 from every element of a little-endian F32/F16/BF16 tensor
/// (undoes llama.cpp's Gemma norm `+ 1`, in the tensor's own precision).
pub fn sub_one(dtype: safetensors::Dtype, raw: &[u8]) -> Result<Vec<u8>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .flat_map(|b| (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) - 1.0).to_le_bytes())
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .flat_map(|b| {
                let v = half::f16::from_le_bytes([b[0], b[1]]).to_f32() - 1.0;
                half::f16::from_f32(v).to_le_bytes()
            })
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .flat_map(|b| {
                let v = half::bf16::from_le_bytes([b[0], b[1]]).to_f32() - 1.0;
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect(),
        other => bail!("cannot undo the Gemma norm offset on a {:?} tensor (expected F32, F16 or BF16)", other),
    })
}

#[cfg(test)]
mod tests {
    use super::period_of;

    #[test]
    fn sliding_pattern_periods() {
        let p = |s: &str| s.chars().map(|c| c == 's').collect::<Vec<_>>();
        assert_eq!(period_of(&p("sssssgsssssg")), Some(6));
        assert_eq!(period_of(&p("sssssgsss")), Some(6));
        assert_eq!(period_of(&p("gggg")), Some(1));
        assert_eq!(period_of(&p("sgsg")), Some(2));
        assert_eq!(period_of(&p("ssgsg")), None);
    }
}
