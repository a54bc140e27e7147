//! model_type `gemma3` (plugins/arch-gemma/src/{gemma3,siglip}.rs): the tiny
//! random Gemma 3 with images that scripts/dev/gemma3_vision_golden.py built
//! with mlx-vlm's own classes (tests/fixtures/models/gemma3-vision-tiny),
//! against what mlx-vlm computed in float32
//! (tests/fixtures/goldens/gemma3-vision-tiny):
//! - the host's preprocessing of the two PNGs (the fixture's
//!   preprocessor_config.json) gives transformers' pixels;
//! - the media forward (`Output::Media`) on them gives mlx-vlm's merged image
//!   features [2, 4, 64];
//! - a prompt with both images (features merged at the placeholder
//!   positions through `input_embeddings`) prefilled past the sliding window,
//!   then three cached steps, gives mlx-vlm's logits; zero features instead
//!   do not (so the merge is what moves them);
//! - a text-only prompt (no input embeddings) gives mlx-vlm's text logits;
//! - wrong pixel shapes and a missing pixel array are clear errors;
//! - the same weights with the PyTorch conv layout and a stored head give
//!   the same features and logits.
mod common;

use common::golden::{rel_err, REL_TOL};
use common::vision::{check_rows, media, media_without_pixels, merge_inputs, run_prompt, values, VisionGolden};
use mlx_rs::Array;
use rmlx::engine::LoadedModel;
use rmlx::media::{decode_image, ImageProcessor, MediaOptions};

const MODEL: &str = "models/gemma3-vision-tiny";
const GOLD: &str = "goldens/gemma3-vision-tiny";

fn golden() -> VisionGolden {
    VisionGolden::open(MODEL, GOLD)
}

/// The host's image preprocessing of the golden's PNGs, [N, 3, 32, 32].
fn host_pixels(g: &VisionGolden) -> Array {
    let proc = ImageProcessor::from_model_dir(&g.model).unwrap();
    let mut data = Vec::new();
    for (i, path) in g.meta["images"].as_array().unwrap().iter().enumerate() {
        let bytes = std::fs::read(common::repo().join(path.as_str().unwrap())).unwrap();
        let img = decode_image(&format!("image {i}"), &bytes, &MediaOptions::default()).unwrap();
        let px = proc.preprocess(&format!("image {i}"), &img).unwrap();
        assert_eq!(px.shape, [3, 32, 32]);
        data.extend(px.data);
    }
    Array::from_slice(&data, &g.shape("pixels_shape"))
}

#[test]
fn gemma3_vision_matches_mlx_vlm() {
    let _l = common::mlx_lock();
    let g = golden();
    let mut m = g.load();

    // The host's preprocessing gives transformers' pixels (PNG: exact up to rounding).
    let pixels = host_pixels(&g);
    let want_px = g.f32s("pixels.f32");
    let px_err = values(&pixels).iter().zip(&want_px).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
    assert!(px_err < 1e-5, "pixels differ from transformers' by {px_err}");

    // The media encoder; the prompt with both images, the features merged
    // at the placeholders, past the 8-token window, then three cached steps;
    // zero features instead.
    let feats = g.check_features(&mut m, pixels);
    let d = *g.shape("features_shape").last().unwrap() as usize;
    g.check_image_prompt(&mut m, &feats, d, g.int("image_token_index") as u32);
}

#[test]
fn gemma3_without_images_runs_text_only() {
    let _l = common::mlx_lock();
    let g = golden();
    let mut m = g.load();
    g.check_text_prompt(&mut m);
}

#[test]
fn gemma3_media_forward_refuses_bad_pixels() {
    let _l = common::mlx_lock();
    let mut m = golden().load();
    let msg = |r: anyhow::Result<Array>| format!("{:#}", r.expect_err("a wrong pixel array was accepted"));
    let z = |s: &[i32]| mlx_rs::ops::zeros::<f32>(s).unwrap();
    for bad in [&[1, 3, 16, 16][..], &[1, 3, 32, 31], &[2, 1, 32, 32], &[3, 32, 32]] {
        let e = msg(media(&mut m, z(bad)));
        assert!(e.contains("pixel values must be [N, 3, 32, 32]") && e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
    }
    // No pixels lent at all.
    let e = media_without_pixels(&mut m);
    assert!(e.contains("no pixel values"), "{e}");
    // The model still works after the refusals.
    let feats = media(&mut m, z(&[1, 3, 32, 32])).unwrap();
    assert_eq!(feats.shape(), [1, 4, 64]);
    // A text-only Gemma 3 has no media encoder.
    let mut t = LoadedModel::load(&common::fixture("models/gemma3_text-f32"), &common::registry()).unwrap();
    let e = msg(media(&mut t, z(&[1, 3, 32, 32])));
    assert!(e.contains("has no media encoder"), "{e}");
}

/// The fixture as Hugging Face's original checkpoints store it: the patch
/// conv in PyTorch's layout [Dv, C, p, p] (transposed at load, as mlx-vlm's
/// `sanitize` does) and `language_model.lm_head.weight` present (mlx-vlm's
/// converted checkpoints carry the tied copy): the same features and logits.
#[test]
fn gemma3_loads_the_pytorch_conv_layout_and_a_stored_head() {
    let _l = common::mlx_lock();
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let src = g.model.clone();
    let tensors = Array::load_safetensors(src.join("model.safetensors")).unwrap();
    let mut out: Vec<(String, Array)> = Vec::new();
    for (k, v) in &tensors {
        if k.ends_with("patch_embedding.weight") {
            out.push((k.clone(), v.transpose_axes(&[0, 3, 1, 2]).unwrap())); // [Dv, p, p, C] -> [Dv, C, p, p]
        } else {
            out.push((k.clone(), v.clone()));
        }
        if k == "language_model.model.embed_tokens.weight" {
            out.push(("language_model.lm_head.weight".into(), v.clone()));
        }
    }
    Array::save_safetensors(out, None, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut m = LoadedModel::load(dir.path(), &common::registry()).unwrap();
    assert!(m.unused.is_empty(), "unused tensors {:?}", m.unused);

    let pixels = Array::from_slice(&g.f32s("pixels.f32"), &g.shape("pixels_shape"));
    let got = values(&media(&mut m, pixels).unwrap());
    let e = rel_err(&got, &g.f32s("features.f32"));
    assert!(e < REL_TOL, "media features relative error {e:e}");
    let prompt = g.ids("prompt_image");
    let image = g.int("image_token_index") as u32;
    let rows = run_prompt(&mut m, &prompt, Some(merge_inputs(&prompt, image, &got, 64)), &g.ids("continue_image"));
    let (fails, _) = check_rows("stored head", &rows, &g.f32s("logits_image.f32"), g.int("vocab") as usize);
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}
