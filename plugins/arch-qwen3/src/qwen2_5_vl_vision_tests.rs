//! Qwen2.5-VL's vision tower against mlx-vlm 0.7.10
//! (tests/goldens/qwen2_5_vl_vision_golden.py, fixture
//! tests/fixtures/goldens/qwen2_5_vl-vision-tiny): a tiny random tower
//! (depth 4, hidden 32, 2 heads, window 2 x 2 merge units, full attention on
//! blocks 1 and 3) on two images of different grids in one call, (1, 8, 12)
//! whose windows tile evenly and (1, 6, 10) whose edge windows are partial.
//! The weights reach the tower through a WeightSource held in memory (plain
//! float linears, as the dense WeightQuant plugin builds them;
//! test_weights.rs, vision_golden.rs).
use super::*;
use crate::vision_golden::{assert_refuses_bad_input, ints, max_err, values, Golden, TOL};

fn golden() -> Golden {
    Golden::open("qwen2_5_vl-vision-tiny")
}

/// The golden's config and tower, with every fixture tensor used.
fn load(g: &Golden) -> (VisionConfig, Qwen25Vision) {
    g.tower(|c, w| Qwen25Vision::load(c, w, "vision_tower"))
}

#[test]
fn qwen2_5_vl_vision_matches_mlx_vlm_on_two_grids() {
    let g = golden();
    let (_, tower) = load(&g);
    let patches = Array::from_slice(&g.f32s("patches.f32"), &ints(&g.meta["patches_shape"]));
    let out = tower.forward_patches(&patches, &g.grids()).unwrap();
    assert_eq!(out.shape(), ints(&g.meta["features_shape"]));
    let e = max_err(&values(&out), &g.f32s("features.f32"));
    eprintln!("merged features: max abs error {e:.2e}");
    assert!(e < TOL, "max abs error {e:e}");
}

#[test]
fn qwen2_5_vl_vision_media_shape_from_pixels() {
    // Each image's pixels [1, 3, H, W] patchified in the plugin give the
    // processor's patches and that image's rows of mlx-vlm's features.
    let gold = golden();
    let (c, tower) = load(&gold);
    let meta = &gold.meta;
    let (pixels, patches, want) = (gold.f32s("pixels.f32"), gold.f32s("patches.f32"), gold.f32s("features.f32"));
    let (k, o) = (ints(&meta["patches_shape"])[1] as usize, c.tower.out_hidden_size as usize);
    let (mut px, mut pp, mut fr) = (0, 0, 0);
    for (s, g) in meta["pixel_shapes"].as_array().unwrap().iter().map(ints).zip(gold.grids()) {
        let n: usize = s.iter().map(|&x| x as usize).product();
        let img = Array::from_slice(&pixels[px..px + n], &[1, s[0], s[1], s[2]]);
        let (p, gs) = c.tower.patchify(&img).unwrap();
        assert_eq!(gs, vec![Grid { t: 1, ..g }]);
        let np = g.patches() as usize;
        assert_eq!(values(&p), patches[pp * k..(pp + np) * k], "patch layout of {g:?}");
        let out = tower.forward(&img).unwrap();
        let t = np / 4;
        assert_eq!(out.shape(), [1, t as i32, o as i32]);
        let e = max_err(&values(&out), &want[fr * o..(fr + t) * o]);
        assert!(e < TOL, "{g:?}: max abs error {e:e}");
        (px, pp, fr) = (px + n, pp + np, fr + t);
    }
}

#[test]
fn qwen2_5_vl_vision_refuses_bad_input() {
    let (_, tower) = load(&golden());
    assert_refuses_bad_input(|x| tower.forward(x).err().map(|e| e.to_string()), |p, g| tower.forward_patches(p, g).err().map(|e| e.to_string()));
}

#[test]
fn qwen2_5_vl_vision_config_checks() {
    let c = |j: &str| serde_json::from_str::<VisionConfig>(j).unwrap().check().err().map(|e| e.to_string());
    assert!(c("{}").is_none(), "the defaults (Qwen2.5-VL-7B's tower) pass");
    assert!(c(r#"{"model_type": "qwen2_vl"}"#).unwrap().contains("not a Qwen2.5-VL"));
    assert!(c(r#"{"window_size": 14}"#).unwrap().contains("smaller than one merge unit"));
    assert!(c(r#"{"depth": 4}"#).unwrap().contains("fullatt_block_indexes holds 7"));
    assert!(c(r#"{"hidden_size": 96}"#).unwrap().contains("multiple of 4"));
}
