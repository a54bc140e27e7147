//! model_type `gemma4_text` (Gemma 4 text decoders).
//! Mirrors mlx_lm/models/gemma4_text.py (mlx-lm 0.32.2):
//! - plain RMSNorm (weight as stored, unlike Gemma 3's `1 + weight`), also
//!   on q and k per head; values get an RMSNorm without scale (`v_norm`);
//! - embeddings scaled by sqrt(hidden) (a Python float, not rounded);
//! - sliding and global (full) layers by `layer_types` (else
//!   `sliding_window_pattern`); global layers may have their own head size
//!   (`global_head_dim`), their own K/V heads and values equal to the raw
//!   keys (`attention_k_eq_v`, `num_global_key_value_heads`); each layer
//!   type has its own RoPE from `rope_parameters` (the `proportional` type
//!   rotates only `partial_rotary_factor` of the head);
//! - attention scale 1 (the q/k norms do the scaling);
//! - the last `num_kv_shared_layers` layers compute no K/V: each reads that
//!   of the last earlier layer of its type (`cache_kind::SHARED`);
//! - the gated tanh-GELU MLP, optionally beside a mixture of experts
//!   (`enable_moe_block`: a scaled router, top-k, GELU experts);
//! - per-layer inputs (`hidden_size_per_layer_input`): a second embedding
//!   table plus a projection of the embeddings, one [P] slice per layer
//!   gated into the residual stream after the MLP;
//! - a learned per-layer scalar on each block's output;
//! - the head tied to the embedding unless `tie_word_embeddings` is false,
//!   then soft-capped (`final_logit_softcapping`).
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head size (of the layer's type), N layers, P per-layer input size,
//! V vocab, E experts, k experts per token.
use mlx_rs::{ops, Array};
use rmlx_nn::decoder::{model_spec, Dims, GateAct};
use rmlx_nn::gemma::{gelu_approx, logit_softcap, proportional_rope, rms_norm_no_scale, GeluMlp, ScaledRouter};
use rmlx_nn::moe::{combine, SwitchGlu};
use rmlx_nn::{
    finish, merge_heads, merge_inputs, offer_hidden, parse_config, require_grouped_heads, require_positive, rms_norm,
    split_heads, Positions, Rope,
};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, EmbeddingLayer, LinearLayer, ModelImpl, Result, Weights},
    cache_kind, LayerCache, ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::{json, Value};

// ---- config ----

/// The keys mlx-lm's gemma4_text `ModelArgs` reads, with its defaults.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    #[serde(default = "d_hidden")]
    pub hidden_size: i32,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i32,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i32,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i32,
    #[serde(default = "d_head_dim")]
    pub head_dim: i32,
    #[serde(default = "d_global_head_dim")]
    pub global_head_dim: Option<i32>,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "d_vocab")]
    pub vocab_size: i32,
    #[serde(default = "d_vocab")]
    pub vocab_size_per_layer_input: i32,
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: i32,
    pub num_global_key_value_heads: Option<i32>,
    #[serde(default = "d_shared")]
    pub num_kv_shared_layers: i32,
    /// 0 or null: no per-layer inputs.
    #[serde(default = "d_ple")]
    pub hidden_size_per_layer_input: Option<i32>,
    #[serde(default)]
    pub rope_traditional: bool,
    pub rope_parameters: Option<Value>,
    #[serde(default = "d_window")]
    pub sliding_window: i64,
    #[serde(default = "d_pattern")]
    pub sliding_window_pattern: i64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i32,
    #[serde(default)]
    pub attention_k_eq_v: bool,
    #[serde(default = "d_softcap")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub enable_moe_block: bool,
    pub num_experts: Option<i32>,
    pub top_k_experts: Option<i32>,
    pub moe_intermediate_size: Option<i32>,
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    // Not read by mlx-lm; refused when they ask for another computation.
    pub hidden_activation: Option<String>,
}

