//! The load policy (`--dtype`, `--dequantize`): affine layers dequantized at
//! load compute what the quantized layers compute (dense weights, same
//! logits up to float rounding, same greedy tokens); a float16 compute dtype
//! casts every floating tensor; the KV budget counts the activations' real
//! dtype; bad values are clear CLI errors.
mod common;

use rmlx::engine::{LoadedModel, Session};
use rmlx::model::policy::{ComputeDtype, LoadPolicy};

fn logits(model: &mut LoadedModel, prompt: &[u32]) -> Vec<f32> {
    Session::new(model).prefill(prompt).unwrap()
}

#[test]
fn dequantized_affine_model_matches_quantized() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    for name in ["llama-q4-g64", "qwen3-q8-g64", "llama-tied-mixed"] {
        let dir = common::fixture(&format!("models/{name}"));
        let mut q = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
        let dense = LoadPolicy { dtype: ComputeDtype::Model, dequantize: true };
        let mut d = LoadedModel::load_with(&dir, &reg, dense).unwrap();
        assert!(q.layers.values().any(|l| l.mode == "affine"), "{name}: fixture has affine layers");
        assert!(d.layers.values().all(|l| l.mode != "affine"), "{name}: every affine layer dequantized");
        for prompt in [vec![42u32], vec![1, 17, 99, 128, 3, 200, 255]] {
            let (a, b) = (logits(&mut q, &prompt), logits(&mut d, &prompt));
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-4 * scale.max(1.0), "{name}: max |diff| {err} (scale {scale})");
        }
    }
}

#[test]
fn float16_compute_casts_floating_tensors() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = common::fixture("models/qwen3-f32");
    let mut f32m = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let half = LoadPolicy { dtype: ComputeDtype::Float16, dequantize: false };
    let mut f16m = LoadedModel::load_with(&dir, &reg, half).unwrap();
    let (a, b) = (logits(&mut f32m, &[1, 2, 3]), logits(&mut f16m, &[1, 2, 3]));
    assert_ne!(a, b, "float16 compute differs from float32 in the last bits");
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err < 0.05, "float16 logits stay close: {err}");
}

#[test]
fn bad_dtype_is_a_cli_error() {
    let out = std::process::Command::new(common::rmlx_bin())
        .args(["--dtype", "float8", "plugins"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown dtype `float8`"), "{err}");
}

#[test]
fn kv_bytes_follow_the_activation_dtype() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = common::fixture("models/qwen3-q4-g64");
    let f32m = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    assert_eq!(f32m.kv_bytes, 4, "float32 norms and scales: float32 activations");
    let half = LoadPolicy { dtype: ComputeDtype::Float16, dequantize: false };
    let f16m = LoadedModel::load_with(&dir, &reg, half).unwrap();
    assert_eq!(f16m.kv_bytes, 2);
}
