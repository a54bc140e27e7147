//! model_type `bitnet` (BitNetForCausalLM, BitNet b1.58). Mirrors
//! mlx_lm/models/bitnet.py: Llama's layout with an RMSNorm over the attention
//! output before `o_proj` (`attn_sub_norm`), a ReLU²-gated MLP with an
//! RMSNorm before `down_proj` (`ffn_sub_norm`), and every projection a
//! ternary `BitLinear`. The projections come from `weights.linear` like any
//! other: the host builds them with the plugin that owns the checkpoint's
//! format (wquant-bitnet for `quantization_config.quant_method: bitnet`).
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, F intermediate, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, AttentionSpec, Block, Decoder, Dims, GateAct, Mlp, SelfAttention};
use rmlx_nn::{parse_config, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// The keys mlx-lm's bitnet `ModelArgs` reads, plus the `quantization_config`
/// that mlx-lm's loader reads for it.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub head_dim: Option<i32>,
    pub max_position_embeddings: Option<i32>,
    /// A `bias` on q/k/v/o_proj: the checkpoint must have exactly those.
    #[serde(default)]
    pub attention_bias: bool,
    /// A `bias` on gate/up/down_proj: the checkpoint must have exactly those.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_traditional: bool,
    pub rope_scaling: Option<serde_json::Value>,
    /// mlx-lm's default is tied.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// MLX's own section: refused (see `check`).
    pub quantization: Option<serde_json::Value>,
    pub quantization_config: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10000.0
}
fn yes() -> bool {
    true
}

const ATTN_PROJ: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP_PROJ: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.check()?;
        Ok(c)
    }
    fn head_dim(&self) -> i32 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn rope(&self) -> Result<Rope> {
        Rope::new(self.head_dim(), self.rope_theta, self.rope_traditional, self.rope_scaling.as_ref())
    }
    /// Refuses, by name, what this file does not implement or what mlx-lm's
    /// bitnet model would compute differently from what the host would build.
    fn check(&self) -> Result<()> {
        if self.num_attention_heads <= 0 || self.num_key_value_heads <= 0 {
            return Err(PluginError::config("num_attention_heads and num_key_value_heads must be positive"));
        }
        // attn_sub_norm is RMSNorm(hidden_size) over the merged heads [H*hd].
        if self.num_attention_heads * self.head_dim() != self.hidden_size {
            return Err(PluginError::config(format!(
                "bitnet: attn_sub_norm has hidden_size ({}) weights but num_attention_heads * head_dim is {}",
                self.hidden_size,
                self.num_attention_heads * self.head_dim()
            )));
        }
        self.rope()?;
        self.check_quantization()
    }
    /// mlx-lm's bitnet model builds every projection as a `BitLinear`
    /// (packed ternary, `invert_weight_scales` false: y = x·Wᵀ · weight_scale)
    /// whatever config.json says; its loader's `bitnet_quantize` only turns
    /// a plain `nn.Linear` (an untied `lm_head`) into one. The host picks
    /// each module's format from the config, so a config that would make
    /// it pick something else for the projections is refused here.
    fn check_quantization(&self) -> Result<()> {
        if self.quantization.is_some() {
            return Err(PluginError::config(
                "bitnet: config.json `quantization` (an MLX-quantized BitNet, whose BitLinear layers mlx-lm keeps packed without saying so) is not supported; BitNet checkpoints need quantization_config.quant_method `bitnet`",
            ));
        }
        let Some(qc) = self.quantization_config.as_ref().filter(|q| !q.is_null()) else {
            return Err(PluginError::config(
                "bitnet: quantization_config is missing; mlx-lm's bitnet layers are packed ternary BitLinear weights, announced by quantization_config.quant_method `bitnet`",
            ));
        };
        let method = qc.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "bitnet" {
            return Err(PluginError::config(format!(
                "bitnet: quantization_config.quant_method `{method}` is not supported; mlx-lm's bitnet layers are BitLinear (`bitnet`)"
            )));
        }
        let class = qc.get("linear_class").and_then(|c| c.as_str()).unwrap_or("");
        if class != "autobitlinear" {
            return Err(PluginError::config(format!(
                "bitnet: quantization_config.linear_class `{class}` is not supported: mlx-lm's bitnet layers multiply by weight_scale (`autobitlinear`) whatever linear_class says, and for `{class}` the bitnet weight format divides"
            )));
        }
        if let Some(list) = qc.get("modules_to_not_convert").and_then(|m| m.as_array()) {
            let is_proj = |m: &str| ATTN_PROJ.iter().chain(MLP_PROJ.iter()).any(|p| m.ends_with(p));
            if let Some(m) = list.iter().filter_map(|m| m.as_str()).find(|m| is_proj(m)) {
                return Err(PluginError::config(format!(
                    "bitnet: quantization_config.modules_to_not_convert lists `{m}`, but mlx-lm's bitnet projections are always BitLinear"
                )));
            }
        }
        Ok(())
    }
}