fn d_hidden() -> i32 {
    1536
}
fn d_layers() -> i32 {
    35
}
fn d_intermediate() -> i32 {
    6144
}
fn d_heads() -> i32 {
    8
}
fn d_head_dim() -> i32 {
    256
}
fn d_global_head_dim() -> Option<i32> {
    Some(512)
}
fn d_eps() -> f32 {
    1.0e-6
}
fn d_vocab() -> i32 {
    262144
}
fn d_kv_heads() -> i32 {
    1
}
fn d_shared() -> i32 {
    20
}
fn d_ple() -> Option<i32> {
    Some(256)
}
fn d_window() -> i64 {
    512
}
fn d_pattern() -> i64 {
    5
}
fn d_max_pos() -> i32 {
    131072
}
fn d_softcap() -> Option<f64> {
    Some(30.0)
}
fn d_true() -> bool {
    true
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(json)?;
        c.check()?;
        Ok(c)
    }

    /// Layer i attends globally (`full_attention`) rather than in the window.
    fn is_global(&self, i: i32) -> bool {
        match &self.layer_types {
            Some(t) => t[i as usize] == "full_attention",
            None => {
                let p = self.sliding_window_pattern;
                i as i64 % p == p - 1
            }
        }
    }

    fn window(&self, i: i32) -> u32 {
        if self.is_global(i) {
            0
        } else {
            self.sliding_window as u32
        }
    }

    /// The first layer that computes no K/V of its own.
    fn first_shared(&self) -> i32 {
        self.num_hidden_layers - self.num_kv_shared_layers
    }

    /// The layer whose K/V layer i reads (i itself when it computes its own):
    /// the last layer of i's type before the shared ones.
    fn kv_source(&self, i: i32) -> Option<i32> {
        if i < self.first_shared() {
            return Some(i);
        }
        (0..self.first_shared()).rev().find(|&j| self.is_global(j) == self.is_global(i))
    }

    /// Layer i's head size: `global_head_dim` on global layers when set.
    fn head_dim(&self, i: i32) -> i32 {
        match self.global_head_dim.filter(|&g| g > 0 && self.is_global(i)) {
            Some(g) => g,
            None => self.head_dim,
        }
    }

    /// Global layers with `attention_k_eq_v` have no `v_proj`.
    fn k_eq_v(&self, i: i32) -> bool {
        self.attention_k_eq_v && self.is_global(i)
    }

    fn kv_heads(&self, i: i32) -> i32 {
        match self.num_global_key_value_heads.filter(|_| self.k_eq_v(i)) {
            Some(k) => k,
            None => self.num_key_value_heads,
        }
    }

    fn per_layer_input(&self) -> Option<i32> {
        self.hidden_size_per_layer_input.filter(|&p| p > 0)
    }

    /// mlx-lm's default `rope_parameters` when the config has none.
    fn rope_params(&self, global: bool) -> Value {
        let key = if global { "full_attention" } else { "sliding_attention" };
        match self.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            Some(p) => p.get(key).cloned().unwrap_or(json!({})),
            None if global => json!({"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"}),
            None => json!({"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"}),
        }
    }

    /// Layer i's RoPE as mlx-lm's `initialize_rope` builds it from the
    /// layer type's `rope_parameters`.
    fn rope(&self, i: i32) -> Result<Rope> {
        let p = self.rope_params(self.is_global(i));
        let dims = self.head_dim(i);
        let base = p.get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0) as f32;
        let ty = p.get("type").or_else(|| p.get("rope_type")).and_then(Value::as_str).unwrap_or("default");
        if ty == "proportional" {
            let partial = p.get("partial_rotary_factor").and_then(Value::as_f64).unwrap_or(1.0);
            let factor = p.get("factor").and_then(Value::as_f64).unwrap_or(1.0) as f32;
            // Python's int(dims * partial): truncation toward zero.
            let rotated = (dims as f64 * partial) as i32;
            return proportional_rope(dims, rotated, base, factor, self.rope_traditional);
        }
        Rope::with_yarn(dims, base, self.rope_traditional, Some(&p))
    }

    /// Refuses, by name, what this file does not implement.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let n = self.num_hidden_layers;
        require_positive(&[
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", n),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ])?;
        if let Some(t) = &self.layer_types {
            if t.len() != n as usize {
                return bad(format!("layer_types has {} entries for {n} layers", t.len()));
            }
            if let Some((i, t)) = t.iter().enumerate().find(|(_, t)| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
                return bad(format!("layer_types[{i}] `{t}` is not supported (sliding_attention or full_attention)"));
            }
        } else if self.sliding_window_pattern < 1 {
            return bad(format!("sliding_window_pattern must be at least 1, got {}", self.sliding_window_pattern));
        }
        for i in 0..n {
            require_grouped_heads(self.num_attention_heads, self.kv_heads(i))?;
            if self.head_dim(i) % 2 != 0 {
                return bad(format!("layer {i}'s head size {} must be even for RoPE", self.head_dim(i)));
            }
        }
        if (0..n).any(|i| !self.is_global(i)) && !(1..=u32::MAX as i64).contains(&self.sliding_window) {
            return bad(format!("sliding_window must be a positive token count, got {}", self.sliding_window));
        }
        if !(0..n).contains(&self.num_kv_shared_layers) {
            return bad(format!("num_kv_shared_layers {} must be in 0..{n}", self.num_kv_shared_layers));
        }
        if let Some(i) = (0..n).find(|&i| self.kv_source(i).is_none()) {
            return bad(format!(
                "layer {i} shares K/V (num_kv_shared_layers {}) but no earlier layer of its type computes any",
                self.num_kv_shared_layers
            ));
        }
        if let Some(p) = self.per_layer_input() {
            if self.vocab_size_per_layer_input < self.vocab_size {
                return bad(format!(
                    "vocab_size_per_layer_input {} is smaller than vocab_size {}: per-layer embeddings of some tokens would be missing",
                    self.vocab_size_per_layer_input, self.vocab_size
                ));
            }
            require_positive(&[("hidden_size_per_layer_input", p)])?;
        }
        if self.enable_moe_block {
            for (k, v) in [
                ("num_experts", self.num_experts),
                ("top_k_experts", self.top_k_experts),
                ("moe_intermediate_size", self.moe_intermediate_size),
            ] {
                match v {
                    Some(v) if v > 0 => {}
                    _ => return bad(format!("enable_moe_block needs a positive {k}, got {v:?}")),
                }
            }
        }
        if let Some(c) = self.final_logit_softcapping.filter(|c| c.is_nan() || *c <= 0.0) {
            return bad(format!("final_logit_softcapping must be positive or null, got {c}"));
        }
        if let Some(a) = self.hidden_activation.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
            return bad(format!("hidden_activation `{a}` is not supported (gemma4_text uses gelu_pytorch_tanh)"));
        }
        // Builds each layer type's RoPE: an unsupported type is refused here.
        for i in 0..n {
            self.rope(i).map_err(|e| PluginError::config(format!("layer {i}'s rope_parameters: {}", e.message)))?;
        }
        Ok(())
    }
}

