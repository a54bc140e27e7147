//! Test support (cfg(test)) for the vision-tower goldens of
//! qwen2_5_vl_vision_tests.rs and qwen3_vl_vision_tests.rs: a golden
//! directory of tests/fixtures/goldens (golden.json with the tower's
//! `vision_config`, its `weights` as offsets into weights.f32, the `grids`,
//! and little-endian f32 arrays), the tower loaded through test_weights.rs's
//! in-memory WeightSource with every tensor used, and the checks both make.
use crate::test_weights::Mem;
use crate::vision_tower::Grid;
use abi_stable::sabi_trait::TD_Opaque;
use mlx_rs::{ops, Array};
use rmlx_plugin_api::{
    arch::WeightSource_TO,
    author::{Result, Weights},
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

/// What the towers' outputs may differ from mlx-vlm's by (f32).
pub const TOL: f32 = 1e-4;

/// One golden directory and its golden.json.
pub struct Golden {
    dir: PathBuf,
    pub meta: Value,
}

impl Golden {
    /// tests/fixtures/goldens/`name`.
    pub fn open(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/goldens").join(name);
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        Golden { dir, meta }
    }

    /// The little-endian f32 file `name`.
    pub fn f32s(&self, name: &str) -> Vec<f32> {
        let b = std::fs::read(self.dir.join(name)).unwrap();
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// The golden's `vision_config` and the tower `load` builds from its
    /// weights (under `vision_tower`); panics unless every tensor was used.
    pub fn tower<C: serde::de::DeserializeOwned, T>(&self, load: impl FnOnce(&C, &mut Weights) -> Result<T>) -> (C, T) {
        let blob = self.f32s("weights.f32");
        let mut map = HashMap::new();
        for (name, e) in self.meta["weights"].as_object().unwrap() {
            let shape = ints(&e["shape"]);
            let off = e["offset"].as_u64().unwrap() as usize;
            let len: i32 = shape.iter().product();
            map.insert(name.clone(), Array::from_slice(&blob[off..off + len as usize], &shape));
        }
        let c: C = serde_json::from_value(self.meta["vision_config"].clone()).unwrap();
        let mut mem = Mem(map);
        let tower = {
            let mut src = WeightSource_TO::from_ptr(&mut mem, TD_Opaque);
            let mut w = Weights::new(&mut src);
            load(&c, &mut w).unwrap()
        };
        assert!(mem.0.is_empty(), "unused tensors {:?}", mem.0.keys());
        (c, tower)
    }

    /// The golden's `grids`, (t, h, w) each.
    pub fn grids(&self) -> Vec<Grid> {
        self.meta["grids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let g = ints(g);
                Grid { t: g[0], h: g[1], w: g[2] }
            })
            .collect()
    }
}

pub fn ints(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

pub fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(mlx_rs::Dtype::Float32).unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

pub fn max_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// A tower with 3 channels, patch 2 and merge 2 (K = 24) refuses, naming
/// what it wants: pixels not [N, 3, H, W] with H and W multiples of 4
/// (`pixels`: the tower's forward on them, its error if any), and patches
/// that do not fit their grids (`patches`).
pub fn assert_refuses_bad_input(pixels: impl Fn(&Array) -> Option<String>, patches: impl Fn(&Array, &[Grid]) -> Option<String>) {
    let z = |s: &[i32]| ops::zeros::<f32>(s).unwrap();
    for bad in [&[1, 3, 12, 18][..], &[1, 1, 12, 20], &[3, 12, 20]] {
        let e = pixels(&z(bad)).expect("bad pixels accepted");
        assert!(e.contains("pixel values must be [N, 3, H, W]") && e.contains("multiples of 4"), "{bad:?}: {e}");
    }
    let e = patches(&z(&[10, 24]), &[Grid { t: 1, h: 4, w: 4 }]).unwrap();
    assert!(e.contains("patches must be [16, 24]"), "{e}");
    let e = patches(&z(&[6, 24]), &[Grid { t: 1, h: 2, w: 3 }]).unwrap();
    assert!(e.contains("multiple of 2"), "{e}");
}