/// `attention_bias` / `mlp_bias` say which projections carry a `bias`;
/// mlx-lm loads strictly, so a missing or unexpected one is an error.
fn check_biases(w: &Weights, p: &str, c: &Config) -> Result<()> {
    let groups = [
        ("attention_bias", c.attention_bias, "self_attn", &ATTN_PROJ[..]),
        ("mlp_bias", c.mlp_bias, "mlp", &MLP_PROJ[..]),
    ];
    for (key, want, module, projs) in groups {
        for proj in projs {
            let name = format!("{p}.{module}.{proj}.bias");
            if w.contains(&name) != want {
                let what = if want { "missing" } else { "unexpected" };
                return Err(PluginError::config(format!("bitnet: {key} is {want} but {name} is {what}")));
            }
        }
    }
    Ok(())
}

/// A sub-norm's weight, which must be `[n]` (mlx-lm's `RMSNorm(n)`).
fn norm_weight(w: &mut Weights, name: &str, n: i32, key: &str) -> Result<Array> {
    let t = w.tensor(name)?;
    if t.shape() != [n] {
        return Err(PluginError::config(format!("bitnet: {name} has shape {:?}, expected [{key} = {n}]", t.shape())));
    }
    Ok(t)
}

// ---- attention ----

/// Llama attention, then attn_sub_norm over [B, L, H*hd] before o_proj.
fn attention(w: &mut Weights, p: &str, c: &Config) -> Result<SelfAttention> {
    let spec = AttentionSpec {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim(),
        qk_norm: false,
        eps: c.rms_norm_eps,
        window: 0,
        rope: c.rope()?,
    };
    let attn = SelfAttention::load(w, &format!("{p}.self_attn"), spec)?;
    let name = format!("{p}.self_attn.attn_sub_norm.weight");
    let sub_norm = norm_weight(w, &name, c.hidden_size, "hidden_size")?; // [D] = [H*hd]
    Ok(attn.with_sub_norm(sub_norm))
}

// ---- MLP ----

/// down(ffn_sub_norm(relu²(gate(x)) * up(x))): [B, L, D] -> [F] -> [B, L, D].
fn mlp(w: &mut Weights, p: &str, c: &Config) -> Result<Mlp> {
    let mlp = Mlp::load(w, &format!("{p}.mlp"))?.with_activation(GateAct::Relu2);
    let name = format!("{p}.mlp.ffn_sub_norm.weight");
    let sub_norm = norm_weight(w, &name, c.intermediate_size, "intermediate_size")?; // [F]
    Ok(mlp.with_sub_norm(sub_norm, c.rms_norm_eps))
}

// ---- block ----

/// Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)).
fn block(w: &mut Weights, p: &str, c: &Config) -> Result<Block> {
    check_biases(w, p, c)?;
    let self_attn = attention(w, p, c)?;
    let mlp = mlp(w, p, c)?;
    Block::from_parts(w, p, self_attn, mlp, c.rms_norm_eps)
}

// ---- model ----

pub struct BitNet {
    config: Config,
    decoder: Decoder,
}

impl BitNet {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let (n, eps, tied) = (c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings);
        let decoder = Decoder::load_blocks(w, n, eps, tied, |w, _, p| block(w, p, &c))?;
        Ok(Self { config: c, decoder })
    }
}

impl ModelImpl for BitNet {
    fn spec(&self) -> ModelSpec {
        cache_spec(&self.config)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        self.decoder.forward(tokens, attn)
    }
}

// ---- weight sanitising ----
// mlx-lm's sanitize drops `self_attn.rotary_emb.inv_freq` and, when tied,
// `lm_head.weight`: this file never asks for either.

// ---- cache spec ----

fn cache_spec(c: &Config) -> ModelSpec {
    let dims = Dims {
        num_layers: c.num_hidden_layers,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim(),
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        max_context: c.max_position_embeddings.unwrap_or(0),
    };
    model_spec(dims, |_| 0)
}
