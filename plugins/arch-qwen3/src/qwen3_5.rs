//! model_type `qwen3_5` (Qwen3.5 / Qwen3.6 dense hybrids), text model only.
//! Mirrors mlx_lm/models/qwen3_5.py, which reuses qwen3_next's attention,
//! MLP, MoE block and gated RMSNorm (so does this file: hybrid.rs's
//! `HybridModel`, as qwen3_next.rs does), and differs in:
//! - the config: the text model's keys sit under `text_config` (or at the top
//!   level when there is none), every key has a default, and RoPE comes from
//!   `rope_parameters` (`rope_theta`, `partial_rotary_factor`, the RoPE type;
//!   mlx-lm's defaults when the key is absent; `mrope_section` is unused by
//!   text-only input);
//! - the DeltaNet projections: four plain ones (`in_proj_qkv`, `in_proj_z`,
//!   `in_proj_b`, `in_proj_a`) instead of qwen3_next's grouped two;
//! - every layer's feed-forward is the MoE block when `num_experts` > 0
//!   (qwen3_5_moe.rs), else the dense MLP;
//! - tensors under `language_model.` (`language_model.model.*`,
//!   `language_model.lm_head`), as mlx-lm's `Model` names them, or in the
//!   Hugging Face layout that its `sanitize` rewrites (`model.language_model.*`
//!   or `model.*` and `lm_head`; conv1d [C, 1, K]; norms stored as offsets
//!   from 1), read as mlx-lm reads it (`layout`); the vision tower and the
//!   multi-token-prediction head (`mtp.*`) are not read (the host lists them
//!   as unused; the MTP head is for speculative decoding).
//!
//! Shapes: see hybrid.rs.
use crate::hybrid::{Hybrid, HybridModel, Projections};
use rmlx_nn::gated_delta::DeltaDims;
use rmlx_nn::parse_config;
use rmlx_plugin_api::{
    author::{Result, Weights},
    PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// mlx-lm's `TextModelArgs` keys with its defaults.
#[derive(Deserialize, Debug, Clone)]
#[serde(default)]
pub struct TextConfig {
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub num_key_value_heads: i32,
    pub max_position_embeddings: i32,
    pub linear_num_value_heads: i32,
    pub linear_num_key_heads: i32,
    pub linear_key_head_dim: i32,
    pub linear_value_head_dim: i32,
    pub linear_conv_kernel_dim: i32,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub head_dim: Option<i32>,
    pub full_attention_interval: i32,
    pub num_experts: i32,
    pub num_experts_per_tok: i32,
    /// Read by mlx-lm's qwen3_5 but unused there (every layer is MoE when
    /// num_experts > 0): only 1 is accepted.
    pub decoder_sparse_step: i32,
    pub shared_expert_intermediate_size: i32,
    pub moe_intermediate_size: i32,
    pub norm_topk_prob: bool,
    /// Absent: mlx-lm's default (type default, theta 1e5, factor 0.25);
    /// null or {}: the top-level keys below.
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Value>,
    // Not read by mlx-lm; checked against what it does.
    pub hidden_act: Option<String>,
    pub layer_types: Option<Vec<String>>,
    /// Not read by mlx-lm's qwen3_5 (it has no such layers): only an empty
    /// list is accepted.
    pub mlp_only_layers: Vec<i32>,
    #[serde(skip)]
    rope_parameters_given: bool,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            rms_norm_eps: 1e-6,
            vocab_size: 151936,
            num_key_value_heads: 8,
            max_position_embeddings: 131072,
            linear_num_value_heads: 64,
            linear_num_key_heads: 16,
            linear_key_head_dim: 192,
            linear_value_head_dim: 128,
            linear_conv_kernel_dim: 4,
            tie_word_embeddings: false,
            attention_bias: false,
            head_dim: None,
            full_attention_interval: 4,
            num_experts: 0,
            num_experts_per_tok: 0,
            decoder_sparse_step: 1,
            shared_expert_intermediate_size: 0,
            moe_intermediate_size: 0,
            norm_topk_prob: true,
            rope_parameters: None,
            partial_rotary_factor: 0.25,
            rope_theta: 100000.0,
            rope_scaling: None,
            hidden_act: None,
            layer_types: None,
            mlp_only_layers: Vec::new(),
            rope_parameters_given: false,
        }
    }
}

