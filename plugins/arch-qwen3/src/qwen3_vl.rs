//! model_type `qwen3_vl` (Qwen3-VL), as mlx-vlm 0.7.10's qwen3_vl computes
//! it: the language model is qwen3's decoder (per-head q/k RMSNorm before
//! RoPE, explicit `head_dim`, no q/k/v bias; plugins/nn's decoder) with
//! interleaved multimodal RoPE, and images go through the vision tower of
//! qwen3_vl_vision.rs in an `output::MEDIA` forward.
//!
//! Interleaved M-RoPE (`text_config.rope_scaling.mrope_section` [s_t, s_h,
//! s_w], `mrope_interleaved`): each token has three positions (temporal,
//! height, width; ABI 3.7 `positions()`, or `offsets()[b] + l` on all three
//! for text); frequency i of the hd/2 inverse frequencies rotates by the h
//! position when i % 3 == 1 and i < 3 s_h, by the w position when
//! i % 3 == 2 and i < 3 s_w, else by t (mlx-vlm's
//! `_interleaved_position_selector`), applied with rotate_half over the
//! whole head. The media forward hands the host each feature's (t, h, w)
//! relative to its image's first (`arch::MEDIA_POSITIONS`: t = 0, h and w
//! its row and column in the merged grid), from which the host lays out the
//! prompt's positions and each sequence's rope delta (as for Qwen2.5-VL;
//! what both share is in multimodal.rs).
//!
//! Deepstack: the media forward returns, per image feature, the main
//! feature then the S deepstack features side by side ([N, T, (1+S)*D],
//! `Qwen3VlVision::forward_stacked`), so the host lends a prefill chunk
//! input features [B, L, (1+S)*D] with the image's mask. The text forward
//! puts the first D columns in place of the placeholders' embeddings, and
//! after decoder layer j < S adds columns (1+j)*D.. (1+j+1)*D at the masked
//! positions (mlx-vlm's `_deepstack_process`). Everything is per position,
//! so an image split across prefill chunks is computed as in one forward
//! (each chunk carries the features of its own rows); decode steps carry
//! none.
//!
//! Weights: mlx-vlm's layout (`language_model.model.*`,
//! `language_model.lm_head`, `vision_tower.*`) or Hugging Face's
//! (`model.language_model.*`, `lm_head`, `model.visual.*`). Images only:
//! the host never sends video.
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, V vocab, N images, T features per image, S deepstack layers.
use crate::multimodal::{self, cos_sin, inv_freq, load_tower, media_input, put_media_positions};
use crate::qwen3_vl_vision::{Qwen3VlVision, VisionConfig};
use mlx_rs::{ops, Array, Dtype};
use rmlx_nn::decoder::{model_spec, AttentionSpec, Block, Decoder, Dims};
use rmlx_nn::{parse_config, require_grouped_heads, require_positive, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Output, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;

// ---- config ----

/// mlx-vlm's qwen3_vl `TextConfig`: the keys that change the computation.
#[derive(Deserialize, Debug, Clone)]
pub struct TextConfig {
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub rms_norm_eps: f32,
    pub vocab_size: i32,
    pub num_key_value_heads: Option<i32>,
    pub head_dim: Option<i32>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i32,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 nests rope_theta and the M-RoPE keys here.
    pub rope_parameters: Option<serde_json::Value>,
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    pub hidden_act: Option<String>,
    pub use_final_norm: Option<bool>,
}

/// config.json: `text_config` and `vision_config` nested, as Hugging Face
/// and mlx-vlm write them.
#[derive(Deserialize, Debug, Clone)]
pub struct Config {
    pub text_config: TextConfig,
    /// Absent (or its weights absent): a text-only build, the media forward refused.
    pub vision_config: Option<VisionConfig>,
    /// Hugging Face keeps it at the top level.
    pub tie_word_embeddings: Option<bool>,
}

fn default_rope_theta() -> f32 {
    5_000_000.0
}
fn default_max_positions() -> i32 {
    128000
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let mut c: Config = parse_config(json)?;
        let t = &mut c.text_config;
        if let Some(p) = t.rope_parameters.clone().filter(|p| !p.is_null()) {
            if let Some(theta) = p.get("rope_theta").and_then(|v| v.as_f64()) {
                t.rope_theta = theta as f32;
            }
            if t.rope_scaling.is_none() {
                t.rope_scaling = Some(p);
            }
        }
        let t = &c.text_config;
        require_positive(&[
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.head_dim", c.head_dim()),
        ])?;
        if c.head_dim() % 2 != 0 {
            return Err(PluginError::config(format!("text_config.head_dim {} must be even", c.head_dim())));
        }
        require_grouped_heads(t.num_attention_heads, c.kv_heads())?;
        if t.attention_bias {
            return Err(PluginError::config("text_config.attention_bias: true is not supported for qwen3_vl (mlx-vlm's projections have no bias)"));
        }
        if let Some(a) = t.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(PluginError::config(format!("text_config.hidden_act `{a}` is not supported for qwen3_vl (silu)")));
        }
        if t.use_final_norm == Some(false) {
            return Err(PluginError::config("text_config.use_final_norm: false is not supported for qwen3_vl"));
        }
        if let Some(v) = &c.vision_config {
            v.check()?;
            multimodal::check_feature_width(&v.tower, t.hidden_size, "text_config.hidden_size")?;
        }
        c.mrope_section()?;
        Ok(c)
    }

    fn head_dim(&self) -> i32 {
        let t = &self.text_config;
        t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads.max(1))
    }

    fn kv_heads(&self) -> i32 {
        let t = &self.text_config;
        t.num_key_value_heads.unwrap_or(t.num_attention_heads)
    }

    fn tied(&self) -> bool {
        self.text_config.tie_word_embeddings.or(self.tie_word_embeddings).unwrap_or(false)
    }

    /// S: the deepstack features each image feature carries.
    fn deepstack(&self) -> usize {
        self.vision_config.as_ref().map_or(0, |v| v.deepstack_visual_indexes.len())
    }

    /// `rope_scaling`'s [s_t, s_h, s_w] (mlx-vlm's default [24, 20, 20]
    /// when absent); its type must be `mrope` or `default`, and the layout
    /// interleaved.
    fn mrope_section(&self) -> Result<[i32; 3]> {
        let bad = |m: String| Err(PluginError::config(format!("text_config.rope_scaling: {m}")));
        let rs = self.text_config.rope_scaling.as_ref();
        let keys = ["type", "rope_type", "mrope_section", "mrope_interleaved", "rope_theta"];
        let section = multimodal::section(rs, "text_config.rope_scaling", "qwen3_vl", &keys)?;
        if rs.and_then(|r| r.get("mrope_interleaved")).and_then(|v| v.as_bool()) == Some(false) {
            return bad("mrope_interleaved: false is not supported (Qwen3-VL interleaves the M-RoPE sections)".into());
        }
        if section.iter().any(|&s| s < 0) {
            return bad(format!("mrope_section {section:?} must be non-negative"));
        }
        Ok(section)
    }
}

