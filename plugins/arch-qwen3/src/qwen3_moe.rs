//! model_type `qwen3_moe` (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder MoE).
//! Mirrors mlx_lm/models/qwen3_moe.py:
//! - qwen3's attention: per-head RMSNorm on queries and keys before RoPE,
//!   plain RoPE at `rope_theta` (mlx-lm builds `nn.RoPE` without scaling);
//! - layer i's feed-forward is a sparse MoE block when i is not in
//!   `mlp_only_layers`, `num_experts` > 0 and (i + 1) % `decoder_sparse_step`
//!   == 0, else the dense SwiGLU MLP of `intermediate_size`;
//! - the MoE block (plugins/nn moe.rs): router `gate` [D] -> [E], softmax
//!   (precise), the top `num_experts_per_tok` experts, their scores
//!   renormalised when `norm_topk_prob`, each expert a SwiGLU of
//!   `moe_intermediate_size` (switch layers `mlp.switch_mlp.{gate,up,down}_proj`,
//!   weight [E, out, in], as mlx-lm's `sanitize` stacks them);
//! - the output head tied to the embedding when `tie_word_embeddings`.
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, E experts, k experts per token, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, AttentionSpec, Block, Decoder, Dims, FeedForward, Mlp, SelfAttention};
use rmlx_nn::moe::SparseMoe;
use rmlx_nn::{parse_config, require_grouped_heads, require_positive, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// The keys mlx-lm's qwen3_moe `ModelArgs` reads (all required there but
/// `rope_scaling`), plus keys it ignores that would change the computation if
/// honoured (checked, so a config that needs them is refused by name).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    pub num_experts: i32,
    pub num_experts_per_tok: i32,
    pub decoder_sparse_step: i32,
    pub mlp_only_layers: Vec<i32>,
    pub moe_intermediate_size: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub num_key_value_heads: i32,
    pub head_dim: i32,
    pub rope_theta: Option<f32>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: i32,
    pub norm_topk_prob: bool,
    /// Read by mlx-lm but not applied (its RoPE is unscaled): only null or
    /// the default type is accepted.
    pub rope_scaling: Option<Value>,
    // Not read by mlx-lm; checked against what it does.
    /// transformers >= 5 nests rope_theta (and the RoPE type) here.
    pub rope_parameters: Option<Value>,
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let mut c: Config = parse_config(json)?;
        if let Some(p) = c.rope_parameters.clone().filter(|p| !p.is_null()) {
            if c.rope_theta.is_none() {
                c.rope_theta = p.get("rope_theta").and_then(Value::as_f64).map(|v| v as f32);
            }
            Self::check_rope_type("rope_parameters", &p)?;
        }
        if c.rope_theta.is_none() {
            return Err(PluginError::config("rope_theta is missing from the model config"));
        }
        c.check()?;
        Ok(c)
    }

    /// Whether layer i's feed-forward is the sparse MoE block (else the dense MLP).
    pub fn is_sparse(&self, i: i32) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1) % self.decoder_sparse_step == 0
    }

    fn rope(&self) -> Result<Rope> {
        Rope::new(self.head_dim, self.rope_theta.unwrap_or(10000.0), false, None)
    }

    /// A RoPE setting other than the default: mlx-lm's qwen3_moe would apply
    /// plain RoPE anyway, so rather than run something else it is refused.
    fn check_rope_type(key: &str, v: &Value) -> Result<()> {
        let ty = v.get("type").or_else(|| v.get("rope_type")).and_then(Value::as_str).unwrap_or("default");
        if ty != "default" {
            return Err(PluginError::config(format!(
                "{key} type `{ty}` is not supported for qwen3_moe (mlx-lm's qwen3_moe applies plain RoPE)"
            )));
        }
        Ok(())
    }

    /// Refuses, by name, what this file does not implement.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        require_positive(&positive)?;
        require_grouped_heads(self.num_attention_heads, self.num_key_value_heads)?;
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.num_experts < 0 {
            return bad(format!("num_experts must not be negative, got {}", self.num_experts));
        }
        if self.num_experts > 0 {
            if self.decoder_sparse_step < 1 {
                return bad(format!("decoder_sparse_step must be at least 1, got {}", self.decoder_sparse_step));
            }
            if !(1..=self.num_experts).contains(&self.num_experts_per_tok) {
                return bad(format!(
                    "num_experts_per_tok {} must be in 1..={} (num_experts)",
                    self.num_experts_per_tok, self.num_experts
                ));
            }
            if self.moe_intermediate_size <= 0 {
                return bad(format!("moe_intermediate_size must be positive, got {}", self.moe_intermediate_size));
            }
        }
        let dense_layers = (0..self.num_hidden_layers).any(|i| !self.is_sparse(i));
        if dense_layers && self.intermediate_size <= 0 {
            return bad(format!("intermediate_size must be positive, got {}", self.intermediate_size));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            Self::check_rope_type("rope_scaling", s)?;
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return bad(format!("hidden_act `{a}` is not supported (qwen3_moe uses silu)"));
        }
        if self.attention_bias {
            return bad("attention_bias true is not supported (mlx-lm's qwen3_moe has no attention biases)".into());
        }
        if self.use_sliding_window {
            return bad("use_sliding_window true is not supported (mlx-lm's qwen3_moe attends over the full context)".into());
        }
        Ok(())
    }
}

// ---- attention ----