// ---- attention ----

/// The K/V side of a layer that computes its own.
struct KvProj {
    k_proj: LinearLayer,         // [D] -> [K*hd]
    v_proj: Option<LinearLayer>, // [D] -> [K*hd]; None: values are the raw keys (k_eq_v)
    k_norm: Array,               // [hd]
}

pub struct Gemma4Attention {
    q_proj: LinearLayer, // [D] -> [H*hd]
    o_proj: LinearLayer, // [H*hd] -> [D]
    q_norm: Array,       // [hd]
    kv: Option<KvProj>,  // None: a shared layer
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    rope: Rope,
    window: u32,
    eps: f32,
}

impl Gemma4Attention {
    fn load(w: &mut Weights, p: &str, c: &Config, i: i32) -> Result<Self> {
        let kv = if i < c.first_shared() {
            let v_proj = if c.k_eq_v(i) { None } else { Some(w.linear(&format!("{p}.v_proj"))?) };
            Some(KvProj { k_proj: w.linear(&format!("{p}.k_proj"))?, v_proj, k_norm: w.tensor(&format!("{p}.k_norm.weight"))? })
        } else {
            None
        };
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm: w.tensor(&format!("{p}.q_norm.weight"))?,
            kv,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(i),
            head_dim: c.head_dim(i),
            rope: c.rope(i)?,
            window: c.window(i),
            eps: c.rms_norm_eps,
        })
    }

    /// x: [B, L, D] -> [B, L, D]
    fn forward(&self, x: &Array, layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?; // [B, H, L, hd]
        let q = self.rope.apply_at(&rms_norm(&q, &self.q_norm, self.eps)?, pos)?; // [B, H, L, hd]
        let (k, v) = match &self.kv {
            Some(kv) => {
                let raw = split_heads(&kv.k_proj.forward(x)?, self.kv_heads)?; // [B, K, L, hd]
                let v = match &kv.v_proj {
                    Some(v_proj) => split_heads(&v_proj.forward(x)?, self.kv_heads)?, // [B, K, L, hd]
                    None => raw.clone(),
                };
                let k = self.rope.apply_at(&rms_norm(&raw, &kv.k_norm, self.eps)?, pos)?; // [B, K, L, hd]
                (k, rms_norm_no_scale(&v, self.eps)?)
            }
            None => {
                // A SHARED layer: the host attends over its source layer's
                // K/V and ignores these (no positions).
                let none = ops::zeros_dtype(&[q.dim(0), self.kv_heads, 0, self.head_dim], q.dtype())?; // [B, K, 0, hd]
                (none.clone(), none)
            }
        };
        let o = attn.attend(layer, q, k, v, &AttendOpts::plain(1.0).window(self.window))?; // [B, H, L, hd]
        self.o_proj.forward(&merge_heads(&o)?)
    }
}

