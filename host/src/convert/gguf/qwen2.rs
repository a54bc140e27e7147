//! Qwen2 / Qwen2.5 specifics (`general.architecture` = `qwen2`): GGUF ->
//! Hugging Face / mlx-lm tensor names, hyper-parameters and `config.json`
//! for mlx-lm's `qwen2` model (plugins/arch-qwen3/src/qwen2.rs here).
//!
//! What llama.cpp's `convert_hf_to_gguf.py` does to a Qwen2 checkpoint, and
//! how it is undone here:
//! * q/k rows are *not* permuted (Qwen2 uses the rotate-half RoPE that the
//!   GGUF's NEOX rope type computes directly), so nothing is un-permuted;
//! * the q/k/v projections carry biases (`blk.N.attn_{q,k,v}.bias`), which
//!   become `self_attn.{q,k,v}_proj.bias`; no other tensor has a bias;
//! * `output.weight` is written only when the checkpoint does not tie it to
//!   the embeddings, so `tie_word_embeddings` is "no `output.weight`";
//! * head_dim is `hidden_size / num_attention_heads` in mlx-lm's qwen2 (it
//!   reads no `head_dim` key): a GGUF whose key length differs is refused;
//! * Qwen2.5 has sliding-window attention switched off
//!   (`use_sliding_window: false`); llama.cpp writes no window key for
//!   qwen2, and one that is present is refused, since mlx-lm's qwen2 has no
//!   windowed attention.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::GgufFile;
use crate::convert::llama::{eos_value, f32_as_f64, shared_module, split_name, Hparams, MappedName};
use crate::convert::tokenizer::TokenizerFiles;

const ARCH: &str = "qwen2";

/// Map a GGUF tensor name of a qwen2 model; `Ok(None)` for dropped tensors.
pub fn map_tensor_name(name: &str) -> Result<Option<MappedName>> {
    let n = split_name(name, &["weight", "bias"], ARCH)?;
    let unknown = || anyhow!("unknown tensor '{}' for a qwen2 model", name);
    if n.suffix == "bias" && !(n.layer.is_some() && matches!(n.part, "attn_q" | "attn_k" | "attn_v")) {
        bail!("tensor '{}': mlx-lm's qwen2 has biases only on the q/k/v projections", name);
    }
    let module = match (n.layer, n.part) {
        (None, "output") => "lm_head".to_string(),
        (None, "rope_freqs") => bail!("tensor 'rope_freqs.weight' (llama 3 rope scaling) is not supported for qwen2"),
        (Some(layer), "ffn_norm") => format!("model.layers.{layer}.post_attention_layernorm"),
        (layer, part) => shared_module(layer, part).ok_or_else(unknown)?,
    };
    Ok(Some(MappedName { module, suffix: n.suffix.to_string(), rotary: None }))
}

/// Hyper-parameters of a qwen2 GGUF.
#[derive(Debug, Clone)]
pub struct Qwen2Plan {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Value>,
    pub context_length: Option<u64>,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    pub warnings: Vec<String>,
}

