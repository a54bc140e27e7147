//! A third party can add a weight format: builds the out-of-tree-style crate
//! examples/wquant-example (its own workspace, only the plugin API), loads it
//! beside the shipped plugins, and runs a tiny llama stored in its format
//! (per-row int8) against the same weights stored dense.
mod common;

use rmlx::engine::{LoadedModel, Session};
use rmlx::plugins::Registry;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;
use std::process::Command;

/// Writes the llama-f32 fixture twice: int8 per row (`example-int8`) and the
/// same dequantized weights as dense float32.
fn make_models(q_dir: &Path, d_dir: &Path) {
    let src = common::fixture("models/llama-f32");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut q: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut d: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in st.names() {
        let t = st.tensor(name).unwrap();
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let shape = t.shape().to_vec();
        let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        if shape.len() == 2 && name.ends_with(".weight") {
            let (rows, cols) = (shape[0], shape[1]);
            let (mut qs, mut scales, mut deq) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..rows {
                let row = &v[r * cols..(r + 1) * cols];
                let s = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                scales.push(s);
                for x in row {
                    let qi = (x / s).round().clamp(-127.0, 127.0) as i8;
                    qs.push(qi as u8);
                    deq.push(qi as f32 * s);
                }
            }
            let module = name.strip_suffix(".weight").unwrap();
            q.push((name.to_string(), Dtype::I8, shape.clone(), qs));
            q.push((format!("{module}.scales"), Dtype::F32, vec![rows, 1], f32b(&scales)));
            d.push((name.to_string(), Dtype::F32, shape, f32b(&deq)));
        } else {
            q.push((name.to_string(), Dtype::F32, shape.clone(), f32b(&v)));
            d.push((name.to_string(), Dtype::F32, shape, f32b(&v)));
        }
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (dir, tensors, quant) in [(q_dir, &q, true), (d_dir, &d, false)] {
        std::fs::create_dir_all(dir).unwrap();
        let views: Vec<(String, TensorView)> =
            tensors.iter().map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        let mut c = cfg.clone();
        if quant {
            c["quantization"] = serde_json::json!({"mode": "example-int8", "bits": 8, "group_size": 0});
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    }
}

#[test]
fn out_of_tree_example_plugin_builds_loads_and_runs() {
    let repo = common::repo();
    let target = common::target_dir().parent().unwrap().join("wquant-example");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(repo.join("examples/wquant-example/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(out.status.success(), "building the example plugin failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let lib = target.join(format!("debug/librmlx_wquant_example.{}", rmlx::plugins::loader::LIB_EXT));
    assert!(lib.is_file(), "{} not built", lib.display());

    // The shipped plugins plus the example, in one plugin directory.
    let tmp = tempfile::tempdir().unwrap();
    let plugins = tmp.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for e in std::fs::read_dir(common::plugins_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, plugins.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(&lib, plugins.join(lib.file_name().unwrap())).unwrap();

    let _g = common::mlx_lock();
    let reg = Registry::load(&plugins).unwrap();
    assert!(reg.refused.is_empty(), "refused: {:?}", reg.refused.iter().map(|r| &r.reason).collect::<Vec<_>>());
    let (qd, dd) = (tmp.path().join("int8"), tmp.path().join("dense"));
    make_models(&qd, &dd);
    let mut q = LoadedModel::load(&qd, &reg).unwrap_or_else(|e| panic!("{e:#}"));
    let mut d = LoadedModel::load(&dd, &reg).unwrap();
    assert!(q.unused.is_empty(), "{:?}", q.unused);
    let prompt = [1u32, 17, 99, 128, 3];
    let a = Session::new(&mut q).prefill(&prompt).unwrap();
    let b = Session::new(&mut d).prefill(&prompt).unwrap();
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err < 1e-5, "example-int8 logits differ from the dense ones by {err:e}");
}