// ---- feed-forward: rmlx_nn::gemma::GeluMlp, and the experts beside it ----

/// `enable_moe_block`: the routed GELU experts and their norms.
struct MoeBranch {
    router: ScaledRouter, // [D] -> k of E
    experts: SwitchGlu,   // E x ([D] -> [F] -> [D])
    pre_feedforward_layernorm_2: Array,  // [D]
    post_feedforward_layernorm_1: Array, // [D]
    post_feedforward_layernorm_2: Array, // [D]
}

/// Per-layer input gating: h + norm(proj(gelu(gate(h)) * per_layer_input)).
struct PerLayerGate {
    per_layer_input_gate: LinearLayer,  // [D] -> [P]
    per_layer_projection: LinearLayer,  // [P] -> [D]
    post_per_layer_input_norm: Array,   // [D]
}

// ---- block ----

/// h = x + post_attn_norm(attn(input_norm(x)));
/// f = mlp(pre_ff_norm(h)), or with experts post_ff_norm_1(mlp(pre_ff_norm(h)))
///     + post_ff_norm_2(experts(pre_ff_norm_2(h)) routed on h);
/// h = h + post_ff_norm(f); h = h + per-layer gate; out = h * layer_scalar.
pub struct Gemma4Block {
    self_attn: Gemma4Attention,
    mlp: GeluMlp,
    moe: Option<MoeBranch>,
    per_layer: Option<PerLayerGate>,
    input_layernorm: Array,            // [D]
    post_attention_layernorm: Array,   // [D]
    pre_feedforward_layernorm: Array,  // [D]
    post_feedforward_layernorm: Array, // [D]
    layer_scalar: Array,               // [1]
    eps: f32,
}

