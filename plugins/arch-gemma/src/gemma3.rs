//! model_type `gemma3` (Gemma 3 4B/12B/27B with images), as mlx-vlm's
//! gemma3/gemma3.py computes it, from the layout mlx-vlm loads:
//! - `vision_tower.vision_model.*`: the SigLIP tower (siglip.rs) -> [N, P, Dv];
//! - `multi_modal_projector.*`: average-pool the patch grid down to
//!   `mm_tokens_per_image` (T = t*t) tokens, Gemma RMSNorm `mm_soft_emb_norm`
//!   (`1 + weight`, eps vision `layer_norm_eps`), then x @
//!   `mm_input_projection_weight` [Dv, D] -> [N, T, D];
//! - `language_model.*`: the gemma3_text decoder (gemma3_text.rs), its config
//!   `text_config` read with mlx-vlm's `TextConfig` defaults (below).
//!
//! How it uses the contract (ABI 3.5):
//! - **Media forward** (`Output::Media`): `input_embeddings()` lends pixel
//!   values [N, C, S, S]; returns the features that replace the image's T
//!   placeholder tokens: the projector's output divided by sqrt(config
//!   `hidden_size`), as mlx-vlm's `prepare_inputs_for_multimodal` scales them
//!   before merging. That `hidden_size` is the **top-level** key, default
//!   2048 (mlx-vlm's `ModelConfig`; Hugging Face's Gemma 3 configs have none,
//!   so mlx-vlm divides by sqrt(2048) while the language model then
//!   multiplies the merged sequence by bf16(sqrt(text hidden)); HF leaves
//!   image features unscaled. mlx-vlm is followed here.) The tower's
//!   attention runs inside the plugin (siglip.rs says why).
//! - **Logits forward**: the language model's, with `input_embeddings()`
//!   (features [B, L, D], mask [B, L]) replacing the token embeddings where
//!   the mask is set, before the embedding scale, as mlx-vlm merges them.
//!   Attention stays causal (windowed on local layers) over image tokens
//!   too: mlx-vlm's generation drops the 4-D mask `get_input_embeddings`
//!   returns. Without input embeddings it is the text-only model.
//!   (mlx-vlm also zeroes the embeddings of `pad_token_id` tokens when an
//!   image is present; a prompt never carries them, so that is not done.)
//!
//! Placeholders: the prompt carries `boi_token_index`, then T times
//! `image_token_index`, then `eoi_token_index` per image (HF's processor
//! writes "\n\n<start_of_image>" + T * "<image_soft_token>" +
//! "<end_of_image>\n\n"); the host puts the media forward's features at the
//! T `image_token_index` positions.
//!
//! Shapes: N images, P patches (p*p), T image tokens (t*t), Dv vision
//! hidden, D text hidden.
use crate::gemma3_text::{self, Gemma3Text};
use crate::siglip::{SiglipVision, VisionConfig};
use mlx_rs::{ops::divide, Array};
use rmlx_nn::gemma::GemmaNorm;
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, Output, Result, Weights},
    ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::{Map, Value};

// ---- config ----

/// The keys of mlx-vlm's gemma3 `ModelConfig` that change the computation.
#[derive(Deserialize)]
struct Top {
    text_config: Option<Map<String, Value>>,
    vision_config: Option<VisionConfig>,
    /// Divides the image features (mlx-vlm's default 2048 when absent).
    #[serde(default = "d_hidden")]
    hidden_size: i32,
    #[serde(default = "d_image_token")]
    image_token_index: i64,
    /// Hugging Face's key; mlx-vlm reads `text_config.mm_tokens_per_image`.
    mm_tokens_per_image: Option<i32>,
}

fn d_hidden() -> i32 {
    2048
}
fn d_image_token() -> i64 {
    262144
}

