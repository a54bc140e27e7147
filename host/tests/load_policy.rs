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

/// The default policy (no flags) is the fast one for the backend: on a CPU,
/// float32 compute and affine layers dequantized when the dense weights
/// fit; on a GPU, the files as they are. Explicit flags win.
#[test]
fn the_default_policy_is_the_fast_path_for_the_backend() {
    use rmlx::model::policy::{resolve_with, Dequantize, PolicySetting};
    use rmlx::model::ModelDir;
    let auto = PolicySetting { dtype: ComputeDtype::Auto, dequantize: Dequantize::Auto };
    let q4 = ModelDir::open(&common::fixture("models/llama-q4-g64")).unwrap();
    let dense = ModelDir::open(&common::fixture("models/qwen3-f32")).unwrap();
    let gb = 1u64 << 30;
    // CPU, plenty of memory: float32 + dequantize.
    let r = resolve_with(&q4, auto, true, 24 * gb).unwrap();
    assert_eq!(r.policy, LoadPolicy { dtype: ComputeDtype::Float32, dequantize: true }, "{}", r.why);
    assert!(r.why.contains("cpu backend") && r.why.contains("dequantized at load"), "{}", r.why);
    // CPU, too little memory for dense weights: float32, kept quantized.
    let r = resolve_with(&q4, auto, true, 1000).unwrap();
    assert_eq!(r.policy, LoadPolicy { dtype: ComputeDtype::Float32, dequantize: false }, "{}", r.why);
    assert!(r.why.contains("kept quantized"), "{}", r.why);
    // A dense model has nothing to dequantize.
    let r = resolve_with(&dense, auto, true, 24 * gb).unwrap();
    assert!(!r.policy.dequantize);
    // GPU: the files as they are.
    let r = resolve_with(&q4, auto, false, 80 * gb).unwrap();
    assert_eq!(r.policy, LoadPolicy { dtype: ComputeDtype::Model, dequantize: false }, "{}", r.why);
    assert!(r.why.contains("gpu backend"), "{}", r.why);
    // Flags override.
    let pinned = PolicySetting { dtype: ComputeDtype::Model, dequantize: Dequantize::Off };
    let r = resolve_with(&q4, pinned, true, 24 * gb).unwrap();
    assert_eq!(r.policy, LoadPolicy { dtype: ComputeDtype::Model, dequantize: false });
    let forced = PolicySetting { dtype: ComputeDtype::Float16, dequantize: Dequantize::On };
    let r = resolve_with(&q4, forced, false, 80 * gb).unwrap();
    assert_eq!(r.policy, LoadPolicy { dtype: ComputeDtype::Float16, dequantize: true });
}

/// `rmlx info` says which policy the defaults pick, and why.
#[test]
fn info_names_the_policy_and_why() {
    let dir = common::fixture("models/llama-q4-g64");
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(["info".into(), "--model".into(), dir.display().to_string(), "--json".into()]);
        let out = std::process::Command::new(common::rmlx_bin()).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["load_policy"].clone()
    };
    let p = run(&[]);
    assert_eq!(p["dtype"], "float32", "{p}");
    assert_eq!(p["dequantize"], true, "{p}");
    assert!(p["why"].as_str().unwrap().contains("cpu backend"), "{p}");
    let p = run(&["--dequantize=off", "--dtype", "model"]);
    assert_eq!(p["dtype"], "model", "{p}");
    assert_eq!(p["dequantize"], false, "{p}");
    let p = run(&["--dequantize"]);
    assert_eq!(p["dequantize"], true, "{p}");
    let out = std::process::Command::new(common::rmlx_bin())
        .args(["--dequantize=maybe", "plugins"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --dequantize value `maybe`"));
}