impl Qwen2Plan {
    pub fn new(g: &GgufFile) -> Result<Self> {
        let p = |k: &str| format!("{ARCH}.{k}");
        let Hparams {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps,
            vocab_size,
            intermediate_size,
            head_dim,
        } = Hparams::read(g, ARCH)?;
        if head_dim * num_attention_heads != hidden_size {
            bail!(
                "head_dim {} x {} heads is not hidden_size {}: mlx-lm's qwen2 derives head_dim = hidden_size / heads",
                head_dim,
                num_attention_heads,
                hidden_size
            );
        }
        if let Some(v) = g.get_u64(&p("attention.value_length"))? {
            if v != head_dim {
                bail!("value_length {} differs from key_length {}: not supported by mlx-lm's qwen2", v, head_dim);
            }
        }
        if let Some(rd) = g.get_u64(&p("rope.dimension_count"))? {
            if rd != head_dim {
                bail!("partial rotary embeddings ({} of head_dim {}) are not supported by mlx-lm's qwen2", rd, head_dim);
            }
        }
        if let Some(w) = g.get_u64(&p("attention.sliding_window"))? {
            bail!("{} = {}: mlx-lm's qwen2 has no sliding-window attention", p("attention.sliding_window"), w);
        }
        for part in ["attn_q", "attn_k", "attn_v"] {
            if g.tensor(&format!("blk.0.{part}.bias")).is_none() {
                bail!("GGUF has no blk.0.{part}.bias: a qwen2 model has q/k/v projection biases");
            }
        }
        let rope_theta = g.get_f64(&p("rope.freq_base"))?.unwrap_or(1_000_000.0);
        let context_length = g.get_u64(&p("context_length"))?;
        let rope_scaling = match g.get_str(&p("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let f = g.get_f64(&p("rope.scaling.factor"))?.unwrap_or(1.0);
                (f != 1.0).then(|| json!({"type": "linear", "rope_type": "linear", "factor": f}))
            }
            Some("yarn") => {
                let f = g
                    .get_f64(&p("rope.scaling.factor"))?
                    .ok_or_else(|| anyhow!("yarn rope scaling without {}", p("rope.scaling.factor")))?;
                let orig = g.get_u64(&p("rope.scaling.original_context_length"))?.ok_or_else(|| {
                    anyhow!("yarn rope scaling without {}", p("rope.scaling.original_context_length"))
                })?;
                Some(json!({"type": "yarn", "rope_type": "yarn", "factor": f, "original_max_position_embeddings": orig}))
            }
            Some(other) => bail!("unsupported rope scaling type '{}' for qwen2", other),
        };
        Ok(Qwen2Plan {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            context_length,
            vocab_size,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            warnings: Vec::new(),
        })
    }

    /// config.json as Qwen2.5's own (model_type `qwen2`), with the GGUF's
    /// hyper-parameters.
    pub fn config_json(&self, g: &GgufFile, quant: Option<&Value>, tok: Option<&TokenizerFiles>) -> Result<Value> {
        let mut c = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            c.insert(k.to_string(), v);
        };
        put("architectures", json!(["Qwen2ForCausalLM"]));
        put("model_type", json!("qwen2"));
        put("hidden_size", json!(self.hidden_size));
        put("intermediate_size", json!(self.intermediate_size));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("num_key_value_heads", json!(self.num_key_value_heads));
        put("hidden_act", json!("silu"));
        put("rms_norm_eps", json!(f32_as_f64(self.rms_norm_eps)));
        put("rope_theta", json!(f32_as_f64(self.rope_theta)));
        put("rope_scaling", self.rope_scaling.clone().unwrap_or(Value::Null));
        let max_positions = self.context_length.unwrap_or(32768);
        put("max_position_embeddings", json!(max_positions));
        put("vocab_size", json!(self.vocab_size));
        put("tie_word_embeddings", json!(self.tie_word_embeddings));
        // Qwen2.5's own config: windows off, and the keys that would set one.
        put("use_sliding_window", json!(false));
        put("sliding_window", json!(max_positions));
        put("max_window_layers", json!(self.num_hidden_layers));
        if let Some(b) = tok.and_then(|t| t.bos_token_id) {
            put("bos_token_id", json!(b));
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

#[cfg(test)]
mod tests {
    use super::map_tensor_name;

    #[test]
    fn names_map_to_mlx_lm_qwen2() {
        let m = |n: &str| map_tensor_name(n).unwrap().map(|m| format!("{}.{}", m.module, m.suffix));
        assert_eq!(m("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(m("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(m("output_norm.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(m("blk.3.attn_q.bias").as_deref(), Some("model.layers.3.self_attn.q_proj.bias"));
        assert_eq!(m("blk.3.attn_v.weight").as_deref(), Some("model.layers.3.self_attn.v_proj.weight"));
        assert_eq!(m("blk.3.ffn_norm.weight").as_deref(), Some("model.layers.3.post_attention_layernorm.weight"));
        assert_eq!(m("blk.0.ffn_down.weight").as_deref(), Some("model.layers.0.mlp.down_proj.weight"));
        assert!(map_tensor_name("blk.0.attn_q.weight").unwrap().unwrap().rotary.is_none(), "qwen2 q/k are not permuted");
        let err = map_tensor_name("blk.0.attn_output.bias").unwrap_err().to_string();
        assert!(err.contains("only on the q/k/v"), "{err}");
        let err = map_tensor_name("blk.0.attn_q_norm.weight").unwrap_err().to_string();
        assert!(err.contains("unknown tensor"), "{err}");
    }
}
