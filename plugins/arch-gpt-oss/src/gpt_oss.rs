//! model_type `gpt_oss` (OpenAI's gpt-oss-20b and -120b).
//! Mirrors mlx_lm/models/gpt_oss.py:
//! - attention with q/k/v/o biases, scale 1/sqrt(head_dim), RoPE at
//!   `rope_theta` scaled as `rope_scaling` says (YaRN on the real models:
//!   `nn::yarn`), and learned per-head **sinks**: one more logit per head in
//!   the softmax, which takes probability mass and adds no value
//!   (`AttendOpts::sinks`; every KV store of the host honours it);
//! - layers alternate between a sliding window of `sliding_window` tokens
//!   and full attention, as `layer_types` says (default: sliding, full,
//!   sliding, full, ...);
//! - every feed-forward is a mixture of experts: router `mlp.router` [D] -> [E]
//!   with a bias, the top `num_experts_per_tok` of its logits, a softmax over
//!   those k, and the experts `mlp.experts.{gate,up,down}_proj` (switch layers
//!   with biases, weight [E, out, in]) through gpt-oss's clamped SwiGLU
//!   (`swiglu_oai`: alpha 1.702, limit 7);
//! - pre-norm blocks (RMSNorm), a final RMSNorm and an untied `lm_head`.
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, E experts, k experts per token, F expert intermediate, V vocab.
use mlx_rs::Array;
use rmlx_nn::decoder::{model_spec, AttentionSpec, Block, Decoder, Dims, FeedForward, GateAct, SelfAttention};
use rmlx_nn::moe::{combine, top_k_softmax, SwitchGlu};
use rmlx_nn::{parse_config, require_grouped_heads, require_positive, Rope};
use rmlx_plugin_api::{
    author::{Attend, LinearLayer, ModelImpl, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

pub const SLIDING: &str = "sliding_attention";
pub const FULL: &str = "full_attention";

/// The keys mlx-lm's gpt_oss `ModelArgs` reads, with its defaults (those of
/// gpt-oss-120b), plus keys it ignores that would change the computation if
/// honoured (checked, so a config that needs them is refused by name).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i32,
    #[serde(default = "d_experts")]
    pub num_local_experts: i32,
    #[serde(default = "d_top_k")]
    pub num_experts_per_tok: i32,
    #[serde(default = "d_vocab")]
    pub vocab_size: i32,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "d_hidden")]
    pub hidden_size: i32,
    #[serde(default = "d_hidden")]
    pub intermediate_size: i32,
    #[serde(default = "d_head_dim")]
    pub head_dim: i32,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i32,
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: i32,
    #[serde(default = "d_window")]
    pub sliding_window: i64,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<Value>,
    pub layer_types: Option<Vec<String>>,
    // Not read by mlx-lm.
    /// The cache spec's context (0 when absent).
    #[serde(default)]
    pub max_position_embeddings: i32,
    /// mlx-lm always builds the biases: only true.
    pub attention_bias: Option<bool>,
    /// mlx-lm's `SwigluOAI()` clips at 7: only 7.
    pub swiglu_limit: Option<f64>,
    /// mlx-lm always reads `lm_head`: only false.
    pub tie_word_embeddings: Option<bool>,
    /// The original checkpoints' name for `num_experts_per_tok`: must agree.
    pub experts_per_token: Option<i32>,
    /// transformers >= 5 nests rope_theta and the scaling here; mlx-lm reads
    /// the flat keys, so it must say the same.
    pub rope_parameters: Option<Value>,
}

