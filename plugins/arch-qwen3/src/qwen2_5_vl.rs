//! model_type `qwen2_5_vl` (Qwen2.5-VL), as mlx-vlm 0.7.10's qwen2_5_vl
//! computes it: the language model is qwen2 (qwen2.rs: q/k/v biases,
//! plugins/nn's decoder) with multimodal RoPE (M-RoPE), and images go
//! through the vision tower of qwen2_5_vl_vision.rs in an `output::MEDIA`
//! forward; the host merges its features into the image's placeholder
//! tokens (`input_embeddings()`).
//!
//! M-RoPE (`rope_scaling.mrope_section` [s_t, s_h, s_w], s_t + s_h + s_w =
//! hd/2, mlx-vlm's "chunked" layout; what both Qwen-VL models share is in
//! multimodal.rs): each token has three positions
//! (temporal, height, width; ABI 3.7 `positions()`, or `offsets()[b] + l`
//! on all three for text); frequency i of the hd/2 inverse frequencies
//! rotates by the position of the section it falls in (the first s_t by t,
//! the next s_h by h, the last s_w by w), applied with rotate_half over the
//! whole head. The media forward hands the host each feature's (t, h, w)
//! relative to its image's first (`arch::MEDIA_POSITIONS`): t = 0, h and w
//! its row and column in the merged grid (H / P / m) x (W / P / m); the
//! host lays out the prompt's positions from them (Qwen2-VL's
//! `get_rope_index`) and keeps each sequence's rope delta for decode.
//!
//! Weights: mlx-vlm's layout (`language_model.model.*`,
//! `language_model.lm_head`, `vision_tower.*`: what its `sanitize` makes
//! and `mlx_vlm.convert` writes), or Hugging Face's original one
//! (`model.*`, `lm_head`, `visual.*`). Images only: video input is not
//! taken (the host never sends it).
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, V vocab, N images, T features per image.
use crate::multimodal::{self, cos_sin, inv_freq, load_tower, media_input, put_media_positions};
use crate::qwen2_5_vl_vision::{Qwen25Vision, VisionConfig};
use mlx_rs::{ops, ops::indexing::IndexOp, Array, Dtype};
use rmlx_nn::decoder::{model_spec, AttentionSpec, Block, Decoder, Dims};
use rmlx_nn::{parse_config, require_grouped_heads, require_positive, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Output, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// The keys mlx-vlm's qwen2_5_vl `ModelConfig` / `TextConfig` read (the
/// text keys at the top level of config.json, as mlx-vlm takes them).
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub num_key_value_heads: Option<i32>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Absent (or its weights absent): a text-only build, the media forward refused.
    pub vision_config: Option<VisionConfig>,
}

/// transformers 5 writes Qwen2.5-VL's text keys under `text_config` (its
/// `model_type` `qwen2_5_vl_text`) and RoPE as `rope_parameters` {type or
/// rope_type, mrope_section, rope_theta}; mlx-vlm and transformers 4 keep
/// them at the top level as `rope_theta` and `rope_scaling`. Both read the
/// same: `text_config`'s keys fill the top level where it lacks them, and
/// `rope_parameters` becomes `rope_theta` + `rope_scaling`.
fn flatten_text_config(json: &str) -> Result<String> {
    use serde_json::Value;
    let mut v: Value = parse_config(json)?;
    let Some(top) = v.as_object_mut() else {
        return Err(PluginError::config("config.json: not a JSON object"));
    };
    if let Some(Value::Object(text)) = top.remove("text_config") {
        for (k, val) in text {
            if k != "model_type" && !top.contains_key(&k) {
                top.insert(k, val);
            }
        }
    }
    if !top.contains_key("rope_scaling") {
        if let Some(Value::Object(mut p)) = top.remove("rope_parameters") {
            if let Some(theta) = p.remove("rope_theta") {
                top.entry("rope_theta").or_insert(theta);
            }
            top.insert("rope_scaling".into(), Value::Object(p));
        }
    }
    Ok(v.to_string())
}