// ---- rotary: interleaved M-RoPE ----

/// The rotations of positions [3, B, L]: cos and sin [B, 1, L, hd].
struct MRope {
    inv_freq: Array, // [hd/2]: 1 / theta^(2i/hd), f32 as mlx-vlm
    axis: Array,     // int32 [hd/2]: the position axis (0 t, 1 h, 2 w) of each frequency
}

impl MRope {
    fn new(c: &Config) -> Result<Self> {
        let hd = c.head_dim();
        let inv_freq = inv_freq(hd, c.text_config.rope_theta)?;
        let s = c.mrope_section()?;
        let axis: Vec<i32> = (0..hd / 2)
            .map(|i| match i % 3 {
                1 if i < 3 * s[1] => 1,
                2 if i < 3 * s[2] => 2,
                _ => 0,
            })
            .collect();
        Ok(Self { inv_freq, axis: Array::from_slice(&axis, &[hd / 2]) })
    }

    /// positions int32 [3, B, L] -> (cos, sin) [B, 1, L, hd], f32 (cast to
    /// q/k's dtype where they are applied, as mlx-vlm casts them).
    fn rotations(&self, positions: &Array) -> Result<(Array, Array)> {
        let p = positions.take_axis(&self.axis, 0)?; // [hd/2, B, L]
        let p = p.transpose_axes(&[1, 2, 0])?.as_dtype(Dtype::Float32)?; // [B, L, hd/2]
        cos_sin(p.multiply(&self.inv_freq)?) // [B, L, hd/2] -> [B, 1, L, hd] x 2
    }
}

// ---- deepstack ----

/// A text forward's image inputs: the main features go in place of the
/// placeholders' embeddings, deepstack feature j is added after layer j.
struct ImageInputs {
    mask: Array,         // bool [B, L, 1]
    main: Array,         // [B, L, D]
    row_mask: Array,     // bool [N, 1], N = B*L: `mask` over the decoder's rows
    deep: Vec<Array>,    // S x [N, D]
}

