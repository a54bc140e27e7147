//! Which models take images, and how an image becomes placeholder tokens in
//! the prompt (issue 15).
//!
//! The host reads it from the model directory, never from a plugin's name:
//! a `config.json` with a `vision_config` and an image placeholder token
//! (`image_token_index` or `image_token_id`), image processor settings
//! (`processor_config.json`'s `image_processor`, or
//! `preprocessor_config.json`: [`ImageProcessor::config_json`]) and one of
//! two placeholder layouts, told apart by their fields as the Hugging Face /
//! mlx-vlm processors are:
//!
//! * a fixed count per image, `mm_tokens_per_image` T (Gemma3Processor):
//!   the chat template writes the begin-of-image token (`boi_token_index`)
//!   per image part; each becomes `"\n\n" + boi + image_token * T + eoi +
//!   "\n\n"`.
//! * a count per image from its preprocessed size (Gemma4Processor; the
//!   processor has a soft-token budget, `max_soft_tokens` /
//!   `pooling_kernel_size`): the template writes the image token itself
//!   (`<|image|>`) per image part; each becomes `boi + image_token * T_i +
//!   eoi` with T_i = (H / p / k) * (W / p / k) for the image resized to
//!   H x W, p and k the tower's `vision_config.patch_size` and
//!   `pooling_kernel_size` (what its media forward returns per image).
//!
//! * Qwen2-VL / Qwen2.5-VL's merged grid (a smart-resize processor with
//!   `patch_size`, `merge_size` and `temporal_patch_size`): the template
//!   writes `<|vision_start|><|image_pad|><|vision_end|>` per image part; the
//!   image token becomes `image_token * T_i`, T_i = (H / p / m) * (W / p / m)
//!   for the image smart-resized to H x W, p and m the processor's
//!   `patch_size` and `merge_size` (vision_config's `patch_size` and
//!   `spatial_merge_size` must agree). The host hands the tower [3, H, W]
//!   like the other layouts (the tower patchifies: the processor's patch
//!   flattening is left to it), and a 3.7 media forward returns each
//!   feature's grid position for multimodal RoPE (engine/mrope.rs).
//!
//! The expanded text is tokenized and each image's placeholder ids are found
//! in the token list ([`VisionSpec::placeholder_spans`]).
use super::preprocess::Resize;
use super::{ImageProcessor, MediaError, Pixels};
use crate::model::tokenizer::Tokenizer;
use serde_json::Value;
use std::ops::Range;
use std::path::Path;

/// How many placeholder tokens (features) an image takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholders {
    /// The same count for every image.
    Fixed(usize),
    /// (H / patch / pool) * (W / patch / pool) of the preprocessed [3, H, W].
    PooledPatches { patch: usize, pool: usize },
}

#[derive(Debug, Clone)]
pub struct VisionSpec {
    /// The placeholder token id the image's features replace.
    pub image_token: u32,
    pub placeholders: Placeholders,
    /// What the chat template writes for an image part.
    pub marker: String,
    /// Each marker becomes `before + image * T + after`.
    before: String,
    image: String,
    after: String,
    pub processor: ImageProcessor,
}

/// `key` as u64 from `config`.
fn int(config: &Value, key: &str) -> Option<u64> {
    config.get(key).and_then(Value::as_u64)
}

