//! gemma4_text's config: the keys mlx-lm's `ModelArgs` reads, with its
//! defaults, and what each layer is (global or sliding, its head size, K/V
//! heads, RoPE, and which earlier layer's K/V a shared layer reads).
use rmlx_nn::gemma::proportional_rope;
use rmlx_nn::{parse_config, require_grouped_heads, require_positive, Rope};
use rmlx_plugin_api::{author::Result, PluginError};
use serde::Deserialize;
use serde_json::{json, Value};

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
    pub(super) fn is_global(&self, i: i32) -> bool {
        match &self.layer_types {
            Some(t) => t[i as usize] == "full_attention",
            None => {
                let p = self.sliding_window_pattern;
                i as i64 % p == p - 1
            }
        }
    }

    pub(super) fn window(&self, i: i32) -> u32 {
        if self.is_global(i) {
            0
        } else {
            self.sliding_window as u32
        }
    }

    /// The first layer that computes no K/V of its own.
    pub(super) fn first_shared(&self) -> i32 {
        self.num_hidden_layers - self.num_kv_shared_layers
    }

    /// The layer whose K/V layer i reads (i itself when it computes its own):
    /// the last layer of i's type before the shared ones.
    pub(super) fn kv_source(&self, i: i32) -> Option<i32> {
        if i < self.first_shared() {
            return Some(i);
        }
        (0..self.first_shared()).rev().find(|&j| self.is_global(j) == self.is_global(i))
    }

    /// Layer i's head size: `global_head_dim` on global layers when set.
    pub(super) fn head_dim(&self, i: i32) -> i32 {
        match self.global_head_dim.filter(|&g| g > 0 && self.is_global(i)) {
            Some(g) => g,
            None => self.head_dim,
        }
    }

    /// Global layers with `attention_k_eq_v` have no `v_proj`.
    pub(super) fn k_eq_v(&self, i: i32) -> bool {
        self.attention_k_eq_v && self.is_global(i)
    }

    pub(super) fn kv_heads(&self, i: i32) -> i32 {
        match self.num_global_key_value_heads.filter(|_| self.k_eq_v(i)) {
            Some(k) => k,
            None => self.num_key_value_heads,
        }
    }

    pub(super) fn per_layer_input(&self) -> Option<i32> {
        self.hidden_size_per_layer_input.filter(|&p| p > 0)
    }

    /// mlx-lm's default `rope_parameters` when the config has none.
    pub(super) fn rope_params(&self, global: bool) -> Value {
        let key = if global { "full_attention" } else { "sliding_attention" };
        match self.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            Some(p) => p.get(key).cloned().unwrap_or(json!({})),
            None if global => json!({"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"}),
            None => json!({"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"}),
        }
    }

    /// Layer i's RoPE as mlx-lm's `initialize_rope` builds it from the
    /// layer type's `rope_parameters`.
    pub(super) fn rope(&self, i: i32) -> Result<Rope> {
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
    pub(super) fn check(&self) -> Result<()> {
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