/// qwen3's attention: q/k RMSNorm over hd, plain RoPE, full context.
fn attention_spec(c: &Config) -> Result<AttentionSpec> {
    Ok(AttentionSpec {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        qk_norm: true,
        eps: c.rms_norm_eps,
        window: 0,
        rope: c.rope()?,
    })
}

// ---- MLP / MoE ----

/// Layer i's feed-forward under `p` (`model.layers.{i}.mlp`):
/// x [B, L, D] -> [B, L, D].
fn feed_forward(w: &mut Weights, c: &Config, i: i32, p: &str) -> Result<Box<dyn FeedForward>> {
    if !c.is_sparse(i) {
        return Ok(Box::new(Mlp::load(w, p)?)); // [D] -> [intermediate_size] -> [D]
    }
    let moe = SparseMoe::load(w, p, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)?;
    Ok(Box::new(moe)) // [D] -> E x ([D] -> [moe_intermediate_size] -> [D]), k per token
}

// ---- block ----

fn block(w: &mut Weights, c: &Config, i: i32, p: &str) -> Result<Block> {
    let self_attn = SelfAttention::load(w, &format!("{p}.self_attn"), attention_spec(c)?)?;
    let mlp = feed_forward(w, c, i, &format!("{p}.mlp"))?;
    Block::with_ffn(w, p, self_attn, mlp, c.rms_norm_eps)
}

// ---- model ----

pub struct Qwen3Moe {
    config: Config,
    decoder: Decoder,
}

impl Qwen3Moe {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        // Weight sanitising as mlx-lm's: a tied head drops `lm_head` (the
        // decoder never asks for it); Hugging Face's per-expert tensors are
        // stacked at load by `SparseMoe::load`.
        let decoder = Decoder::load_blocks(w, c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings, |w, i, p| {
            block(w, &c, i, p)
        })?;
        Ok(Self { config: c, decoder })
    }
}

impl ModelImpl for Qwen3Moe {
    // ---- cache spec ----
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        let dims = Dims {
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            max_context: c.max_position_embeddings,
        };
        model_spec(dims, |_| 0)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        self.decoder.forward(tokens, attn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""model_type":"qwen3_moe","hidden_size":64,"num_hidden_layers":4,"intermediate_size":128,
        "num_attention_heads":4,"num_experts":8,"num_experts_per_tok":2,"decoder_sparse_step":2,
        "mlp_only_layers":[3],"moe_intermediate_size":32,"rms_norm_eps":1e-6,"vocab_size":256,
        "num_key_value_heads":2,"head_dim":16,"rope_theta":10000.0,"tie_word_embeddings":true,
        "max_position_embeddings":512,"norm_topk_prob":true"#;

    /// BASE with the keys of `extra` (`,"key":value,...`) set or replaced.
    fn json(extra: &str) -> Value {
        let mut v: Value = serde_json::from_str(&format!("{{{BASE}}}")).unwrap();
        let extra: Value = serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn cfg(extra: &str) -> Result<Config> {
        Config::parse(&json(extra).to_string())
    }

    #[test]
    fn sparse_layers_follow_step_and_mlp_only_layers() {
        let c = cfg("").unwrap();
        // (i + 1) % 2 == 0 -> 1 and 3; 3 is in mlp_only_layers.
        assert_eq!((0..4).map(|i| c.is_sparse(i)).collect::<Vec<_>>(), [false, true, false, false]);
        let c = cfg(r#","decoder_sparse_step":1,"mlp_only_layers":[]"#).unwrap();
        assert!((0..4).all(|i| c.is_sparse(i)));
        let c = cfg(r#","num_experts":0,"num_experts_per_tok":0"#).unwrap();
        assert!((0..4).all(|i| !c.is_sparse(i)));
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err = |extra: &str| cfg(extra).unwrap_err().message.to_string();
        assert!(err(r#","rope_scaling":{"rope_type":"yarn","factor":4.0}"#).contains("rope_scaling type `yarn`"));
        assert!(err(r#","hidden_act":"gelu""#).contains("hidden_act"));
        assert!(err(r#","attention_bias":true"#).contains("attention_bias"));
        assert!(err(r#","use_sliding_window":true"#).contains("use_sliding_window"));
        assert!(err(r#","decoder_sparse_step":0"#).contains("decoder_sparse_step"));
        assert!(err(r#","num_experts_per_tok":9"#).contains("num_experts_per_tok"));
        assert!(err(r#","num_key_value_heads":3"#).contains("num_key_value_heads"));
        // the keys mlx-lm requires are required
        for key in ["norm_topk_prob", "mlp_only_layers", "decoder_sparse_step", "head_dim", "tie_word_embeddings"] {
            let mut v = json("");
            v.as_object_mut().unwrap().remove(key);
            let e = Config::parse(&v.to_string()).unwrap_err().message.to_string();
            assert!(e.contains(&format!("missing field `{key}`")), "{e}");
        }
        // real Qwen3-MoE configs: null rope_scaling, silu, no sliding window, nested rope_parameters.
        assert!(cfg(r#","rope_scaling":null,"hidden_act":"silu","use_sliding_window":false,"attention_bias":false"#).is_ok());
        let mut nested = json(r#","rope_parameters":{"rope_type":"default","rope_theta":1000000.0}"#);
        nested.as_object_mut().unwrap().remove("rope_theta");
        assert_eq!(Config::parse(&nested.to_string()).unwrap().rope_theta, Some(1e6));
        nested["rope_parameters"]["rope_type"] = "yarn".into();
        assert!(Config::parse(&nested.to_string()).unwrap_err().message.contains("rope_parameters type `yarn`"));
    }
}