impl Gemma4Block {
    fn load(w: &mut Weights, p: &str, c: &Config, i: i32) -> Result<Self> {
        let norm = |w: &mut Weights, n: &str| w.tensor(&format!("{p}.{n}.weight"));
        let moe = if c.enable_moe_block {
            let (e, k) = (c.num_experts.unwrap_or(0), c.top_k_experts.unwrap_or(0));
            let experts = SwitchGlu::load(w, &format!("{p}.experts.switch_glu"))?.with_activation(GateAct::GeluApprox);
            Some(MoeBranch {
                router: ScaledRouter::load(w, &format!("{p}.router"), e, k, c.rms_norm_eps)?,
                experts,
                pre_feedforward_layernorm_2: norm(w, "pre_feedforward_layernorm_2")?,
                post_feedforward_layernorm_1: norm(w, "post_feedforward_layernorm_1")?,
                post_feedforward_layernorm_2: norm(w, "post_feedforward_layernorm_2")?,
            })
        } else {
            None
        };
        let per_layer = match c.per_layer_input() {
            Some(_) => Some(PerLayerGate {
                per_layer_input_gate: w.linear(&format!("{p}.per_layer_input_gate"))?,
                per_layer_projection: w.linear(&format!("{p}.per_layer_projection"))?,
                post_per_layer_input_norm: norm(w, "post_per_layer_input_norm")?,
            }),
            None => None,
        };
        Ok(Self {
            self_attn: Gemma4Attention::load(w, &format!("{p}.self_attn"), c, i)?,
            mlp: GeluMlp::load(w, &format!("{p}.mlp"))?,
            moe,
            per_layer,
            input_layernorm: norm(w, "input_layernorm")?,
            post_attention_layernorm: norm(w, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
            layer_scalar: w.tensor(&format!("{p}.layer_scalar"))?,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [B, L, D], per_layer_input: [B, L, P] -> [B, L, D]
    fn forward(
        &self,
        x: &Array,
        per_layer_input: Option<&Array>,
        layer: u32,
        pos: &Positions,
        attn: &mut dyn Attend,
    ) -> Result<Array> {
        let norm = |x: &Array, w: &Array| rms_norm(x, w, self.eps);
        let r = self.self_attn.forward(&norm(x, &self.input_layernorm)?, layer, pos, attn)?;
        let h = x.add(&norm(&r, &self.post_attention_layernorm)?)?; // [B, L, D]
        let dense = self.mlp.forward(&norm(&h, &self.pre_feedforward_layernorm)?)?; // [B, L, D]
        let f = match &self.moe {
            None => dense,
            Some(m) => {
                let h1 = norm(&dense, &m.post_feedforward_layernorm_1)?;
                let (inds, weights) = m.router.route(&h)?; // [B, L, k]
                let y = m.experts.forward(&norm(&h, &m.pre_feedforward_layernorm_2)?, &inds)?; // [B, L, k, D]
                let h2 = norm(&combine(&y, &weights)?, &m.post_feedforward_layernorm_2)?; // [B, L, D]
                h1.add(&h2)?
            }
        };
        let mut h = h.add(&norm(&f, &self.post_feedforward_layernorm)?)?; // [B, L, D]
        if let (Some(g), Some(pli)) = (&self.per_layer, per_layer_input) {
            let gate = gelu_approx(&g.per_layer_input_gate.forward(&h)?)?.multiply(pli)?; // [B, L, P]
            let gate = norm(&g.per_layer_projection.forward(&gate)?, &g.post_per_layer_input_norm)?; // [B, L, D]
            h = h.add(&gate)?;
        }
        Ok(h.multiply(&self.layer_scalar)?)
    }
}

// ---- per-layer inputs ----

/// The model-level half of the per-layer inputs: token embeddings of their
/// own plus a projection of the scaled input embeddings.
struct PerLayerInputs {
    embed_tokens_per_layer: EmbeddingLayer,   // [V, N*P]
    per_layer_model_projection: LinearLayer, // [D] -> [N*P]
    per_layer_projection_norm: Array,         // [P]
    layers: i32,
    size: i32,
    hidden: i32,
    eps: f32,
}

impl PerLayerInputs {
    /// tokens: [B, L], h: the scaled embeddings [B, L, D] -> N x [B, L, P]
    fn forward(&self, tokens: &Array, h: &Array) -> Result<Vec<Array>> {
        let s = |v: f64| Array::from_f32(v as f32).as_dtype(h.dtype());
        let (n, p) = (self.layers, self.size);
        let own = self.embed_tokens_per_layer.lookup(tokens)?.multiply(s((p as f64).sqrt())?)?; // [B, L, N*P]
        let own = ops::unflatten(&own, -1, &[n, p])?; // [B, L, N, P]
        let proj = self.per_layer_model_projection.forward(h)?.multiply(s((self.hidden as f64).powf(-0.5))?)?; // [B, L, N*P]
        let proj = rms_norm(&ops::unflatten(&proj, -1, &[n, p])?, &self.per_layer_projection_norm, self.eps)?; // [B, L, N, P]
        let all = proj.add(&own)?.multiply(s(0.5f64.sqrt())?)?; // [B, L, N, P]
        all.split_equal(n, 2)?.into_iter().map(|x| Ok(x.squeeze_axes(&[2])?)).collect() // N x [B, L, P]
    }
}

// ---- model ----

pub struct Gemma4Text {
    config: Config,
    embed_tokens: EmbeddingLayer, // [V, D]
    per_layer_inputs: Option<PerLayerInputs>,
    layers: Vec<Gemma4Block>,
    norm: Array,                  // [D]
    lm_head: Option<LinearLayer>, // [D] -> [V]; None when tied
}

impl Gemma4Text {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        // mlx-lm's `sanitize` splits a Hugging Face checkpoint's fused experts.
        if let Some(i) = (0..c.num_hidden_layers).find(|i| w.contains(&format!("model.layers.{i}.experts.gate_up_proj"))) {
            return Err(PluginError::config(format!(
                "model.layers.{i}.experts.gate_up_proj: fused experts of a Hugging Face checkpoint; convert it with mlx_lm.convert first"
            )));
        }
        let embed_tokens = w.embedding("model.embed_tokens")?;
        let per_layer_inputs = match c.per_layer_input() {
            Some(p) => Some(PerLayerInputs {
                embed_tokens_per_layer: w.embedding("model.embed_tokens_per_layer")?,
                per_layer_model_projection: w.linear("model.per_layer_model_projection")?,
                per_layer_projection_norm: w.tensor("model.per_layer_projection_norm.weight")?,
                layers: c.num_hidden_layers,
                size: p,
                hidden: c.hidden_size,
                eps: c.rms_norm_eps,
            }),
            None => None,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| Gemma4Block::load(w, &format!("model.layers.{i}"), &c, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor("model.norm.weight")?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(w.linear("lm_head")?) };
        Ok(Self { config: c, embed_tokens, per_layer_inputs, layers, norm, lm_head })
    }
}

impl ModelImpl for Gemma4Text {
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

    /// Full or window layers with their own heads and head size; the last
    /// `num_kv_shared_layers` SHARED with the last earlier layer of their type.
    fn layers(&self) -> Vec<LayerCache> {
        let c = &self.config;
        (0..c.num_hidden_layers)
            .map(|i| {
                let src = c.kv_source(i).unwrap_or(i);
                let kind = match (src != i, c.is_global(i)) {
                    (true, _) => cache_kind::SHARED,
                    (false, true) => cache_kind::FULL,
                    (false, false) => cache_kind::WINDOW,
                };
                LayerCache {
                    kind,
                    window: c.window(i),
                    kv_heads: c.kv_heads(i) as u32,
                    head_dim: c.head_dim(i) as u32,
                    shared_with: src as u32,
                }
            })
            .collect()
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        let c = &self.config;
        let pos = Positions::of(attn); // each row's first position
        let h = self.embed_tokens.lookup(tokens)?; // [B, L, D]
        // mlx-vlm's features replace embeddings before the scale.
        let h = merge_inputs(h, attn)?; // [B, L, D]
        let mut h = h.multiply(Array::from_f32((c.hidden_size as f64).sqrt() as f32).as_dtype(h.dtype())?)?; // [B, L, D]
        let per_layer = match &self.per_layer_inputs {
            Some(p) => p.forward(tokens, &h)?.into_iter().map(Some).collect(), // N x [B, L, P]
            None => vec![None; self.layers.len()],
        };
        for (i, (layer, pli)) in self.layers.iter().zip(&per_layer).enumerate() {
            h = layer.forward(&h, pli.as_ref(), i as u32, &pos, attn)?;
            offer_hidden(attn, i as u32, &h)?;
        }
        let h = rms_norm(&h, &self.norm, c.rms_norm_eps)?; // [B, L, D]
        let cap = c.final_logit_softcapping;
        finish(h, attn, |h| {
            let logits = match &self.lm_head {
                Some(head) => head.forward(h)?,         // [B, L | 1, V]
                None => self.embed_tokens.as_linear(h)?, // [B, L | 1, V]
            };
            match cap {
                Some(cap) => logit_softcap(&logits, cap as f32),
                None => Ok(logits),
            }
        })
    }
}

#[cfg(test)]
#[path = "gemma4_text_tests.rs"]
mod tests;
