//! Preprocessing against Hugging Face's image processors (transformers' PIL
//! backends), via fixtures from tests/goldens/make_image_goldens.py, and
//! against mlx-vlm's Gemma4ImageProcessor (scripts/dev/gemma4_serve_golden.py).
use std::path::PathBuf;

use super::preprocess::{smart_resize, ImageProcessor, Resize};
use super::resample::Filter;
use super::{decode_image, MediaHash, MediaOptions};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images")
}

fn processor(name: &str) -> ImageProcessor {
    let text = std::fs::read_to_string(fixtures().join(format!("configs/{name}.json"))).unwrap();
    ImageProcessor::from_json(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn check(image: &str, config: &str) {
    check_within(image, "png", config, 1e-5);
}

fn check_within(image: &str, ext: &str, config: &str, tol: f32) {
    let dir = fixtures();
    let png = std::fs::read(dir.join(format!("{image}.{ext}"))).unwrap();
    let img = decode_image("messages[0].content[0]", &png, &MediaOptions::default()).unwrap();
    let got = processor(config)
        .preprocess("messages[0].content[0]", &img)
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{image}.{config}.json"))).unwrap(),
    )
    .unwrap();
    let shape: Vec<usize> = serde_json::from_value(meta["shape"].clone()).unwrap();
    assert_eq!(got.shape, shape, "{image} {config}: shape");
    if let Some(g) = meta.get("grid_thw") {
        let g: [usize; 3] = serde_json::from_value(g.clone()).unwrap();
        assert_eq!(got.grid_thw, Some(g), "{image} {config}: grid_thw");
    } else {
        assert_eq!(got.grid_thw, None);
    }
    let raw = std::fs::read(dir.join(format!("{image}.{config}.f32"))).unwrap();
    let want: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(got.data.len(), want.len(), "{image} {config}: length");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, b)) in got.data.iter().zip(&want).enumerate() {
        if (a - b).abs() > worst {
            (worst, at) = ((a - b).abs(), i);
        }
    }
    assert!(
        worst <= tol,
        "{image} {config}: max |diff| {worst} at {at} (got {}, want {})",
        got.data[at],
        want[at]
    );
}

#[test]
fn siglip_matches_hf() {
    for img in ["rgb37x23", "rgba13x9", "grey50x61"] {
        check(img, "siglip");
    }
}

#[test]
fn gemma3_matches_hf() {
    for img in ["rgb37x23", "rgba13x9", "grey50x61"] {
        check(img, "gemma3");
    }
}

#[test]
fn qwen2vl_matches_hf() {
    // 37x23 rounds within bounds, 13x9 scales up to min_pixels, 50x61 down to max_pixels.
    for img in ["rgb37x23", "rgba13x9", "grey50x61"] {
        check(img, "qwen2vl");
    }
}

/// mlx-vlm's Gemma 4 processor (patch 4, pooling 2, 6 soft tokens): the
/// aspect ratio kept (37x23 -> 24x8, 50x61 -> 16x16), the 1-row fallback
/// (61x5 -> 48x8), no resize (24x16), upscaling (11x7 -> 24x8); bicubic,
/// rescaled in f32, not normalised. Bit-exact.
#[test]
fn gemma4_matches_mlx_vlm() {
    for img in ["rgb37x23", "grey50x61", "thin61x5", "rgb24x16", "rgb11x7"] {
        check_within(img, "png", "gemma4", 0.0);
    }
    let p = processor("gemma4");
    assert_eq!(p.resize, Resize::PatchBudget { patch: 4, pool: 2, max_patches: 24 });
    assert_eq!((p.filter, p.normalize, p.rescale_f32), (Filter::Bicubic, None, true));
    // Hugging Face's defaults: patch 16, pooling 3, 280 soft tokens.
    let d = ImageProcessor::from_json(&serde_json::json!({"max_soft_tokens": 280})).unwrap();
    assert_eq!(d.resize, Resize::PatchBudget { patch: 16, pool: 3, max_patches: 2520 });
    let e = ImageProcessor::from_json(&serde_json::json!({"pooling_kernel_size": 0})).unwrap_err();
    assert!(e.to_string().contains("must be positive"), "{e}");
}