fn default_max_positions() -> i32 {
    128000
}
fn default_rope_theta() -> f32 {
    1_000_000.0
}
fn yes() -> bool {
    true
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let c: Config = parse_config(&flatten_text_config(json)?)?;
        require_positive(&[
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("vocab_size", c.vocab_size),
        ])?;
        if c.hidden_size % c.num_attention_heads != 0 || c.head_dim() % 2 != 0 {
            return Err(PluginError::config(format!(
                "hidden_size {} / num_attention_heads {} must give an even head_dim",
                c.hidden_size, c.num_attention_heads
            )));
        }
        require_grouped_heads(c.num_attention_heads, c.kv_heads())?;
        if c.use_sliding_window {
            return Err(PluginError::config("use_sliding_window: true is not supported for qwen2_5_vl (mlx-vlm attends over the whole context)"));
        }
        if let Some(v) = &c.vision_config {
            v.check()?;
            multimodal::check_feature_width(&v.tower, c.hidden_size, "hidden_size")?;
        }
        c.mrope_section()?;
        Ok(c)
    }

    fn head_dim(&self) -> i32 {
        self.hidden_size / self.num_attention_heads
    }

    fn kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `rope_scaling`'s [s_t, s_h, s_w] (mlx-vlm's default [24, 20, 20] when
    /// absent), checked against hd/2; its type must be `mrope` or `default`.
    fn mrope_section(&self) -> Result<[i32; 3]> {
        let bad = |m: String| Err(PluginError::config(format!("rope_scaling: {m}")));
        let section = multimodal::section(self.rope_scaling.as_ref(), "rope_scaling", "qwen2_5_vl", &["type", "rope_type", "mrope_section"])?;
        if section.iter().any(|&s| s < 0) || section.iter().sum::<i32>() != self.head_dim() / 2 {
            return bad(format!(
                "mrope_section {section:?} must be non-negative and sum to head_dim / 2 = {}",
                self.head_dim() / 2
            ));
        }
        Ok(section)
    }
}

// ---- rotary: M-RoPE ----

/// The rotations of positions [3, B, L]: cos and sin [B, 1, L, hd].
struct MRope {
    inv_freq: Array, // [hd/2]: 1 / theta^(2i/hd), computed in f32 as mlx-vlm
    section: [i32; 3],
}

impl MRope {
    fn new(c: &Config) -> Result<Self> {
        Ok(Self { inv_freq: inv_freq(c.head_dim(), c.rope_theta)?, section: c.mrope_section()? })
    }

    /// positions int32 [3, B, L] -> (cos, sin) [B, 1, L, hd], f32 (cast to
    /// q/k's dtype where they are applied, as mlx-vlm casts them).
    fn rotations(&self, positions: &Array) -> Result<(Array, Array)> {
        let p = positions.as_dtype(Dtype::Float32)?.expand_dims(-1)?; // [3, B, L, 1]
        let freqs = p.multiply(&self.inv_freq)?; // [3, B, L, hd/2]
        let mut parts = Vec::with_capacity(3);
        let mut at = 0;
        for (axis, &n) in self.section.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let cols = Array::from_iter(at..at + n, &[n]);
            parts.push(freqs.index(axis as i32).take_axis(&cols, -1)?); // [B, L, n]
            at += n;
        }
        cos_sin(ops::concatenate(&parts, -1)?) // [B, L, hd/2] -> [B, 1, L, hd] x 2
    }
}

// ---- model ----

pub struct Qwen25Vl {
    config: Config,
    decoder: Decoder,
    /// None: a checkpoint without the tower (text only).
    vision: Option<Qwen25Vision>,
    mrope: MRope,
}

