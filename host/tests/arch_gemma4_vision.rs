//! model_type `gemma4` (plugins/arch-gemma/src/{gemma4,gemma4_vision}.rs):
//! the tiny random Gemma 4 with images that
//! scripts/dev/gemma4_vision_golden.py built with mlx-vlm's own classes
//! (tests/fixtures/models/gemma4-vision-tiny: clipped linears, standardize,
//! GQA in the tower; per-layer inputs, K/V-shared layers and a proportional
//! RoPE in the language model), against what mlx-vlm computed in float32
//! (tests/fixtures/goldens/gemma4-vision-tiny):
//! - the media forward (`Output::Media`) on the golden's pixels [2, 3, 16, 24]
//!   gives mlx-vlm's `embed_vision(vision_tower(pixels))` [2, 6, 64];
//! - a prompt with both images (features merged at the placeholder
//!   positions through `input_embeddings`) prefilled past the sliding window,
//!   then three cached steps, gives mlx-vlm's logits; zero features instead
//!   do not (so the merge is what moves them);
//! - a text-only prompt (no input embeddings) gives mlx-vlm's text logits;
//! - wrong pixel shapes and a missing pixel array are clear errors; other
//!   image sizes (multiples of 8 pixels) give their own number of tokens.
mod common;

use common::vision::{media, media_without_pixels, values, VisionGolden};
use mlx_rs::Array;

const MODEL: &str = "models/gemma4-vision-tiny";
const GOLD: &str = "goldens/gemma4-vision-tiny";

fn golden() -> VisionGolden {
    VisionGolden::open(MODEL, GOLD)
}

#[test]
fn gemma4_vision_matches_mlx_vlm() {
    let _l = common::mlx_lock();
    let g = golden();
    let mut m = g.load();

    // The media encoder on the golden's pixels; the prompt with both images,
    // the features merged at the placeholders, past the 8-token window, then
    // three cached steps; zero features instead.
    let pixels = Array::from_slice(&g.f32s("pixels.f32"), &g.shape("pixels_shape"));
    let feats = g.check_features(&mut m, pixels);
    let d = *g.shape("features_shape").last().unwrap() as usize;
    g.check_image_prompt(&mut m, &feats, d, g.int("image_token_id") as u32);
}

#[test]
fn gemma4_without_images_runs_text_only() {
    let _l = common::mlx_lock();
    let g = golden();
    let mut m = g.load();
    g.check_text_prompt(&mut m);
}

#[test]
fn gemma4_media_forward_refuses_bad_pixels() {
    let _l = common::mlx_lock();
    let mut m = golden().load();
    let msg = |r: anyhow::Result<Array>| format!("{:#}", r.expect_err("a wrong pixel array was accepted"));
    let z = |s: &[i32]| mlx_rs::ops::zeros::<f32>(s).unwrap();
    // H or W not a multiple of patch 4 x pooling 2, one channel, no batch
    // axis, wider than the 16-entry position table allows (64 pixels).
    for bad in [&[1, 3, 16, 20][..], &[1, 3, 12, 24], &[2, 1, 16, 24], &[3, 16, 24], &[1, 3, 16, 72]] {
        let e = msg(media(&mut m, z(bad)));
        assert!(e.contains("pixel values must be [N, 3, H, W]") && e.contains("multiples of 8") && e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
    }
    // No pixels lent at all.
    let e = media_without_pixels(&mut m);
    assert!(e.contains("no pixel values"), "{e}");
    // The model still works after the refusals; each size gives its own
    // (H/8) * (W/8) tokens.
    for (s, t) in [([1, 3, 16, 24], 6), ([2, 3, 8, 8], 1), ([1, 3, 64, 32], 32)] {
        let feats = media(&mut m, z(&s)).unwrap();
        assert_eq!(feats.shape(), [s[0], t, 64], "{s:?}");
        assert!(values(&feats).iter().all(|x| x.is_finite()), "{s:?}");
    }
}
