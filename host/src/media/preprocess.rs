//! Pixels for a vision tower, as a model directory's
//! `preprocessor_config.json` asks (Hugging Face image processors):
//!
//! * fixed size (SigLIP, Gemma 3, CLIP-like): convert to RGB, resize to
//!   `size.{height,width}` (or the shortest edge to `size.shortest_edge`),
//!   `x * rescale_factor`, `(x - image_mean) / image_std`; output [3, H, W].
//! * Qwen2-VL / Qwen2.5-VL: smart resize to multiples of
//!   `patch_size * merge_size` within [min_pixels, max_pixels], same rescale
//!   and normalisation, the frame repeated to `temporal_patch_size`, then
//!   patches: output [grid_t * grid_h * grid_w, C * T * P * P] plus grid_thw.
//! * patch budget (Gemma 4: `patch_size`, `pooling_kernel_size`,
//!   `max_soft_tokens`): the aspect ratio kept, resized to the largest size
//!   of at most `max_soft_tokens * pooling_kernel_size^2` patches whose
//!   sides are multiples of `patch_size * pooling_kernel_size`
//!   ([`budget_size`]), bicubic, `x * rescale_factor` in f32 (mlx-vlm's
//!   processor), no normalisation unless `do_normalize`; output [3, H, W],
//!   the model patchifies. Each image thus has its own size and its own
//!   number of soft tokens, (H / p / k) * (W / p / k).
//!
//! The processor settings come from `processor_config.json`'s
//! `image_processor` object where there is one (Hugging Face's Gemma 4
//! repos; mlx-vlm reads it first), else from `preprocessor_config.json`.
use std::path::Path;

use serde_json::Value;

use super::resample::{resize_rgb8, Filter};
pub use super::sizing::{budget_size, smart_resize};
use super::MediaError;