fn d_layers() -> i32 {
    36
}
fn d_experts() -> i32 {
    128
}
fn d_top_k() -> i32 {
    4
}
fn d_vocab() -> i32 {
    201088
}
fn d_eps() -> f32 {
    1e-5
}
fn d_hidden() -> i32 {
    2880
}
fn d_head_dim() -> i32 {
    64
}
fn d_heads() -> i32 {
    64
}
fn d_kv_heads() -> i32 {
    8
}
fn d_window() -> i64 {
    128
}
fn d_rope_theta() -> f32 {
    150000.0
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.check()?;
        Ok(c)
    }

    /// Layer i's kind (`sliding_attention` or `full_attention`): `layer_types`,
    /// else mlx-lm's default alternation starting with a sliding layer.
    pub fn layer_type(&self, i: i32) -> &str {
        match &self.layer_types {
            Some(t) => &t[i as usize],
            None if i % 2 == 0 => SLIDING,
            None => FULL,
        }
    }

    /// Layer i's attention window in tokens (0: full).
    pub fn window(&self, i: i32) -> u32 {
        if self.layer_type(i) == SLIDING {
            self.sliding_window as u32
        } else {
            0
        }
    }

    fn rope(&self) -> Result<Rope> {
        Rope::with_yarn(self.head_dim, self.rope_theta, false, self.rope_scaling.as_ref())
    }

    /// Refuses, by name, what this file does not implement or mlx-lm would not run.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("num_local_experts", self.num_local_experts),
        ];
        require_positive(&positive)?;
        require_grouped_heads(self.num_attention_heads, self.num_key_value_heads)?;
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(1..=self.num_local_experts).contains(&self.num_experts_per_tok) {
            return bad(format!(
                "num_experts_per_tok {} must be in 1..={} (num_local_experts)",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if let Some(e) = self.experts_per_token.filter(|e| *e != self.num_experts_per_tok) {
            return bad(format!(
                "experts_per_token {e} disagrees with num_experts_per_tok {} (mlx-lm routes to num_experts_per_tok)",
                self.num_experts_per_tok
            ));
        }
        if !(1..=i64::from(u32::MAX)).contains(&self.sliding_window) {
            return bad(format!("sliding_window must be at least 1, got {}", self.sliding_window));
        }
        self.check_layer_types()?;
        if self.attention_bias == Some(false) {
            return bad("attention_bias false is not supported (gpt-oss's attention has q/k/v/o biases)".into());
        }
        if let Some(l) = self.swiglu_limit.filter(|l| *l != 7.0) {
            return bad(format!("swiglu_limit {l} is not supported (mlx-lm's gpt_oss clips the experts' SwiGLU at 7)"));
        }
        if self.tie_word_embeddings == Some(true) {
            return bad("tie_word_embeddings true is not supported (mlx-lm's gpt_oss always reads lm_head)".into());
        }
        if let Some(p) = self.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            self.check_rope_parameters(p)?;
        }
        // Builds the RoPE: an unsupported rope_scaling type is refused here.
        self.rope()?;
        Ok(())
    }

    /// mlx-lm needs one entry per layer (`zip` would silently drop layers),
    /// and looks up one layer of each kind for the masks.
    fn check_layer_types(&self) -> Result<()> {
        let n = self.num_hidden_layers;
        let Some(t) = &self.layer_types else {
            if n % 2 != 0 {
                return Err(PluginError::config(format!(
                    "num_hidden_layers {n} is odd and layer_types is absent: mlx-lm's default layer_types \
                     (sliding, full) x {} would leave the last layer out",
                    n / 2
                )));
            }
            return Ok(());
        };
        if t.len() != n as usize {
            return Err(PluginError::config(format!(
                "layer_types has {} entries, num_hidden_layers is {n}",
                t.len()
            )));
        }
        if let Some((i, other)) = t.iter().enumerate().find(|(_, k)| *k != SLIDING && *k != FULL) {
            return Err(PluginError::config(format!(
                "layer_types[{i}] `{other}` is not supported (gpt_oss has `{SLIDING}` and `{FULL}` layers)"
            )));
        }
        for kind in [SLIDING, FULL] {
            if !t.iter().any(|k| k == kind) {
                return Err(PluginError::config(format!(
                    "layer_types has no `{kind}` layer (mlx-lm's gpt_oss needs at least one of each kind)"
                )));
            }
        }
        Ok(())
    }

    /// transformers >= 5's `rope_parameters` must say what the flat keys say.
    fn check_rope_parameters(&self, p: &Value) -> Result<()> {
        if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
            if t as f32 != self.rope_theta {
                return Err(PluginError::config(format!(
                    "rope_parameters.rope_theta {t} differs from rope_theta {} (mlx-lm reads the flat key)",
                    self.rope_theta
                )));
            }
        }
        let kind = |v: &Value| {
            v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default").to_string()
        };
        let flat = self.rope_scaling.as_ref().filter(|s| !s.is_null()).map(kind).unwrap_or_else(|| "default".into());
        let nested = kind(p);
        if nested != flat {
            return Err(PluginError::config(format!(
                "rope_parameters.rope_type `{nested}` differs from rope_scaling's `{flat}` (mlx-lm reads rope_scaling)"
            )));
        }
        Ok(())
    }
}

// ---- attention ----