/// processor_config.json's `image_processor` wins over
/// preprocessor_config.json (mlx-vlm reads it first); without it, the
/// latter; neither: none.
#[test]
fn processor_config_json_is_read_first() {
    let d = tempfile::tempdir().unwrap();
    assert!(ImageProcessor::config_json(d.path()).unwrap().is_none());
    assert!(ImageProcessor::from_model_dir(d.path()).unwrap_err().to_string().contains("neither"));
    std::fs::write(d.path().join("preprocessor_config.json"), r#"{"size": {"height": 8, "width": 8}}"#).unwrap();
    // Gemma 3's processor_config.json has no image_processor: not used.
    std::fs::write(d.path().join("processor_config.json"), r#"{"image_seq_length": 256}"#).unwrap();
    let p = ImageProcessor::from_model_dir(d.path()).unwrap();
    assert_eq!(p.resize, Resize::Fixed { height: 8, width: 8 });
    std::fs::write(d.path().join("processor_config.json"), r#"{"image_processor": {"max_soft_tokens": 70, "patch_size": 4}}"#).unwrap();
    let p = ImageProcessor::from_model_dir(d.path()).unwrap();
    assert_eq!(p.resize, Resize::PatchBudget { patch: 4, pool: 3, max_patches: 630 });
    std::fs::write(d.path().join("processor_config.json"), "{").unwrap();
    assert_eq!(ImageProcessor::from_model_dir(d.path()).unwrap_err().http_status(), 500);
}

/// JPEG decoders differ: image-rs (zune-jpeg) and PIL (libjpeg-turbo) give
/// up to 3 u8 steps apart on this 4:2:0 image (max 3, 658 of 2553 values
/// differ before resizing), so JPEG pixels match HF only to 3/255/std.
#[test]
fn jpeg_within_decoder_tolerance() {
    for config in ["siglip", "gemma3", "qwen2vl"] {
        let min_std = processor(config)
            .normalize
            .unwrap()
            .1
            .into_iter()
            .fold(f32::MAX, f32::min);
        check_within("rgbjpeg37x23", "jpg", config, 3.0 / 255.0 / min_std + 1e-5);
    }
}

#[test]
fn config_parsing() {
    let q = processor("qwen2vl");
    assert_eq!(
        q.resize,
        Resize::Smart {
            factor: 14,
            min_pixels: 392,
            max_pixels: 1568
        }
    );
    assert_eq!(q.filter, Filter::Bicubic);
    assert_eq!(processor("gemma3").filter, Filter::Bilinear);
    // size.{shortest,longest}_edge is the newer spelling of min/max_pixels.
    let v = serde_json::json!({"image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": 3136, "longest_edge": 12845056}});
    let p = ImageProcessor::from_json(&v).unwrap();
    assert_eq!(
        p.resize,
        Resize::Smart {
            factor: 28,
            min_pixels: 3136,
            max_pixels: 12845056
        }
    );
    assert_eq!(p.normalize.unwrap().0[0], 0.48145466f32);
    let bad = serde_json::json!({"size": {"height": 8, "width": 8}, "resample": 1});
    let e = ImageProcessor::from_json(&bad).unwrap_err().to_string();
    assert!(e.contains("resample=1"), "{e}");
    let e = ImageProcessor::from_json(
        &serde_json::json!({"size": {"height": 8, "width": 8}, "image_mean": [1, 2]}),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("image_mean"), "{e}");
    let e = ImageProcessor::from_json(&serde_json::json!({"do_pan_and_scan": true})).unwrap_err();
    assert_eq!(e.http_status(), 500);
}

#[test]
fn smart_resize_cases() {
    // Values from transformers' smart_resize (factor 28, HF defaults).
    assert_eq!(
        smart_resize(480, 640, 28, 3136, 12845056).unwrap(),
        (476, 644)
    );
    assert_eq!(smart_resize(10, 10, 28, 3136, 12845056).unwrap(), (56, 56));
    assert_eq!(
        smart_resize(4000, 3000, 28, 3136, 1003520).unwrap(),
        (1148, 840)
    );
    // Round half to even, as Python: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
    assert_eq!(smart_resize(42, 70, 28, 0, 1 << 30).unwrap(), (56, 56));
    assert!(smart_resize(1, 300, 28, 3136, 12845056)
        .unwrap_err()
        .contains("aspect ratio"));
}

#[test]
fn media_hash_keys_pixels_not_container() {
    let png = std::fs::read(fixtures().join("rgb37x23.png")).unwrap();
    let img = decode_image("p", &png, &MediaOptions::default()).unwrap();
    // Same pixels re-encoded (image-rs PNG encoder: other bytes) hash the same.
    let mut reenc = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut reenc),
            image::ImageFormat::Png,
        )
        .unwrap();
    let again = decode_image("p", &reenc, &MediaOptions::default()).unwrap();
    assert_eq!(MediaHash::of_rgb(&img), MediaHash::of_rgb(&again));
    let mut other = img.clone();
    other.get_pixel_mut(0, 0).0[0] ^= 1;
    assert_ne!(MediaHash::of_rgb(&img), MediaHash::of_rgb(&other));
    // Same bytes, other shape: a different key.
    let flat = image::RgbImage::from_raw(23, 37, img.as_raw().clone()).unwrap();
    assert_ne!(MediaHash::of_rgb(&img), MediaHash::of_rgb(&flat));
    assert_eq!(MediaHash::of_rgb(&img).to_hex().len(), 64);
}