impl ImageInputs {
    /// The host's (features [B, L, (1+S)*D], mask [B, L]) split into the
    /// main and deepstack features; None without input features.
    fn of(attn: &dyn Attend, d: i32, s: usize) -> Result<Option<Self>> {
        let Some((features, mask)) = attn.input_embeddings() else {
            return Ok(None);
        };
        let want = d * (1 + s as i32);
        if features.ndim() != 3 || features.dim(-1) != want {
            return Err(PluginError::other(format!(
                "qwen3_vl: input features {:?} must be [B, L, {want}] (the main feature and {s} deepstack features of {d} each, as the media forward returns them)",
                features.shape()
            )));
        }
        let n = features.dim(0) * features.dim(1);
        let mut parts = features.split_equal(1 + s as i32, -1)?.into_iter(); // (1+S) x [B, L, D]
        let main = parts.next().expect("1 + S parts");
        let deep = parts.map(|f| f.reshape(&[n, d])).collect::<std::result::Result<Vec<_>, _>>()?; // S x [N, D]
        Ok(Some(Self { mask: mask.expand_dims(-1)?, main, row_mask: mask.reshape(&[n, 1])?, deep }))
    }

    /// Token embeddings h [B, L, D] with the main features at the mask.
    fn merge(&self, h: Array) -> Result<Array> {
        Ok(ops::select(&self.mask, &self.main.as_dtype(h.dtype())?, &h)?)
    }

    /// Layer `layer`'s output as the decoder's rows h [N, D], plus
    /// deepstack feature `layer` at the mask (when there is one).
    fn after(&self, layer: u32, h: Array) -> Result<Array> {
        match self.deep.get(layer as usize) {
            Some(f) => Ok(ops::select(&self.row_mask, &h.add(&f.as_dtype(h.dtype())?)?, &h)?),
            None => Ok(h),
        }
    }
}

// ---- model ----

pub struct Qwen3Vl {
    config: Config,
    decoder: Decoder,
    /// None: a checkpoint without the tower (text only).
    vision: Option<Qwen3VlVision>,
    mrope: MRope,
}

impl Qwen3Vl {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        // mlx-vlm's layout, else Hugging Face's original one.
        let (body, head, tower) = if w.contains("language_model.model.embed_tokens.weight") {
            ("language_model.model", "language_model.lm_head", "vision_tower")
        } else {
            ("model.language_model", "lm_head", "model.visual")
        };
        let (t, hd, kv) = (&c.text_config, c.head_dim(), c.kv_heads());
        let decoder = Decoder::load_blocks_named(w, body, head, t.num_hidden_layers, t.rms_norm_eps, c.tied(), |w, _, p| {
            let spec = AttentionSpec {
                heads: t.num_attention_heads,
                kv_heads: kv,
                head_dim: hd,
                qk_norm: true,
                eps: t.rms_norm_eps,
                window: 0,
                // Unused: the forward hands every layer M-RoPE's rotations.
                rope: Rope::new(hd, t.rope_theta, false, None)?,
            };
            Block::load(w, p, spec)
        })?;
        let vision = load_tower(w, c.vision_config.as_ref(), tower, Qwen3VlVision::load)?;
        let mrope = MRope::new(&c)?;
        Ok(Self { config: c, decoder, vision, mrope })
    }

    /// The media forward: pixels [N, C, H, W] -> features [N, T, (1+S)*D];
    /// hands the features' relative positions [N, T, 3] when the host asks.
    fn media(&self, attn: &mut dyn Attend) -> Result<Array> {
        let (pixels, vision) = media_input(attn, self.vision.as_ref(), "qwen3_vl")?;
        let feats = vision.forward_stacked(&pixels)?; // [N, T, (1+S)*D]
        put_media_positions(attn, &pixels, &vision.config().tower)?;
        Ok(feats)
    }
}

impl ModelImpl for Qwen3Vl {
    fn spec(&self) -> ModelSpec {
        let c = &self.config;
        let dims = Dims {
            num_layers: c.text_config.num_hidden_layers,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            vocab_size: c.text_config.vocab_size,
            hidden_size: c.text_config.hidden_size,
            max_context: c.text_config.max_position_embeddings,
        };
        model_spec(dims, |_| 0)
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]; a media forward: [N, T, (1+S)*D]
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        if attn.output() == Output::Media {
            return self.media(attn);
        }
        let l = tokens.dim(1);
        let pos = multimodal::positions(attn, l, "qwen3_vl")?; // [3, B, L]
        let (cos, sin) = self.mrope.rotations(&pos)?; // [B, 1, L, hd]
        let pos = Positions::Rotations { cos, sin };
        match ImageInputs::of(attn, self.config.text_config.hidden_size, self.config.deepstack())? {
            None => self.decoder.forward_at(tokens, attn, &pos),
            Some(img) => self.decoder.forward_with(tokens, attn, &pos, |h, _| img.merge(h), |i, h| img.after(i, h)),
        }
    }
}

/// config.json vetted without weights.
pub fn check(config: &str) -> Result<()> {
    Config::parse(config).map(|_| ())
}

#[cfg(test)]
#[path = "qwen3_vl_tests.rs"]
mod tests;