/// Layer i's attention under `p` (`model.layers.{i}.self_attn`): q/k/v/o with
/// biases, RoPE (YaRN), its window, and its sinks [H].
fn attention(w: &mut Weights, c: &Config, i: i32, p: &str) -> Result<SelfAttention> {
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        require(w, &format!("{p}.{proj}.bias"))?;
    }
    let spec = AttentionSpec {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        qk_norm: false,
        eps: c.rms_norm_eps,
        window: c.window(i),
        rope: c.rope()?,
    };
    let sinks = w.tensor(&format!("{p}.sinks"))?; // [H]
    if sinks.shape() != [c.num_attention_heads] {
        return Err(PluginError::config(format!(
            "{p}.sinks: expected [{}] (num_attention_heads), got {:?}",
            c.num_attention_heads,
            sinks.shape()
        )));
    }
    Ok(SelfAttention::load(w, p, spec)?.with_sinks(sinks))
}

/// mlx-lm loads strictly: a tensor its modules declare must be there.
fn require(w: &Weights, name: &str) -> Result<()> {
    if w.contains(name) {
        Ok(())
    } else {
        Err(PluginError::missing(format!("missing tensor {name} (mlx-lm's gpt_oss declares it)")))
    }
}

// ---- MLP / experts ----

/// gpt-oss's feed-forward (mlx-lm's `MLPBlock`): router with a bias, top-k
/// of its logits then a softmax over the k, and the experts' clamped SwiGLU.
pub struct GptOssMoe {
    router: LinearLayer, // [D] -> [E]
    experts: SwitchGlu,  // E x ([D] -> [F] -> [D]), with biases
    top_k: i32,
}

impl GptOssMoe {
    /// `p`: the block (`model.layers.{i}.mlp`).
    pub fn load(w: &mut Weights, c: &Config, p: &str) -> Result<Self> {
        let hf = ["gate_up_proj", "gate_up_proj_blocks", "gate_up_proj_bias"];
        if let Some(name) = hf.iter().map(|n| format!("{p}.experts.{n}")).find(|n| w.contains(n)) {
            return Err(PluginError::unsupported(format!(
                "{name}: the experts are in the original checkpoint's layout (gate and up fused and interleaved, \
                 mxfp4 `_blocks`/`_scales`); rmlx reads them as mlx-lm's sanitize writes them \
                 ({p}.experts.{{gate,up,down}}_proj.{{weight,scales,bias}}): convert the checkpoint with mlx_lm.convert first"
            )));
        }
        require(w, &format!("{p}.router.bias"))?;
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            require(w, &format!("{p}.experts.{proj}.bias"))?;
        }
        let router = w.linear(&format!("{p}.router"))?;
        let experts = SwitchGlu::load(w, &format!("{p}.experts"))?.with_activation(GateAct::SwigluOai);
        let (e, d, f) = experts.dims();
        let (router_in, router_out) = router.0.dims().into();
        if e as i32 != c.num_local_experts || router_out as i32 != c.num_local_experts {
            return Err(PluginError::config(format!(
                "{p}: num_local_experts is {} but the router has {router_out} outputs and the experts {e}",
                c.num_local_experts
            )));
        }
        if d as i32 != c.hidden_size || router_in as i32 != c.hidden_size || f as i32 != c.intermediate_size {
            return Err(PluginError::config(format!(
                "{p}: the router takes {router_in} inputs and the experts map {d} -> {f}; the config says \
                 hidden_size {} and intermediate_size {}",
                c.hidden_size, c.intermediate_size
            )));
        }
        Ok(Self { router, experts, top_k: c.num_experts_per_tok })
    }
}

impl FeedForward for GptOssMoe {
    /// x: [N, D], N = B*L (a `Decoder` block's rows) -> [N, D]
    fn forward(&self, x: &Array) -> Result<Array> {
        let logits = self.router.forward(x)?; // [N, E]
        let (inds, scores) = top_k_softmax(&logits, self.top_k)?; // [N, k]
        let y = self.experts.forward(x, &inds)?; // [N, k, D]
        combine(&y, &scores) // [N, D]
    }
}

// ---- block ----

/// Pre-norm block: h = x + attn(norm(x)); out = h + moe(norm(h)).
fn block(w: &mut Weights, c: &Config, i: i32, p: &str) -> Result<Block> {
    let self_attn = attention(w, c, i, &format!("{p}.self_attn"))?;
    let mlp = GptOssMoe::load(w, c, &format!("{p}.mlp"))?;
    Block::with_ffn(w, p, self_attn, Box::new(mlp), c.rms_norm_eps)
}

// ---- model ----