/// mlx-vlm's gemma3 `TextConfig` defaults where they differ from (or are not
/// among) mlx-lm's gemma3_text ones, which `gemma3_text::Config` applies.
fn text_defaults() -> [(&'static str, Value); 10] {
    [
        ("num_attention_heads", 8.into()),
        ("head_dim", 256.into()),
        ("rms_norm_eps", 1e-6.into()),
        ("vocab_size", 262208.into()),
        ("num_key_value_heads", 4.into()),
        ("rope_local_base_freq", 10000.0.into()),
        ("query_pre_attn_scalar", 256.0.into()),
        ("sliding_window", 1024.into()),
        ("sliding_window_pattern", 6.into()),
        ("max_position_embeddings", 4096.into()),
    ]
}

pub struct Config {
    pub text: gemma3_text::Config,
    pub vision: VisionConfig,
    /// The top-level `hidden_size` the image features are divided by the root of.
    pub feature_hidden: i32,
    /// T, image tokens per image.
    pub mm_tokens_per_image: i32,
    pub image_token_index: i64,
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let top: Top = rmlx_nn::parse_config(json)?;
        let bad = |m: String| Err(PluginError::config(m));
        let Some(mut tc) = top.text_config else { return bad("gemma3: config.json has no text_config".into()) };
        let Some(vision) = top.vision_config else { return bad("gemma3: config.json has no vision_config".into()) };
        vision.check()?;
        for k in ["hidden_size", "num_hidden_layers", "intermediate_size"] {
            if tc.get(k).is_none_or(Value::is_null) {
                return bad(format!("text_config.{k} is required"));
            }
        }
        for (k, v) in text_defaults() {
            if tc.get(k).is_none_or(Value::is_null) {
                tc.insert(k.into(), v);
            }
        }
        // mlx-vlm's global layers use `rope_global_base_freq` and never read
        // `rope_theta`: the two must not disagree.
        let global = tc.get("rope_global_base_freq").and_then(Value::as_f64).unwrap_or(1e6);
        if let Some(t) = tc.get("rope_theta").and_then(Value::as_f64).filter(|t| *t as f32 != global as f32) {
            return bad(format!(
                "text_config.rope_theta {t} differs from the global RoPE base {global} mlx-vlm uses (rope_global_base_freq)"
            ));
        }
        tc.insert("rope_theta".into(), global.into());
        if tc.get("rope_traditional").and_then(Value::as_bool) == Some(true) {
            return bad("text_config.rope_traditional is not supported (Gemma 3 uses the split-half RoPE)".into());
        }
        let t = tc.get("mm_tokens_per_image").and_then(Value::as_i64).unwrap_or(256) as i32;
        if let Some(top_t) = top.mm_tokens_per_image.filter(|&v| v != t) {
            return bad(format!(
                "mm_tokens_per_image {top_t} differs from text_config's {t} (what mlx-vlm reads, 256 when absent)"
            ));
        }
        let text = gemma3_text::Config::parse(&Value::Object(tc).to_string())?;
        let c = Self { text, vision, feature_hidden: top.hidden_size, mm_tokens_per_image: t, image_token_index: top.image_token_index };
        c.check()?;
        Ok(c)
    }

    /// t, image tokens per side of the pooled grid.
    fn tokens_per_side(&self) -> i32 {
        (self.mm_tokens_per_image as f64).sqrt().round() as i32
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(m));
        let (t, side) = (self.mm_tokens_per_image, self.tokens_per_side());
        if t < 1 || side * side != t {
            return bad(format!("mm_tokens_per_image {t} must be a square number (a t x t grid of pooled patches)"));
        }
        let pps = self.vision.patches_per_side();
        if pps % side != 0 {
            return bad(format!("the {pps}x{pps} patch grid does not pool evenly to {side}x{side} (mm_tokens_per_image {t})"));
        }
        if self.feature_hidden <= 0 {
            return bad(format!("hidden_size must be positive, got {}", self.feature_hidden));
        }
        if !(0..self.text.vocab_size as i64).contains(&self.image_token_index) {
            return bad(format!(
                "image_token_index {} is outside the text vocabulary ({} tokens)",
                self.image_token_index, self.text.vocab_size
            ));
        }
        Ok(())
    }
}

// ---- projector ----

/// mlx-vlm's `Gemma3MultiModalProjector`.
struct Projector {
    norm: GemmaNorm,   // [Dv]
    projection: Array, // [Dv, D]
    /// Patches per side, pooled tokens per side.
    pps: i32,
    tps: i32,
    /// sqrt(top-level hidden_size), in f32.
    divisor: f32,
}

impl Projector {
    fn load(c: &Config, w: &mut Weights) -> Result<Self> {
        let p = "multi_modal_projector";
        let projection = w.tensor(&format!("{p}.mm_input_projection_weight"))?;
        let want = [c.vision.hidden_size, c.text.hidden_size];
        if projection.shape() != want {
            return Err(PluginError::config(format!(
                "{p}.mm_input_projection_weight is {:?}, expected {want:?} (vision hidden, text hidden)",
                projection.shape()
            )));
        }
        Ok(Self {
            norm: GemmaNorm::load(w, &format!("{p}.mm_soft_emb_norm"), c.vision.layer_norm_eps)?,
            projection,
            pps: c.vision.patches_per_side(),
            tps: c.tokens_per_side(),
            divisor: (c.feature_hidden as f64).sqrt() as f32,
        })
    }