/// Preprocessed pixels: row-major f32 with its shape, ready for an MLX array.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    /// [3, H, W] for fixed-size processors; [patches, C*T*P*P] for Qwen2-VL.
    pub shape: Vec<usize>,
    /// Qwen2-VL's `image_grid_thw` ([t, h, w] in patches); `None` otherwise.
    pub grid_thw: Option<[usize; 3]>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resize {
    None,
    /// Exactly `height` x `width`.
    Fixed {
        height: usize,
        width: usize,
    },
    /// Shortest edge to this, aspect kept (HF `default_to_square=False`).
    ShortestEdge(usize),
    /// Qwen2-VL smart resize.
    Smart {
        factor: usize,
        min_pixels: usize,
        max_pixels: usize,
    },
    /// Gemma 4: aspect ratio kept, at most `max_patches` patches of
    /// `patch` pixels, sides multiples of `patch * pool`.
    PatchBudget {
        patch: usize,
        pool: usize,
        max_patches: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Patching {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
}

/// A parsed `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub kind: String,
    pub resize: Resize,
    pub filter: Filter,
    pub rescale: Option<f64>,
    /// Rescale in f32 (`x as f32 * factor as f32`, mlx-vlm's Gemma 4
    /// processor) rather than in f64 then rounded (Hugging Face's `rescale`).
    pub rescale_f32: bool,
    /// (mean, std) per channel.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    pub patching: Option<Patching>,
}

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl ImageProcessor {
    /// The image processor settings of a model directory, if it has any:
    /// `processor_config.json`'s `image_processor` object, else
    /// `preprocessor_config.json`.
    pub fn config_json(dir: &Path) -> Result<Option<Value>, MediaError> {
        let read = |name: &str| -> Result<Option<Value>, MediaError> {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                return Ok(None);
            };
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| MediaError::Config(format!("{}: {e}", path.display())))
        };
        if let Some(ip) = read("processor_config.json")?
            .and_then(|mut v| v.get_mut("image_processor").map(Value::take))
            .filter(Value::is_object)
        {
            return Ok(Some(ip));
        }
        read("preprocessor_config.json")
    }

    pub fn from_model_dir(dir: &Path) -> Result<Self, MediaError> {
        let v = Self::config_json(dir)?.ok_or_else(|| {
            MediaError::Config(format!(
                "{}: neither processor_config.json with an image_processor nor preprocessor_config.json",
                dir.display()
            ))
        })?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self, MediaError> {
        let cfg = |m: String| MediaError::Config(m);
        let kind = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        let uint = |k: &str| v.get(k).and_then(Value::as_u64).map(|n| n as usize);
        let qwen = kind.starts_with("Qwen2VL")
            || kind.starts_with("Qwen2_5_VL")
            || (v.get("merge_size").is_some() && v.get("temporal_patch_size").is_some());
        // Gemma 4's processors: a soft-token budget over pooled patches.
        let budget = !qwen && (v.get("max_soft_tokens").is_some() || v.get("pooling_kernel_size").is_some());
        if flag("do_pan_and_scan", false) {
            return Err(cfg("do_pan_and_scan is not supported yet".into()));
        }
        if flag("do_center_crop", false) {
            return Err(cfg("do_center_crop is not supported yet".into()));
        }
        if !flag("do_convert_rgb", true) {
            // Images are always decoded to RGB8; a model that wants another
            // layout would need it said here.
            tracing::debug!(
                "preprocessor_config.json: do_convert_rgb=false; images are RGB anyway"
            );
        }
        let size = v.get("size");
        let size_key = |k: &str| {
            size.and_then(|s| s.get(k))
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        };
        let default_filter = if kind.starts_with("Gemma3") { 2 } else { 3 };
        let resample = v
            .get("resample")
            .and_then(Value::as_i64)
            .unwrap_or(default_filter);
        let filter = Filter::from_pil(resample).ok_or_else(|| {
            cfg(format!(
                "resample={resample} is not supported (nearest 0, bilinear 2, bicubic 3)"
            ))
        })?;
        let (resize, patching) = if qwen {
            let p = Patching {
                patch_size: uint("patch_size").unwrap_or(14),
                temporal_patch_size: uint("temporal_patch_size").unwrap_or(2),
                merge_size: uint("merge_size").unwrap_or(2),
            };
            if p.patch_size == 0 || p.temporal_patch_size == 0 || p.merge_size == 0 {
                return Err(cfg(
                    "patch_size, temporal_patch_size and merge_size must be positive".into(),
                ));
            }
            // Top-level min/max_pixels win over size.{shortest,longest}_edge, as in HF.
            let min_pixels = uint("min_pixels")
                .or(size_key("shortest_edge"))
                .unwrap_or(56 * 56);
            let max_pixels = uint("max_pixels")
                .or(size_key("longest_edge"))
                .unwrap_or(28 * 28 * 1280);
            let factor = p.patch_size * p.merge_size;
            let resize = if flag("do_resize", true) {
                Resize::Smart {
                    factor,
                    min_pixels,
                    max_pixels,
                }
            } else {
                Resize::None
            };
            (resize, Some(p))
        } else if budget {
            // Hugging Face's Gemma4ImageProcessor defaults.
            let (patch, pool, soft) = (
                uint("patch_size").unwrap_or(16),
                uint("pooling_kernel_size").unwrap_or(3),
                uint("max_soft_tokens").unwrap_or(280),
            );
            if patch == 0 || pool == 0 || soft == 0 {
                return Err(cfg(
                    "patch_size, pooling_kernel_size and max_soft_tokens must be positive".into(),
                ));
            }
            let resize = if flag("do_resize", true) {
                Resize::PatchBudget {
                    patch,
                    pool,
                    max_patches: soft * pool * pool,
                }
            } else {
                Resize::None
            };
            (resize, None)
        } else {
            let resize = if !flag("do_resize", true) {
                Resize::None
            } else if let (Some(height), Some(width)) = (size_key("height"), size_key("width")) {
                Resize::Fixed { height, width }
            } else if let Some(s) = size_key("shortest_edge") {
                Resize::ShortestEdge(s)
            } else if let Some(s) = size.and_then(Value::as_u64) {
                Resize::Fixed {
                    height: s as usize,
                    width: s as usize,
                }
            } else {
                return Err(cfg(
                    "do_resize without size.{height,width} or size.shortest_edge".into(),
                ));
            };
            (resize, None)
        };
        let rescale =
            flag("do_rescale", true).then(|| num("rescale_factor").unwrap_or(1.0 / 255.0));
        let triple = |k: &str, d: [f64; 3]| -> Result<[f32; 3], MediaError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d.map(|x| x as f32)),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| cfg(format!("{k} holds a non-number")))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(other) => Err(cfg(format!("{k} must be 3 numbers, got {other}"))),
            }
        };
        let (dmean, dstd) = if qwen {
            (CLIP_MEAN, CLIP_STD)
        } else {
            ([0.5; 3], [0.5; 3])
        };
        // Gemma 4 was trained on [0, 1] pixels: no normalisation by default.
        let normalize = if flag("do_normalize", !budget) {
            let (m, s) = (triple("image_mean", dmean)?, triple("image_std", dstd)?);
            if s.contains(&0.0) {
                return Err(cfg("image_std holds a zero".into()));
            }
            Some((m, s))
        } else {
            None
        };
        Ok(ImageProcessor {
            kind,
            resize,
            filter,
            rescale,
            rescale_f32: budget,
            normalize,
            patching,
        })
    }

    /// The size an image of `width` x `height` is resized to, (width, height).
    pub fn target_size(
        &self,
        part: &str,
        width: usize,
        height: usize,
    ) -> Result<(usize, usize), MediaError> {
        match self.resize {
            Resize::None => Ok((width, height)),
            Resize::Fixed {
                height: h,
                width: w,
            } => Ok((w, h)),
            Resize::ShortestEdge(s) => {
                let (short, long) = (width.min(height), width.max(height));
                let new_long = (s as f64 * long as f64 / short as f64) as usize;
                Ok(if width <= height {
                    (s, new_long)
                } else {
                    (new_long, s)
                })
            }
            Resize::Smart {
                factor,
                min_pixels,
                max_pixels,
            } => smart_resize(height, width, factor, min_pixels, max_pixels)
                .map(|(h, w)| (w, h))
                .map_err(|reason| MediaError::Unusable {
                    part: part.into(),
                    reason,
                }),
            Resize::PatchBudget {
                patch,
                pool,
                max_patches,
            } => budget_size(height, width, patch, pool, max_patches)
                .map(|(h, w)| (w, h))
                .map_err(|reason| MediaError::Unusable {
                    part: part.into(),
                    reason,
                }),
        }
    }

    /// Preprocesses an RGB8 image. `part` names the request part in errors.
    pub fn preprocess(&self, part: &str, img: &image::RgbImage) -> Result<Pixels, MediaError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (ow, oh) = self.target_size(part, w, h)?;
        if ow == 0 || oh == 0 {
            return Err(MediaError::Unusable {
                part: part.into(),
                reason: format!("resizes to {ow}x{oh}"),
            });
        }
        // [oh, ow, 3]; an image already at its size is not resampled (as PIL).
        let rgb = if (ow, oh) == (w, h) {
            std::borrow::Cow::Borrowed(img.as_raw().as_slice())
        } else {
            std::borrow::Cow::Owned(resize_rgb8(img.as_raw(), w, h, ow, oh, self.filter))
        };
        // Channels first, rescaled (f64 multiply then f32 as HF, or in f32
        // as mlx-vlm's Gemma 4 processor) and normalised in f32.
        let mut chw = vec![0f32; 3 * oh * ow]; // [3, oh, ow]
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x = match self.rescale {
                    Some(s) if self.rescale_f32 => px[c] as f32 * s as f32,
                    Some(s) => (px[c] as f64 * s) as f32,
                    None => px[c] as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                chw[c * oh * ow + i] = x;
            }
        }
        match &self.patching {
            None => Ok(Pixels {
                data: chw,
                shape: vec![3, oh, ow],
                grid_thw: None,
            }),
            Some(p) => Ok(patchify(&chw, oh, ow, p)),
        }
    }
}

/// [3, H, W] -> [grid_t*grid_h*grid_w, C*T*P*P]: the one frame repeated T
/// times; rows ordered (t, h/M, w/M, M, M), columns (C, T, P, P).
fn patchify(chw: &[f32], h: usize, w: usize, p: &Patching) -> Pixels {
    let (ps, t, m) = (p.patch_size, p.temporal_patch_size, p.merge_size);
    let (gh, gw) = (h / ps, w / ps);
    let cols = 3 * t * ps * ps;
    let mut data = Vec::with_capacity(gh * gw * cols);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * ps, (bw * m + mw) * ps);
                    for c in 0..3 {
                        for _frame in 0..t {
                            for py in 0..ps {
                                let row = c * h * w + (y0 + py) * w + x0;
                                data.extend_from_slice(&chw[row..row + ps]);
                            }
                        }
                    }
                }
            }
        }
    }
    Pixels {
        data,
        shape: vec![gh * gw, cols],
        grid_thw: Some([1, gh, gw]),
    }
}