pub struct GptOss {
    config: Config,
    decoder: Decoder,
}

impl GptOss {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        // Weight sanitising: mlx-lm's sanitize turns the original layout into
        // the switch layers read here; that layout is refused (above), so
        // convert first. The head is never tied.
        require(w, "lm_head.weight")?;
        let decoder = Decoder::load_blocks(w, c.num_hidden_layers, c.rms_norm_eps, false, |w, i, p| block(w, &c, i, p))?;
        Ok(Self { config: c, decoder })
    }
}

impl ModelImpl for GptOss {
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
        model_spec(dims, |i| c.window(i))
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        self.decoder.forward(tokens, attn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gpt-oss-20b's config.json, keys that matter here.
    const REAL: &str = r#"{"model_type":"gpt_oss","attention_bias":true,"experts_per_token":4,"head_dim":64,
        "hidden_act":"silu","hidden_size":2880,"initial_context_length":4096,"intermediate_size":2880,
        "layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"],
        "max_position_embeddings":131072,"num_attention_heads":64,"num_experts_per_tok":4,"num_hidden_layers":4,
        "num_key_value_heads":8,"num_local_experts":32,"output_router_logits":false,"rms_norm_eps":1e-05,
        "rope_scaling":{"beta_fast":32.0,"beta_slow":1.0,"factor":32.0,"original_max_position_embeddings":4096,
        "rope_type":"yarn","truncate":false},"rope_theta":150000,"router_aux_loss_coef":0.9,"sliding_window":128,
        "swiglu_limit":7.0,"tie_word_embeddings":false,"vocab_size":201088,
        "quantization_config":{"modules_to_not_convert":["model.layers.*.self_attn","model.layers.*.mlp.router",
        "model.embed_tokens","lm_head"],"quant_method":"mxfp4"}}"#;

    fn with(edit: impl FnOnce(&mut Value)) -> Result<Config> {
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        edit(&mut v);
        Config::parse(&v.to_string())
    }

    fn err(edit: impl FnOnce(&mut Value)) -> String {
        with(edit).unwrap_err().message.to_string()
    }

    #[test]
    fn real_config_and_defaults() {
        let c = with(|_| ()).unwrap();
        assert_eq!((0..4).map(|i| c.window(i)).collect::<Vec<_>>(), [128, 0, 128, 0]);
        // mlx-lm's defaults (gpt-oss-120b) and its default alternation
        let c = Config::parse(r#"{"model_type":"gpt_oss"}"#).unwrap();
        assert_eq!((c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok, c.sliding_window), (36, 128, 4, 128));
        assert_eq!((c.layer_type(0), c.layer_type(1), c.layer_type(35)), (SLIDING, FULL, FULL));
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        assert!(err(|v| v["layer_types"][2] = "chunked_attention".into()).contains("layer_types[2] `chunked_attention`"));
        assert!(err(|v| v["layer_types"] = serde_json::json!([FULL, FULL, FULL, FULL])).contains("no `sliding_attention`"));
        assert!(err(|v| v["layer_types"] = serde_json::json!([SLIDING, FULL])).contains("layer_types has 2 entries"));
        assert!(err(|v| {
            v.as_object_mut().unwrap().remove("layer_types");
            v["num_hidden_layers"] = 5.into();
        })
        .contains("num_hidden_layers 5 is odd"));
        assert!(err(|v| v["swiglu_limit"] = 10.0.into()).contains("swiglu_limit 10"));
        assert!(err(|v| v["attention_bias"] = false.into()).contains("attention_bias"));
        assert!(err(|v| v["tie_word_embeddings"] = true.into()).contains("tie_word_embeddings"));
        assert!(err(|v| v["experts_per_token"] = 2.into()).contains("experts_per_token 2"));
        assert!(err(|v| v["num_experts_per_tok"] = 33.into()).contains("num_experts_per_tok 33"));
        assert!(err(|v| v["sliding_window"] = 0.into()).contains("sliding_window"));
        assert!(err(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})).contains("dynamic"));
        assert!(err(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn"})).contains("`factor`"));
        assert!(err(|v| v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 150000}))
            .contains("rope_parameters.rope_type `default`"));
        assert!(err(|v| v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000}))
            .contains("rope_parameters.rope_theta 10000"));
        // null rope_scaling is plain RoPE; linear and llama3 are what initialize_rope builds too
        assert!(with(|v| v["rope_scaling"] = Value::Null).is_ok());
        assert!(with(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0})).is_ok());
    }
}