    /// x: [N, P, Dv] -> [N, T, D], ready to merge.
    fn forward(&self, x: &Array) -> Result<Array> {
        let (n, dv) = (x.dim(0), x.dim(2));
        let k = self.pps / self.tps;
        // The patch grid is row-major; pool k x k blocks (AvgPool2d, stride k).
        let g = x.reshape(&[n, self.tps, k, self.tps, k, dv])?; // [N, t, k, t, k, Dv]
        let pooled = g.mean_axes(&[2, 4], false)?.reshape(&[n, self.tps * self.tps, dv])?; // [N, T, Dv]
        let normed = self.norm.forward(&pooled)?; // [N, T, Dv]
        let y = normed.matmul(&self.projection)?.as_dtype(x.dtype())?; // [N, T, D]
        let d = Array::from_f32(self.divisor).as_dtype(y.dtype())?;
        Ok(divide(&y, &d)?)
    }
}

// ---- model ----

pub struct Gemma3 {
    text: Gemma3Text,
    vision: SiglipVision,
    projector: Projector,
}

impl Gemma3 {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let vision = SiglipVision::load(&c.vision, w, "vision_tower.vision_model")?;
        let projector = Projector::load(&c, w)?;
        let text = Gemma3Text::load_under(c.text, w, "language_model.")?;
        Ok(Self { text, vision, projector })
    }

    /// The media encoder: pixel values [N, C, S, S] -> [N, T, D].
    fn media(&self, attn: &dyn Attend) -> Result<Array> {
        let Some((pixels, _)) = attn.input_embeddings() else {
            return Err(PluginError::other("gemma3 media forward: no pixel values were lent (input_embeddings)"));
        };
        let h = self.vision.forward(&pixels)?; // [N, P, Dv]
        self.projector.forward(&h)
    }
}

impl ModelImpl for Gemma3 {
    fn spec(&self) -> ModelSpec {
        self.text.spec()
    }

    /// tokens: [B, L] -> logits [B, L | 1, V]; for `Output::Media`, tokens
    /// [N, 1] (placeholders) -> image features [N, T, D].
    fn forward(&mut self, tokens: &Array, attn: &mut dyn Attend) -> Result<Array> {
        if attn.output() == Output::Media {
            return self.media(attn);
        }
        self.text.forward(tokens, attn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The top-level keys the tests start from.
    const TOP: &str = r#","image_token_index":262,"mm_tokens_per_image":4"#;

    fn cfg(top: &str, text: &str, vision: &str) -> Result<Config> {
        Config::parse(&format!(
            r#"{{"model_type":"gemma3"{top},
               "text_config":{{"hidden_size":64,"num_hidden_layers":2,"intermediate_size":64,"head_dim":16,
                  "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":300,"mm_tokens_per_image":4{text}}},
               "vision_config":{{"hidden_size":32,"num_hidden_layers":2,"intermediate_size":64,"num_attention_heads":4,
                  "patch_size":8,"image_size":32{vision}}}}}"#
        ))
    }

    #[test]
    fn mlx_vlm_defaults_apply() {
        let c = cfg(TOP, "", "").unwrap();
        assert_eq!((c.feature_hidden, c.mm_tokens_per_image, c.image_token_index), (2048, 4, 262));
        assert_eq!((c.text.sliding_window, c.text.sliding_window_pattern, c.text.max_position_embeddings), (1024, 6, 4096));
        assert_eq!((c.text.rope_theta, c.text.query_pre_attn_scalar), (1e6, 256.0));
        assert_eq!((c.vision.num_channels, c.vision.layer_norm_eps), (3, 1e-6));
        let c = cfg(&format!(r#"{TOP},"hidden_size":64"#), r#","rope_global_base_freq":500000.0"#, "").unwrap();
        assert_eq!((c.feature_hidden, c.text.rope_theta), (64, 5e5));
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err = |t: &str, x: &str, v: &str| cfg(t, x, v).err().map(|e| e.message.to_string()).unwrap_or_default();
        let img = r#","image_token_index":262"#;
        assert!(err(TOP, r#","rope_theta":10000.0"#, "").contains("rope_theta"));
        assert!(err(TOP, r#","rope_traditional":true"#, "").contains("rope_traditional"));
        assert!(err(&format!(r#"{img},"mm_tokens_per_image":16"#), "", "").contains("mm_tokens_per_image 16"));
        assert!(err(TOP, "", r#","image_size":36"#).contains("image_size"));
        assert!(err(TOP, "", r#","hidden_act":"relu""#).contains("hidden_act"));
        assert!(err(img, r#","mm_tokens_per_image":3"#, "").contains("square"));
        assert!(err(img, r#","mm_tokens_per_image":9"#, "").contains("pool evenly"));
        assert!(err(r#","image_token_index":300"#, "", "").contains("image_token_index"));
        assert!(err(TOP, r#","hidden_size":null"#, "").contains("text_config.hidden_size"));
        assert!(Config::parse(r#"{"model_type":"gemma3","text_config":{}}"#).is_err());
    }
}
