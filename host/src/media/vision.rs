//! Which models take images, and how an image becomes placeholder tokens in
//! the prompt (issue 15).
//!
//! The host reads it from the model directory, never from a plugin's name: a
//! `config.json` with a `vision_config`, an image placeholder token
//! (`image_token_index` or `image_token_id`) and a fixed count of them per
//! image (`mm_tokens_per_image`, Gemma 3), plus a `preprocessor_config.json`.
//! Models whose placeholder count depends on the image (Qwen2-VL's grid)
//! are not served images yet.
//!
//! Prompt building, as Gemma3Processor does it: the chat template writes a
//! marker per image part (Gemma 3's `<start_of_image>`, the `boi` token);
//! each marker becomes `"\n\n" + boi + image_token * T + eoi + "\n\n"`, and
//! the expanded text is tokenized. The T placeholder ids of each image are
//! then found in the token list ([`placeholder_spans`]).
use super::{ImageProcessor, MediaError};
use crate::model::tokenizer::Tokenizer;
use serde_json::Value;
use std::ops::Range;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct VisionSpec {
    /// The placeholder token id the image's features replace.
    pub image_token: u32,
    /// Placeholders (features) per image, T.
    pub tokens_per_image: usize,
    /// What the chat template writes for an image part.
    pub marker: String,
    /// What each marker becomes before tokenizing.
    pub expansion: String,
    pub processor: ImageProcessor,
}

/// `key` as u64 from `config` (or its `text_config`).
fn int(config: &Value, key: &str) -> Option<u64> {
    config.get(key).and_then(Value::as_u64)
}

impl VisionSpec {
    /// The model's image spec; Ok(None) when it takes no images.
    pub fn from_model_dir(dir: &Path, tok: Option<&Tokenizer>) -> Result<Option<Self>, MediaError> {
        let config: Value = match std::fs::read(dir.join("config.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| MediaError::Config(format!("config.json: {e}")))?,
            Err(_) => return Ok(None),
        };
        let Some(parts) = Self::parts(&config) else {
            return Ok(None);
        };
        if !dir.join("preprocessor_config.json").is_file() {
            return Ok(None);
        }
        let Some(tok) = tok else {
            return Ok(None);
        };
        let processor = ImageProcessor::from_model_dir(dir)?;
        Self::build(parts, tok, processor).map(Some)
    }

    /// (image token, T, boi, eoi) when `config` describes a vision model
    /// with a fixed placeholder count.
    fn parts(config: &Value) -> Option<(u32, usize, Option<u32>, Option<u32>)> {
        config.get("vision_config").filter(|v| v.is_object())?;
        let image = int(config, "image_token_index").or_else(|| int(config, "image_token_id"))?;
        let t = int(config, "mm_tokens_per_image").filter(|&t| t > 0)?;
        let boi = int(config, "boi_token_index").or_else(|| int(config, "boi_token_id"));
        let eoi = int(config, "eoi_token_index").or_else(|| int(config, "eoi_token_id"));
        Some((image as u32, t as usize, boi.map(|b| b as u32), eoi.map(|e| e as u32)))
    }

    fn build(
        (image, t, boi, eoi): (u32, usize, Option<u32>, Option<u32>),
        tok: &Tokenizer,
        processor: ImageProcessor,
    ) -> Result<Self, MediaError> {
        let name = |id: u32| {
            tok.id_to_token(id).ok_or_else(|| MediaError::Config(format!("config.json: token id {id} is not in the tokenizer")))
        };
        let image_str = name(image)?;
        let (marker, expansion) = match (boi, eoi) {
            (Some(b), Some(e)) => {
                let (b, e) = (name(b)?, name(e)?);
                let exp = format!("\n\n{b}{}{e}\n\n", image_str.repeat(t));
                (b, exp)
            }
            _ => (image_str.clone(), image_str.repeat(t)),
        };
        Ok(VisionSpec { image_token: image, tokens_per_image: t, marker, expansion, processor })
    }

    /// `rendered` with each image marker expanded; an error (the caller's
    /// 400) when the markers are not one per image.
    pub fn expand(&self, rendered: &str, images: usize) -> Result<String, String> {
        let found = rendered.matches(&self.marker).count();
        if found != images {
            return Err(format!(
                "the prompt has {found} image marker(s) `{}` for {images} image(s) (does the chat template render image parts? is the marker in a text part?)",
                self.marker
            ));
        }
        Ok(rendered.replace(&self.marker, &self.expansion))
    }

    /// Per image, its placeholder positions in `ids` (T consecutive image
    /// tokens each, in prompt order).
    pub fn placeholder_spans(&self, ids: &[u32], images: usize) -> Result<Vec<Range<usize>>, String> {
        let t = self.tokens_per_image;
        let mut spans = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != self.image_token {
                i += 1;
                continue;
            }
            let end = (i..ids.len()).find(|&j| ids[j] != self.image_token).unwrap_or(ids.len());
            if (end - i) % t != 0 {
                return Err(format!("a run of {} image placeholder tokens is not a multiple of {t}", end - i));
            }
            spans.extend((i..end).step_by(t).map(|s| s..s + t));
            i = end;
        }
        if spans.len() != images {
            return Err(format!("the prompt has {} image placeholder runs for {images} image(s)", spans.len()));
        }
        Ok(spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: usize) -> VisionSpec {
        let processor = ImageProcessor::from_json(&serde_json::json!({
            "image_processor_type": "SiglipImageProcessor", "size": {"height": 4, "width": 4},
            "do_resize": true, "do_rescale": true, "rescale_factor": 0.00392156862745098,
            "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
        }))
        .unwrap();
        VisionSpec {
            image_token: 9,
            tokens_per_image: t,
            marker: "<boi>".into(),
            expansion: format!("\n\n<boi>{}<eoi>\n\n", "<img>".repeat(t)),
            processor,
        }
    }

    #[test]
    fn gemma3_config_parts() {
        let c = serde_json::json!({"vision_config": {}, "image_token_index": 262144, "mm_tokens_per_image": 256,
            "boi_token_index": 255999, "eoi_token_index": 256000});
        assert_eq!(VisionSpec::parts(&c), Some((262144, 256, Some(255999), Some(256000))));
        // No vision tower, or a placeholder count that depends on the image: no images.
        assert_eq!(VisionSpec::parts(&serde_json::json!({"image_token_index": 5, "mm_tokens_per_image": 4})), None);
        assert_eq!(VisionSpec::parts(&serde_json::json!({"vision_config": {}, "image_token_id": 5})), None);
    }

    #[test]
    fn markers_expand_as_gemma3_processor() {
        let s = spec(3);
        let out = s.expand("<user>look <boi> and <boi>!", 2).unwrap();
        assert_eq!(out, "<user>look \n\n<boi><img><img><img><eoi>\n\n and \n\n<boi><img><img><img><eoi>\n\n!");
        let e = s.expand("<user>look <boi>", 2).unwrap_err();
        assert!(e.contains("1 image marker(s) `<boi>` for 2 image(s)"), "{e}");
    }

    #[test]
    fn placeholder_spans_in_prompt_order() {
        let s = spec(2);
        // Two images back to back form one run of 4.
        let ids = [1, 8, 9, 9, 7, 2, 8, 9, 9, 9, 9, 7];
        assert_eq!(s.placeholder_spans(&ids, 3).unwrap(), vec![2..4, 7..9, 9..11]);
        assert!(s.placeholder_spans(&ids, 2).is_err());
        assert!(s.placeholder_spans(&[9, 9, 9], 1).unwrap_err().contains("multiple of 2"));
    }
}
