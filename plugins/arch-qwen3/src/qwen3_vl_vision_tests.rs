//! Qwen3-VL's vision tower against mlx-vlm 0.7.10
//! (tests/goldens/qwen3_vl_vision_golden.py, fixture
//! tests/fixtures/goldens/qwen3_vl-vision-tiny): a tiny random tower (depth
//! 4, hidden 24, 2 heads, a 6 x 6 position table, deepstack mergers on
//! blocks 0 and 2) on three grids in one call: two non-square images,
//! (1, 8, 12) (table upsampled) and (1, 4, 6) (rows downsampled), and a
//! two-frame grid (2, 4, 4). Both the merged features and the deepstack
//! features are compared. The weights reach the tower through a
//! WeightSource held in memory (plain float linears and embedding, as the
//! dense WeightQuant plugin builds them; test_weights.rs, vision_golden.rs).
use super::*;
use crate::vision_golden::{assert_refuses_bad_input, ints, max_err, values, Golden, TOL};

fn golden() -> Golden {
    Golden::open("qwen3_vl-vision-tiny")
}

/// The golden's config and tower, with every fixture tensor used.
fn load(g: &Golden) -> (VisionConfig, Qwen3VlVision) {
    g.tower(|c, w| Qwen3VlVision::load(c, w, "vision_tower"))
}

#[test]
fn qwen3_vl_vision_matches_mlx_vlm_on_three_grids() {
    let g = golden();
    let (c, tower) = load(&g);
    let patches = Array::from_slice(&g.f32s("patches.f32"), &ints(&g.meta["patches_shape"]));
    let (main, deep) = tower.forward_patches(&patches, &g.grids()).unwrap();
    let shape = ints(&g.meta["features_shape"]);
    assert_eq!(main.shape(), shape);
    let e = max_err(&values(&main), &g.f32s("features.f32"));
    eprintln!("merged features: max abs error {e:.2e}");
    assert!(e < TOL, "merged features: max abs error {e:e}");
    let want = g.f32s("deepstack.f32");
    assert_eq!(deep.len(), c.deepstack_visual_indexes.len());
    let per = (shape[0] * shape[1]) as usize;
    for (j, d) in deep.iter().enumerate() {
        assert_eq!(d.shape(), shape);
        let e = max_err(&values(d), &want[j * per..(j + 1) * per]);
        eprintln!("deepstack {j}: max abs error {e:.2e}");
        assert!(e < TOL, "deepstack {j}: max abs error {e:e}");
    }
}

#[test]
fn qwen3_vl_vision_media_from_pixels() {
    // Each image's pixels [1, 3, H, W] patchified in the plugin give the
    // processor's patches and that image's rows of mlx-vlm's main and
    // deepstack features; forward_stacked lays them side by side.
    let gold = golden();
    let (c, tower) = load(&gold);
    let meta = &gold.meta;
    let (pixels, patches, want, want_deep) = (gold.f32s("pixels.f32"), gold.f32s("patches.f32"), gold.f32s("features.f32"), gold.f32s("deepstack.f32"));
    let (k, o) = (ints(&meta["patches_shape"])[1] as usize, c.tower.out_hidden_size as usize);
    let u_all = ints(&meta["features_shape"])[0] as usize;
    let (mut px, mut pp, mut fr) = (0, 0, 0);
    for (s, g) in meta["pixel_shapes"].as_array().unwrap().iter().map(ints).zip(gold.grids()) {
        let n: usize = s.iter().map(|&x| x as usize).product();
        let img = Array::from_slice(&pixels[px..px + n], &[1, s[0], s[1], s[2]]);
        let (p, gs) = c.tower.patchify(&img).unwrap();
        assert_eq!(gs, vec![g]);
        let np = (g.h * g.w) as usize;
        assert_eq!(values(&p), patches[pp * k..(pp + np) * k], "patch layout of {g:?}");
        let (main, deep) = tower.forward(&img).unwrap();
        let t = np / 4;
        assert_eq!(main.shape(), [1, t as i32, o as i32]);
        let e = max_err(&values(&main), &want[fr * o..(fr + t) * o]);
        assert!(e < TOL, "{g:?}: max abs error {e:e}");
        for (j, d) in deep.iter().enumerate() {
            let at = (j * u_all + fr) * o;
            let e = max_err(&values(d), &want_deep[at..at + t * o]);
            assert!(e < TOL, "{g:?} deepstack {j}: max abs error {e:e}");
        }
        let stacked = tower.forward_stacked(&img).unwrap();
        assert_eq!(stacked.shape(), [1, t as i32, 3 * o as i32]);
        let parts = stacked.split_equal(3, -1).unwrap();
        assert_eq!(values(&parts[0]), values(&main));
        assert_eq!(values(&parts[2]), values(&deep[1]));
        (px, pp, fr) = (px + n, pp + np, fr + t);
    }
    assert_eq!(pp, 8 * 12 + 4 * 6, "both images checked");
}

#[test]
fn qwen3_vl_vision_bilinear_is_the_table_at_its_own_size() {
    // At the table's own size every sample lands on a row: weight 1 on the
    // first corner; at 1 x 1 the single sample is the table's corner 0.
    let (idx, wts, order) = bilinear(&[Grid { t: 1, h: 6, w: 6 }], 6, 2);
    assert_eq!(&idx[..36], &(0..36).collect::<Vec<_>>()[..]);
    assert!(wts[..36].iter().all(|&w| w == 1.0) && wts[36..].iter().all(|&w| w == 0.0));
    assert_eq!(&order[..8], &[0, 1, 6, 7, 2, 3, 8, 9], "(h/m, w/m, m, m) order");
    let (idx, wts, order) = bilinear(&[Grid { t: 3, h: 1, w: 1 }], 4, 1);
    assert_eq!((idx, wts, order), (vec![0, 1, 4, 5], vec![1.0, 0.0, 0.0, 0.0], vec![0, 0, 0]));
}

#[test]
fn qwen3_vl_vision_refuses_bad_input() {
    let (_, tower) = load(&golden());
    assert_refuses_bad_input(|x| tower.forward(x).err().map(|e| e.to_string()), |p, g| tower.forward_patches(p, g).err().map(|e| e.to_string()));
}

#[test]
fn qwen3_vl_vision_config_checks() {
    let c = |j: &str| serde_json::from_str::<VisionConfig>(j).unwrap().check().err().map(|e| e.to_string());
    assert!(c("{}").is_none(), "mlx-vlm's defaults pass");
    assert!(c(r#"{"model_type": "qwen3_vl", "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": [8, 16, 24]}"#).is_none());
    assert!(c(r#"{"model_type": "qwen2_5_vl"}"#).unwrap().contains("not a Qwen3-VL"));
    assert!(c(r#"{"num_position_embeddings": 2300}"#).unwrap().contains("not a square"));
    assert!(c(r#"{"depth": 4, "deepstack_visual_indexes": [1, 4]}"#).unwrap().contains("holds 4, outside the 4 blocks"));
    assert!(c(r#"{"deepstack_visual_indexes": [1, 1]}"#).unwrap().contains("holds 1 twice"));
    assert!(c(r#"{"hidden_size": 96}"#).unwrap().contains("multiple of 4"));
    assert!(c(r#"{"hidden_act": "silu"}"#).unwrap().contains("tanh GELU"));
}