impl Qwen25Vl {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        // mlx-vlm's layout, else Hugging Face's original one.
        let (root, tower) = if w.contains("language_model.model.embed_tokens.weight") {
            ("language_model.", "vision_tower")
        } else {
            ("", "visual")
        };
        let decoder = Decoder::load_blocks_under(w, root, c.num_hidden_layers, c.rms_norm_eps, c.tie_word_embeddings, |w, _, p| {
            let spec = AttentionSpec {
                heads: c.num_attention_heads,
                kv_heads: c.kv_heads(),
                head_dim: c.head_dim(),
                qk_norm: false,
                eps: c.rms_norm_eps,
                window: 0,
                // Unused: the forward hands every layer M-RoPE's rotations.
                rope: Rope::new(c.head_dim(), c.rope_theta, false, None)?,
            };
            Block::load(w, p, spec)
        })?;
        let vision = load_tower(w, c.vision_config.as_ref(), tower, Qwen25Vision::load)?;
        let mrope = MRope::new(&c)?;
        Ok(Self { config: c, decoder, vision, mrope })
    }

    /// The media forward: pixels [N, C, H, W] -> features [N, T, D]; hands
    /// the features' relative positions [N, T, 3] when the host asks.
    fn media(&self, attn: &mut dyn Attend) -> Result<Array> {
        let (pixels, vision) = media_input(attn, self.vision.as_ref(), "qwen2_5_vl")?;
        let feats = vision.forward(&pixels)?; // [N, T, D]
        put_media_positions(attn, &pixels, &vision.config().tower)?;
        Ok(feats)
    }
}

impl ModelImpl for Qwen25Vl {
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        let dims = Dims {
            num_layers: c.num_hidden_layers,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            max_context: c.max_position_embeddings,
        };
        model_spec(dims, |_| 0)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]; a media forward: [N, T, D]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        if attn.output() == Output::Media {
            return self.media(attn);
        }
        let l = tokens.dim(1);
        let pos = multimodal::positions(attn, l, "qwen2_5_vl")?; // [3, B, L]
        let (cos, sin) = self.mrope.rotations(&pos)?; // [B, 1, L, hd]
        self.decoder.forward_at(tokens, attn, &Positions::Rotations { cos, sin })
    }
}

/// config.json vetted without weights.
pub fn check(config: &str) -> Result<()> {
    Config::parse(config).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::Config;

    /// transformers 5's layout (text keys under `text_config`, RoPE as
    /// `rope_parameters`, the tower's model_type `qwen2_5_vl_vision`) reads
    /// as mlx-vlm's flat one.
    #[test]
    fn transformers_5_configs_read_as_flat_ones() {
        let vision = r#"{"model_type": "qwen2_5_vl_vision", "depth": 1, "hidden_size": 16, "out_hidden_size": 32, "num_heads": 2,
            "intermediate_size": 32, "patch_size": 2, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3,
            "window_size": 8, "fullatt_block_indexes": [0]}"#;
        let nested = format!(
            r#"{{"model_type": "qwen2_5_vl", "tie_word_embeddings": false, "vision_config": {vision},
            "text_config": {{"model_type": "qwen2_5_vl_text", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
              "rope_parameters": {{"type": "mrope", "rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}}}}}}"#
        );
        let flat = r#"{"model_type": "qwen2_5_vl", "tie_word_embeddings": false, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}"#;
        let (a, b) = (Config::parse(&nested).unwrap(), Config::parse(flat).unwrap());
        assert_eq!((a.hidden_size, a.num_hidden_layers, a.kv_heads(), a.vocab_size), (b.hidden_size, b.num_hidden_layers, b.kv_heads(), b.vocab_size));
        assert_eq!((a.rope_theta, a.tie_word_embeddings), (10000.0, false));
        assert_eq!(a.mrope_section().unwrap(), [2, 1, 1]);
        assert!(a.vision_config.is_some());
        // An unknown RoPE key is still refused by name.
        let bad = nested.replace(r#""rope_theta": 10000.0"#, r#""rope_theta": 10000.0, "factor": 2.0"#);
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("factor"), "{e}");
    }
}