/// What `config.json` says about images: placeholder, begin/end tokens, and
/// the fixed count or the tower's (patch, pool).
#[derive(Debug, PartialEq)]
struct Parts {
    image: u32,
    boi: Option<u32>,
    eoi: Option<u32>,
    fixed: Option<usize>,
    tower: (Option<usize>, Option<usize>),
    /// vision_config's `spatial_merge_size` (Qwen2-VL's merged grid).
    merge: Option<usize>,
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
        let Some(json) = ImageProcessor::config_json(dir)? else {
            return Ok(None);
        };
        let Some(tok) = tok else {
            return Ok(None);
        };
        let mut processor = ImageProcessor::from_json(&json)?;
        let Some(placeholders) = Self::layout(&parts, &processor)? else {
            return Ok(None);
        };
        // The media forward takes [3, H, W]: a merged-grid tower patchifies itself.
        processor.patching = None;
        Self::build(&parts, placeholders, tok, processor).map(Some)
    }

    fn parts(config: &Value) -> Option<Parts> {
        let vision = config.get("vision_config").filter(|v| v.is_object())?;
        let image = int(config, "image_token_index").or_else(|| int(config, "image_token_id"))?;
        let boi = int(config, "boi_token_index").or_else(|| int(config, "boi_token_id"));
        let eoi = int(config, "eoi_token_index").or_else(|| int(config, "eoi_token_id"));
        let fixed = int(config, "mm_tokens_per_image").filter(|&t| t > 0).map(|t| t as usize);
        let tower = (int(vision, "patch_size").map(|p| p as usize), int(vision, "pooling_kernel_size").map(|k| k as usize));
        let merge = int(vision, "spatial_merge_size").map(|m| m as usize);
        Some(Parts { image: image as u32, boi: boi.map(|b| b as u32), eoi: eoi.map(|e| e as u32), fixed, tower, merge })
    }

    /// The placeholder layout, None when the model's is not one the host
    /// knows. A budget processor whose patch or pooling differs from the
    /// tower's would give the prompt a count the tower does not return: a
    /// config error.
    fn layout(parts: &Parts, processor: &ImageProcessor) -> Result<Option<Placeholders>, MediaError> {
        if let Some(t) = parts.fixed {
            return Ok(Some(Placeholders::Fixed(t)));
        }
        if let (Resize::Smart { .. }, Some(p)) = (&processor.resize, &processor.patching) {
            let (patch, merge) = (p.patch_size, p.merge_size);
            let (tp, tm) = (parts.tower.0.unwrap_or(patch), parts.merge.unwrap_or(merge));
            if (tp, tm) != (patch, merge) {
                return Err(MediaError::Config(format!(
                    "the image processor's patch_size {patch} / merge_size {merge} differ from vision_config's patch_size {tp} / spatial_merge_size {tm}"
                )));
            }
            return Ok(Some(Placeholders::PooledPatches { patch, pool: merge }));
        }
        let Resize::PatchBudget { patch, pool, .. } = processor.resize else {
            return Ok(None);
        };
        let (tp, tk) = (parts.tower.0.unwrap_or(patch), parts.tower.1.unwrap_or(pool));
        if (tp, tk) != (patch, pool) {
            return Err(MediaError::Config(format!(
                "the image processor's patch_size {patch} / pooling_kernel_size {pool} differ from vision_config's {tp} / {tk}"
            )));
        }
        Ok(Some(Placeholders::PooledPatches { patch, pool }))
    }

    fn build(parts: &Parts, placeholders: Placeholders, tok: &Tokenizer, processor: ImageProcessor) -> Result<Self, MediaError> {
        let name = |id: u32| {
            tok.id_to_token(id).ok_or_else(|| MediaError::Config(format!("config.json: token id {id} is not in the tokenizer")))
        };
        let image = name(parts.image)?;
        let (boi, eoi) = match (parts.boi, parts.eoi) {
            (Some(b), Some(e)) => (Some(name(b)?), Some(name(e)?)),
            _ => (None, None),
        };
        let (marker, before, after) = match (&placeholders, boi, eoi) {
            // Gemma3Processor: the template's boi becomes the whole block.
            (Placeholders::Fixed(_), Some(b), Some(e)) => (b.clone(), format!("\n\n{b}"), format!("{e}\n\n")),
            // Gemma4Processor: the template's image token becomes the block.
            (Placeholders::PooledPatches { .. }, Some(b), Some(e)) => (image.clone(), b, e),
            _ => (image.clone(), String::new(), String::new()),
        };
        Ok(VisionSpec { image_token: parts.image, placeholders, marker, before, image, after, processor })
    }

    /// The count of every image when it does not depend on the image.
    pub fn fixed_tokens(&self) -> Option<usize> {
        match self.placeholders {
            Placeholders::Fixed(t) => Some(t),
            Placeholders::PooledPatches { .. } => None,
        }
    }

    /// The fewest placeholders an image can take.
    pub fn min_tokens(&self) -> usize {
        self.fixed_tokens().unwrap_or(1)
    }

    /// The placeholders of an image preprocessed to `pixels`; an error (the
    /// caller's 400) when its size does not pool evenly.
    pub fn tokens_for(&self, pixels: &Pixels) -> Result<usize, String> {
        match self.placeholders {
            Placeholders::Fixed(t) => Ok(t),
            Placeholders::PooledPatches { patch, pool } => {
                let side = patch * pool;
                match pixels.shape[..] {
                    [_, h, w] if h % side == 0 && w % side == 0 && h > 0 && w > 0 => Ok((h / side) * (w / side)),
                    _ => Err(format!("preprocessed to {:?}: not [3, H, W] with H and W multiples of {side}", pixels.shape)),
                }
            }
        }
    }

    /// `rendered` with each image marker expanded to its image's `counts`
    /// placeholders; an error (the caller's 400) when the markers are not
    /// one per image.
    pub fn expand(&self, rendered: &str, counts: &[usize]) -> Result<String, String> {
        let found = rendered.matches(&self.marker).count();
        if found != counts.len() {
            return Err(format!(
                "the prompt has {found} image marker(s) `{}` for {} image(s) (does the chat template render image parts? is the marker in a text part?)",
                self.marker,
                counts.len()
            ));
        }
        // One pass over the text: the expansion may hold the marker itself.
        let mut out = String::with_capacity(rendered.len() + counts.iter().sum::<usize>() * self.image.len());
        let mut pieces = rendered.split(self.marker.as_str());
        out.push_str(pieces.next().unwrap_or(""));
        for (piece, &t) in pieces.zip(counts) {
            out.push_str(&self.before);
            for _ in 0..t {
                out.push_str(&self.image);
            }
            out.push_str(&self.after);
            out.push_str(piece);
        }
        Ok(out)
    }

    /// Per image, its placeholder positions in `ids`: `counts[i]`
    /// consecutive image tokens each, in prompt order (two images' runs may
    /// touch).
    pub fn placeholder_spans(&self, ids: &[u32], counts: &[usize]) -> Result<Vec<Range<usize>>, String> {
        let mut runs = Vec::new(); // (start, end) of each run of image tokens
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != self.image_token {
                i += 1;
                continue;
            }
            let end = (i..ids.len()).find(|&j| ids[j] != self.image_token).unwrap_or(ids.len());
            runs.push((i, end));
            i = end;
        }
        let total: usize = runs.iter().map(|(s, e)| e - s).sum();
        let want: usize = counts.iter().sum();
        if total != want {
            return Err(format!("the prompt has {total} image placeholder tokens; its {} image(s) take {want}", counts.len()));
        }
        let mut spans = Vec::with_capacity(counts.len());
        let mut run = runs.iter();
        let (mut at, mut end) = (0, 0);
        for &t in counts {
            if at == end {
                (at, end) = *run.next().ok_or("more images than placeholder runs")?;
            }
            if at + t > end {
                return Err(format!("an image of {t} placeholders straddles runs of image tokens at {at}..{end}"));
            }
            spans.push(at..at + t);
            at += t;
        }
        if at != end || run.next().is_some() {
            return Err("image placeholder runs do not line up with the images".into());
        }
        Ok(spans)
    }
}

#[cfg(test)]
#[path = "vision_tests.rs"]
mod tests;
