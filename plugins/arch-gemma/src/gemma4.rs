//! model_type `gemma4` (Gemma 4 with images), as mlx-vlm 0.7.10's
//! gemma4/gemma4.py computes it, from the layout mlx-vlm loads:
//! - `vision_tower.*`: the vision encoder (gemma4_vision.rs) -> [N, T, Dv];
//! - `embed_vision.*`: mlx-vlm's `MultimodalEmbedder`: RMSNorm without
//!   scale (eps vision `rms_norm_eps`), then `embedding_projection` (no
//!   bias) -> [N, T, D];
//! - `language_model.model.*`: the gemma4_text decoder (gemma4_text.rs) on
//!   `text_config`; the head is always the tied embedding (mlx-vlm's
//!   `LanguageModel` has no `lm_head`).
//!
//! Audio (`audio_tower`, `embed_audio`) is not built: a config with
//! `audio_config` loads, its audio tensors stay unused.
//!
//! How it uses the contract (ABI 3.5):
//! - **Media forward** (`Output::Media`): `input_embeddings()` lends pixel
//!   values [N, 3, H, W] in [0, 1] (mlx-vlm's processor rescales by 1/255 and
//!   does not normalise); returns `embed_vision(vision_tower(pixels))`
//!   [N, T, D], T = (H / (patch_size * pooling_kernel_size)) * (W / (...)),
//!   exactly what mlx-vlm scatters into the placeholder positions.
//! - **Logits forward**: the language model's, with `input_embeddings()`
//!   (features [B, L, D], mask [B, L]) replacing the token embeddings where
//!   the mask is set *after* the sqrt(hidden) embedding scale (unlike
//!   Gemma 3), and the per-layer token embeddings reading token 0 at the
//!   `image_token_id`, `audio_token_id` and `video_token_id` positions, as
//!   mlx-vlm's `get_input_embeddings` does. Attention is the host's: with
//!   `use_bidirectional_attention: "vision"` in `text_config` the host lets
//!   each image's tokens see each other in every `attend` call (its mask,
//!   host/src/engine/media.rs); this plugin asks for plain causal attention
//!   either way. Without input embeddings it is the text-only model.
//!
//! Placeholders: per image the prompt carries `boi_token_id`, T times
//! `image_token_id`, then `eoi_token_id`; the host puts the media forward's
//! features at the T `image_token_id` positions.
//!
//! Shapes: N images, T soft tokens per image, Dv vision hidden, D text hidden.
use crate::gemma4_text::{self, Gemma4Text};
use crate::gemma4_vision::{Gemma4Vision, VisionConfig};
use mlx_rs::Array;
use rmlx_nn::gemma::rms_norm_no_scale;
use rmlx_plugin_api::{
    author::{Attend, LinearLayer, ModelImpl, Output, Result, Weights},
    LayerCache, ModelSpec, PluginError,
};
use serde::Deserialize;
use serde_json::{Map, Value};

// ---- config ----

/// The keys of mlx-vlm's gemma4 `ModelConfig` that change the computation.
#[derive(Deserialize)]
struct Top {
    text_config: Option<Map<String, Value>>,
    vision_config: Option<VisionConfig>,
    #[serde(default = "d_image")]
    image_token_id: i64,
    #[serde(default = "d_audio")]
    audio_token_id: i64,
    video_token_id: Option<i64>,
}

fn d_image() -> i64 {
    258880
}
fn d_audio() -> i64 {
    258881
}

pub struct Config {
    pub text: gemma4_text::Config,
    pub vision: VisionConfig,
    /// Image, audio and video ids: the per-layer embeddings read 0 there.
    pub mm_token_ids: Vec<i32>,
}

impl Config {
    pub fn parse(json: &str) -> Result<Self> {
        let top: Top = rmlx_nn::parse_config(json)?;
        let bad = |m: String| Err(PluginError::config(m));
        let Some(tc) = top.text_config else { return bad("gemma4: config.json has no text_config".into()) };
        let Some(vision) = top.vision_config else { return bad("gemma4: config.json has no vision_config".into()) };
        vision.check()?;
        if tc.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
            return bad("text_config.tie_word_embeddings false is not supported (mlx-vlm's gemma4 always uses the embedding as the head)".into());
        }
        // mlx-vlm knows "vision" (the host's image runs); any other value
        // would be computed causally, so it is refused by name.
        match tc.get("use_bidirectional_attention") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::String(v)) if v == "vision" => {}
            Some(v) => return bad(format!("text_config.use_bidirectional_attention {v} is not supported (only \"vision\": each image's tokens see each other)")),
        }
        let text = gemma4_text::Config::parse(&Value::Object(tc).to_string())?;
        let vocab = text.vocab_size as i64;
        for (k, id) in [("image_token_id", Some(top.image_token_id)), ("video_token_id", top.video_token_id)] {
            if let Some(id) = id.filter(|id| !(0..vocab).contains(id)) {
                return bad(format!("{k} {id} is outside the text vocabulary ({vocab} tokens)"));
            }
        }
        let mm_token_ids = [Some(top.image_token_id), Some(top.audio_token_id), top.video_token_id]
            .into_iter()
            .flatten()
            .filter(|id| (0..=i32::MAX as i64).contains(id))
            .map(|id| id as i32)
            .collect();
        Ok(Self { text, vision, mm_token_ids })
    }
}

