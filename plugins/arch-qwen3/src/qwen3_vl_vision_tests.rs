//! Qwen3-VL's vision tower against mlx-vlm 0.7.10
//! (tests/goldens/qwen3_vl_vision_golden.py, fixture
//! tests/fixtures/goldens/qwen3_vl-vision-tiny): a tiny random tower (depth
//! 4, hidden 24, 2 heads, a 6 x 6 position table, deepstack mergers on
//! blocks 0 and 2) on three grids in one call: two non-square images,
//! (1, 8, 12) (table upsampled) and (1, 4, 6) (rows downsampled), and a
//! two-frame grid (2, 4, 4). Both the merged features and the deepstack
//! features are compared. The weights reach the tower through a
//! WeightSource held in memory (plain float linears and embedding, as the
//! dense WeightQuant plugin builds them; test_weights.rs).
use super::*;
use crate::test_weights::Mem;
use abi_stable::sabi_trait::TD_Opaque;
use rmlx_plugin_api::arch::WeightSource_TO;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/goldens/qwen3_vl-vision-tiny")
}

fn f32s(name: &str) -> Vec<f32> {
    let b = std::fs::read(dir().join(name)).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(mlx_rs::Dtype::Float32).unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// The golden's config and tower, with every fixture tensor used.
fn load() -> (VisionConfig, Qwen3VlVision) {
    let meta = meta();
    let blob = f32s("weights.f32");
    let mut map = HashMap::new();
    for (name, e) in meta["weights"].as_object().unwrap() {
        let shape = ints(&e["shape"]);
        let off = e["offset"].as_u64().unwrap() as usize;
        let len: i32 = shape.iter().product();
        map.insert(name.clone(), Array::from_slice(&blob[off..off + len as usize], &shape));
    }
    let c: VisionConfig = serde_json::from_value(meta["vision_config"].clone()).unwrap();
    let mut mem = Mem(map);
    let tower = {
        let mut src = WeightSource_TO::from_ptr(&mut mem, TD_Opaque);
        let mut w = Weights::new(&mut src);
        Qwen3VlVision::load(&c, &mut w, "vision_tower").unwrap()
    };
    assert!(mem.0.is_empty(), "unused tensors {:?}", mem.0.keys());
    (c, tower)
}

fn grids() -> Vec<Grid> {
    meta()["grids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let g = ints(g);
            Grid { t: g[0], h: g[1], w: g[2] }
        })
        .collect()
}

fn max_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn qwen3_vl_vision_matches_mlx_vlm_on_three_grids() {
    let (c, tower) = load();
    let meta = meta();
    let patches = Array::from_slice(&f32s("patches.f32"), &ints(&meta["patches_shape"]));
    let (main, deep) = tower.forward_patches(&patches, &grids()).unwrap();
    let shape = ints(&meta["features_shape"]);
    assert_eq!(main.shape(), shape);
    let e = max_err(&values(&main), &f32s("features.f32"));
    eprintln!("merged features: max abs error {e:.2e}");
    assert!(e < TOL, "merged features: max abs error {e:e}");
    let want = f32s("deepstack.f32");
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
    let (c, tower) = load();
    let meta = meta();
    let (pixels, patches, want, want_deep) = (f32s("pixels.f32"), f32s("patches.f32"), f32s("features.f32"), f32s("deepstack.f32"));
    let (k, o) = (ints(&meta["patches_shape"])[1] as usize, c.out_hidden_size as usize);
    let u_all = ints(&meta["features_shape"])[0] as usize;
    let (mut px, mut pp, mut fr) = (0, 0, 0);
    for (s, g) in meta["pixel_shapes"].as_array().unwrap().iter().map(ints).zip(grids()) {
        let n: usize = s.iter().map(|&x| x as usize).product();
        let img = Array::from_slice(&pixels[px..px + n], &[1, s[0], s[1], s[2]]);
        let (p, gs) = patchify(&c, &img).unwrap();
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
    let (_, tower) = load();
    let z = |s: &[i32]| ops::zeros::<f32>(s).unwrap();
    for bad in [&[1, 3, 12, 18][..], &[1, 1, 12, 20], &[3, 12, 20]] {
        let e = tower.forward(&z(bad)).err().expect("bad pixels accepted").to_string();
        assert!(e.contains("pixel values must be [N, 3, H, W]") && e.contains("multiples of 4"), "{bad:?}: {e}");
    }
    let e = tower.forward_patches(&z(&[10, 24]), &[Grid { t: 1, h: 4, w: 4 }]).err().unwrap().to_string();
    assert!(e.contains("patches must be [16, 24]"), "{e}");
    let e = tower.forward_patches(&z(&[6, 24]), &[Grid { t: 1, h: 2, w: 3 }]).err().unwrap().to_string();
    assert!(e.contains("multiple of 2"), "{e}");
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
