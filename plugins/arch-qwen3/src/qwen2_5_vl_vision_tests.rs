//! Qwen2.5-VL's vision tower against mlx-vlm 0.7.10
//! (tests/goldens/qwen2_5_vl_vision_golden.py, fixture
//! tests/fixtures/goldens/qwen2_5_vl-vision-tiny): a tiny random tower
//! (depth 4, hidden 32, 2 heads, window 2 x 2 merge units, full attention on
//! blocks 1 and 3) on two images of different grids in one call, (1, 8, 12)
//! whose windows tile evenly and (1, 6, 10) whose edge windows are partial.
//! The weights reach the tower through a WeightSource held in memory (plain
//! float linears, as the dense WeightQuant plugin builds them).
use super::*;
use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RStr, RString, RVec, Tuple2},
};
use rmlx_plugin_api::{
    arch::{WeightSource, WeightSource_TO},
    author::{guard, linear_box, LinearImpl},
    EmbeddingBox, LinearBox, MlxArray, PResult, SwitchLinearBox,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/goldens/qwen2_5_vl-vision-tiny")
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
    let a = a.as_dtype(mlx_rs::Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// x @ W^T + b, W [out, in].
struct Dense {
    w_t: Array,
    b: Option<Array>,
    dims: (u32, u32),
}

impl LinearImpl for Dense {
    fn forward(&self, x: &Array) -> Result<Array> {
        let y = x.matmul(&self.w_t)?;
        Ok(match &self.b {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
    fn dims(&self) -> (u32, u32) {
        self.dims
    }
}

/// The fixture's tensors, handed out once each.
struct Mem(HashMap<String, Array>);

impl Mem {
    fn take(&mut self, name: &str) -> Result<Array> {
        self.0.remove(name).ok_or_else(|| PluginError::config(format!("no tensor {name}")))
    }
}

impl WeightSource for Mem {
    fn linear(&mut self, prefix: RStr<'_>) -> PResult<LinearBox> {
        guard(|| {
            let w = self.take(&format!("{prefix}.weight"))?;
            let b = self.take(&format!("{prefix}.bias")).ok();
            let dims = (w.dim(1) as u32, w.dim(0) as u32);
            Ok(linear_box(Box::new(Dense { w_t: w.transpose()?, b, dims })))
        })
    }
    fn embedding(&mut self, _: RStr<'_>) -> PResult<EmbeddingBox> {
        guard(|| Err(PluginError::unsupported("no embeddings here")))
    }
    fn tensor(&mut self, name: RStr<'_>) -> PResult<MlxArray> {
        guard(|| self.take(name.as_str()).map(MlxArray::from_array))
    }
    fn contains(&self, name: RStr<'_>) -> bool {
        self.0.contains_key(name.as_str())
    }
    fn switch_linear(&mut self, _: RStr<'_>) -> PResult<SwitchLinearBox> {
        guard(|| Err(PluginError::unsupported("no experts here")))
    }
    fn linear_fused(&mut self, _: RVec<RString>) -> PResult<Tuple2<LinearBox, RVec<u32>>> {
        guard(|| Err(PluginError::unsupported("not fused")))
    }
}

/// The golden's config and tower, with every fixture tensor used.
fn load() -> (VisionConfig, Qwen25Vision) {
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
        Qwen25Vision::load(&c, &mut w, "vision_tower").unwrap()
    };
    assert!(mem.0.is_empty(), "unused tensors {:?}", mem.0.keys());
    (c, tower)
}

fn grids() -> Vec<Grid> {
    meta()["grids"].as_array().unwrap().iter().map(|g| {
        let g = ints(g);
        Grid { t: g[0], h: g[1], w: g[2] }
    }).collect()
}

fn max_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn qwen2_5_vl_vision_matches_mlx_vlm_on_two_grids() {
    let (_, tower) = load();
    let meta = meta();
    let patches = Array::from_slice(&f32s("patches.f32"), &ints(&meta["patches_shape"]));
    let out = tower.forward_patches(&patches, &grids()).unwrap();
    assert_eq!(out.shape(), ints(&meta["features_shape"]));
    let e = max_err(&values(&out), &f32s("features.f32"));
    eprintln!("merged features: max abs error {e:.2e}");
    assert!(e < TOL, "max abs error {e:e}");
}

#[test]
fn qwen2_5_vl_vision_media_shape_from_pixels() {
    // Each image's pixels [1, 3, H, W] patchified in the plugin give the
    // processor's patches and that image's rows of mlx-vlm's features.
    let (c, tower) = load();
    let meta = meta();
    let (pixels, patches, want) = (f32s("pixels.f32"), f32s("patches.f32"), f32s("features.f32"));
    let (k, o) = (ints(&meta["patches_shape"])[1] as usize, c.out_hidden_size as usize);
    let (mut px, mut pp, mut fr) = (0, 0, 0);
    for (s, g) in meta["pixel_shapes"].as_array().unwrap().iter().map(ints).zip(grids()) {
        let n: usize = s.iter().map(|&x| x as usize).product();
        let img = Array::from_slice(&pixels[px..px + n], &[1, s[0], s[1], s[2]]);
        let (p, gs) = patchify(&c, &img).unwrap();
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
fn qwen2_5_vl_vision_config_checks() {
    let c = |j: &str| serde_json::from_str::<VisionConfig>(j).unwrap().check().err().map(|e| e.to_string());
    assert!(c("{}").is_none(), "the defaults (Qwen2.5-VL-7B's tower) pass");
    assert!(c(r#"{"model_type": "qwen2_vl"}"#).unwrap().contains("not a Qwen2.5-VL"));
    assert!(c(r#"{"window_size": 14}"#).unwrap().contains("smaller than one merge unit"));
    assert!(c(r#"{"depth": 4}"#).unwrap().contains("fullatt_block_indexes holds 7"));
    assert!(c(r#"{"hidden_size": 96}"#).unwrap().contains("multiple of 4"));
}