// ---- the multimodal embedder ----

/// mlx-vlm's `MultimodalEmbedder` for vision.
struct Embedder {
    embedding_projection: LinearLayer, // [Dv] -> [D]
    eps: f32,
}

impl Embedder {
    /// x: [N, T, Dv] -> [N, T, D]
    fn forward(&self, x: &Array) -> Result<Array> {
        self.embedding_projection.forward(&rms_norm_no_scale(x, self.eps)?)
    }
}

// ---- model ----

pub struct Gemma4 {
    text: Gemma4Text,
    vision: Gemma4Vision,
    embed_vision: Embedder,
}

impl Gemma4 {
    pub fn load(config_json: &str, w: &mut Weights) -> Result<Self> {
        let c = Config::parse(config_json)?;
        let vision = Gemma4Vision::load(&c.vision, w, "vision_tower")?;
        let embedding_projection = w.linear("embed_vision.embedding_projection")?;
        let embed_vision = Embedder { embedding_projection, eps: c.vision.rms_norm_eps };
        let mut text = Gemma4Text::load_under(c.text, w, "language_model.")?;
        text.set_multimodal(c.mm_token_ids);
        Ok(Self { text, vision, embed_vision })
    }

    /// The media encoder: pixel values [N, 3, H, W] -> [N, T, D].
    fn media(&self, attn: &dyn Attend) -> Result<Array> {
        let Some((pixels, _)) = attn.input_embeddings() else {
            return Err(PluginError::other("gemma4 media forward: no pixel values were lent (input_embeddings)"));
        };
        let h = self.vision.forward(&pixels)?; // [N, T, Dv]
        self.embed_vision.forward(&h)
    }
}

impl ModelImpl for Gemma4 {
    fn spec(&self) -> ModelSpec {
        self.text.spec()
    }

    fn layers(&self) -> Vec<LayerCache> {
        self.text.layers()
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

    /// The base config with `top`, `text` and `vision` (`,"key":value...`)
    /// laid over its top level, `text_config` and `vision_config`.
    fn cfg(top: &str, text: &str, vision: &str) -> Result<Config> {
        let mut c: Value = serde_json::from_str(
            r#"{"model_type":"gemma4","image_token_id":290,"audio_token_id":291,
               "text_config":{"hidden_size":64,"num_hidden_layers":2,"intermediate_size":64,"head_dim":16,"global_head_dim":16,
                  "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":300,"vocab_size_per_layer_input":300,
                  "hidden_size_per_layer_input":8,"num_kv_shared_layers":0},
               "vision_config":{"hidden_size":32,"num_hidden_layers":2,"intermediate_size":64,"num_attention_heads":4,
                  "num_key_value_heads":2,"head_dim":8,"patch_size":4,"pooling_kernel_size":2}}"#,
        )
        .unwrap();
        let over = |target: &mut Value, extra: &str| {
            if !extra.is_empty() {
                let o: Value = serde_json::from_str(&format!("{{{}}}", &extra[1..])).unwrap();
                for (k, v) in o.as_object().unwrap() {
                    target[k] = v.clone();
                }
            }
        };
        over(&mut c, top);
        over(&mut c["text_config"], text);
        over(&mut c["vision_config"], vision);
        Config::parse(&c.to_string())
    }

    #[test]
    fn parses_and_collects_the_multimodal_ids() {
        let c = cfg("", "", "").unwrap();
        assert_eq!(c.mm_token_ids, vec![290, 291]);
        assert_eq!((c.vision.position_embedding_size, c.vision.rope_theta()), (10240, 100.0));
        let c = cfg(r#","video_token_id":292"#, "", "").unwrap();
        assert_eq!(c.mm_token_ids, vec![290, 291, 292]);
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err = |t: &str, x: &str, v: &str| cfg(t, x, v).err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(err("", r#","tie_word_embeddings":false"#, "").contains("tie_word_embeddings"));
        assert!(err("", "", r#","head_dim":6"#).contains("multiple of 4"));
        assert!(err("", "", r#","num_key_value_heads":3"#).contains("num_key_value_heads"));
        assert!(err("", "", r#","hidden_activation":"relu""#).contains("hidden_activation"));
        assert!(err("", "", r#","model_type":"siglip_vision_model""#).contains("gemma4_vision"));
        assert!(err(r#","video_token_id":400"#, "", "").contains("video_token_id"));
        assert!(err("", r#","use_bidirectional_attention":"all""#, "").contains("use_bidirectional_attention"));
        assert!(err("", r#","use_bidirectional_attention":true"#, "").contains("use_bidirectional_attention"));
        assert!(cfg("", r#","use_bidirectional_attention":"vision""#, "").is_ok());
        assert!(Config::parse(r#"{"model_type":"gemma4","text_config":{}}"#).is_err());
    }
}