/// The top level: the text model's keys under `text_config`, or the top
/// level itself when there is none (mlx-lm's `ModelArgs.from_dict`).
pub struct Config {
    pub text: TextConfig,
}

impl Config {
    pub fn parse(json: &str, model_type: &'static str) -> Result<Hybrid> {
        let top: Value = parse_config(json)?;
        let text_json = match top.get("text_config") {
            Some(t) if t.is_object() => t.clone(),
            Some(t) if !t.is_null() => return Err(PluginError::config(format!("text_config must be an object, got {t}"))),
            _ => top,
        };
        let mut text: TextConfig = serde_json::from_value(text_json.clone())
            .map_err(|e| PluginError::config(format!("config.json text_config: {e}")))?;
        text.rope_parameters_given = text_json.get("rope_parameters").is_some();
        Config { text }.hybrid(model_type)
    }

    /// mlx-lm's `__post_init__`, then the shared checks.
    fn hybrid(self, model_type: &'static str) -> Result<Hybrid> {
        let t = self.text;
        let bad = |m: String| Err(PluginError::config(m));
        // rope_parameters: absent -> mlx-lm's default dict; a non-empty
        // object -> its values (with mlx-lm's defaults); null or {} -> the
        // top-level keys.
        let default_rope = serde_json::json!({
            "type": "default", "mrope_section": [11, 11, 10], "rope_theta": 100000, "partial_rotary_factor": 0.25
        });
        let params = if t.rope_parameters_given { t.rope_parameters.clone() } else { Some(default_rope) };
        let params = params.filter(|p| p.as_object().is_some_and(|o| !o.is_empty()));
        let (partial_rotary_factor, rope_theta, rope_scaling) = match params {
            Some(p) => {
                let num = |k: &str, d: f64| -> Result<f32> {
                    match p.get(k) {
                        None => Ok(d as f32),
                        Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| {
                            PluginError::config(format!("rope_parameters.{k} must be a number, got {v}"))
                        }),
                    }
                };
                (num("partial_rotary_factor", 0.25)?, num("rope_theta", 100000.0)?, Some(p.clone()))
            }
            None => (t.partial_rotary_factor, t.rope_theta, t.rope_scaling.clone()),
        };
        if t.decoder_sparse_step != 1 && t.num_experts > 0 {
            return bad(format!(
                "decoder_sparse_step {} is not supported for {model_type} (mlx-lm's qwen3_5 puts the MoE block in every layer)",
                t.decoder_sparse_step
            ));
        }
        if !t.mlp_only_layers.is_empty() {
            return bad(format!(
                "mlp_only_layers {:?} is not supported for {model_type} (mlx-lm's qwen3_5 has no dense-only layers)",
                t.mlp_only_layers
            ));
        }
        if let Some(a) = t.hidden_act.as_deref().filter(|a| *a != "silu") {
            return bad(format!("hidden_act `{a}` is not supported ({model_type} uses silu)"));
        }
        if t.num_attention_heads <= 0 {
            return bad(format!("num_attention_heads must be positive, got {}", t.num_attention_heads));
        }
        let h = Hybrid {
            model_type,
            hidden_size: t.hidden_size,
            num_hidden_layers: t.num_hidden_layers,
            intermediate_size: t.intermediate_size,
            num_attention_heads: t.num_attention_heads,
            num_key_value_heads: t.num_key_value_heads,
            head_dim: t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads),
            delta: DeltaDims {
                hidden: t.hidden_size,
                k_heads: t.linear_num_key_heads,
                v_heads: t.linear_num_value_heads,
                k_dim: t.linear_key_head_dim,
                v_dim: t.linear_value_head_dim,
                conv_kernel: t.linear_conv_kernel_dim,
                eps: t.rms_norm_eps,
            },
            num_experts: t.num_experts,
            num_experts_per_tok: t.num_experts_per_tok,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
            moe_intermediate_size: t.moe_intermediate_size,
            shared_expert_intermediate_size: t.shared_expert_intermediate_size,
            norm_topk_prob: t.norm_topk_prob,
            rms_norm_eps: t.rms_norm_eps,
            vocab_size: t.vocab_size,
            rope_theta,
            partial_rotary_factor,
            rope_scaling,
            max_position_embeddings: t.max_position_embeddings,
            tie_word_embeddings: t.tie_word_embeddings,
            full_attention_interval: t.full_attention_interval,
            layer_types: t.layer_types.clone(),
            attention_bias: t.attention_bias,
            projections: Projections::Split,
            hf_layout: false,
        };
        h.check()?;
        Ok(h)
    }
}

// ---- model ----

/// Where the text model's tensors are, as mlx-lm's `Model.sanitize` maps
/// names: `language_model.model.*` and `language_model.lm_head` (mlx-lm's
/// own layout), or the Hugging Face names `model.language_model.*` (or
/// `model.*`) and `lm_head`. The vision tower and `mtp.*` are not read.
/// Returns (model prefix, head module); sets `c.hf_layout` when the
/// checkpoint's conv1d weights are unsanitized ([C, 1, K], so mlx-lm also
/// shifts the norms by 1).
pub fn layout(w: &mut Weights, c: &mut Hybrid) -> Result<(&'static str, &'static str)> {
    let (model, head) = if w.contains("language_model.model.embed_tokens.weight") {
        ("language_model.model.", "language_model.lm_head")
    } else if w.contains("model.language_model.embed_tokens.weight") {
        ("model.language_model.", "lm_head")
    } else {
        ("model.", "lm_head")
    };
    // mlx-lm's `has_unsanitized_conv1d`: any conv1d weight whose last axis is not 1.
    let mut hf = false;
    for i in (0..c.num_hidden_layers).filter(|&i| c.is_linear(i)) {
        let name = format!("{model}layers.{i}.linear_attn.conv1d.weight");
        if w.contains(&name) && w.tensor(&name)?.shape().last() != Some(&1) {
            hf = true;
        }
    }
    c.hf_layout = hf;
    Ok((model, head))
}

pub fn load(config_json: &str, w: &mut Weights) -> Result<HybridModel> {
    let mut c = Config::parse(config_json, "qwen3_5")?;
    let (model, head) = layout(w, &mut c)?;
    HybridModel::load(c, w, model, head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Hybrid> {
        Config::parse(&format!(r#"{{"model_type":"qwen3_5","text_config":{{{text}}}}}"#), "qwen3_5")
    }

    #[test]
    fn rope_parameters_as_mlx_lm_reads_them() {
        // absent: mlx-lm's default dict wins over the top-level keys
        let h = parse(r#""rope_theta":5.0,"partial_rotary_factor":0.5"#).unwrap();
        assert_eq!((h.rope_theta, h.partial_rotary_factor), (100000.0, 0.25));
        assert_eq!(h.head_dim, 128);
        // given: its values, rope_type accepted as the type
        let h = parse(r#""rope_parameters":{"rope_type":"default","rope_theta":1e7,"partial_rotary_factor":0.5}"#).unwrap();
        assert_eq!((h.rope_theta, h.partial_rotary_factor), (1e7, 0.5));
        // null: the top-level keys
        let h = parse(r#""rope_parameters":null,"rope_theta":5.0,"partial_rotary_factor":0.5"#).unwrap();
        assert_eq!((h.rope_theta, h.partial_rotary_factor), (5.0, 0.5));
        // the flat form (no text_config)
        let flat = Config::parse(r#"{"model_type":"qwen3_5","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2}"#, "qwen3_5").unwrap();
        assert_eq!(flat.head_dim, 16);
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err = |t: &str| parse(t).unwrap_err().message.to_string();
        assert!(err(r#""rope_parameters":{"rope_type":"longrope"}"#).contains("longrope"));
        assert!(err(r#""num_experts":4,"num_experts_per_tok":2,"decoder_sparse_step":2"#).contains("decoder_sparse_step 2"));
        assert!(err(r#""mlp_only_layers":[0]"#).contains("mlp_only_layers"));
        assert!(err(r#""hidden_act":"gelu""#).contains("hidden_act"));
        assert!(err(r#""linear_num_value_heads":24"#).contains("linear_num_value_heads"));
    }
}
