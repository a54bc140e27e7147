//! wquant-paroquant: ParoQuant layers (pairwise Givens rotations + channel
//! scales on the activations, then MLX affine 4-bit weights) built by the plugin
//! through the host's registry give ParoQuant's MLX `RotateQuantizedLinear`
//! outputs (its Metal rotation kernel transcribed, then `mx.quantized_matmul`;
//! `tests/fixtures/paroquant`, from `tests/goldens/make_paroquant_goldens.py`)
//! in float32, bfloat16 and float16; bad tensors are clear errors.
mod common;

use abi_stable::std_types::{RResult, RVec};
use mlx_rs::{Array, Dtype};
use rmlx_plugin_api::{MlxArray, NamedArray, QuantParams};
use std::collections::HashMap;

fn fixtures() -> (serde_json::Value, HashMap<String, Array>) {
    let dir = common::fixture("paroquant");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("paroquant_layers.json")).unwrap()).unwrap();
    (meta, Array::load_safetensors(dir.join("paroquant_layers.safetensors")).unwrap())
}

fn named(items: &[(&str, &Array)]) -> RVec<NamedArray> {
    items.iter().map(|(n, a)| NamedArray { name: (*n).into(), array: MlxArray::from_ref(a) }).collect()
}

fn to_f32(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

const PARTS: [&str; 6] = ["weight", "scales", "biases", "theta", "pairs", "channel_scales"];

#[test]
fn paroquant_layers_match_rotate_quantized_linear() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    assert_eq!(reg.weight_quant_plugin("paroquant").unwrap().info.id, "wquant-paroquant");
    let wq = reg.weight_quant("paroquant").unwrap();
    let (meta, t) = fixtures();
    let mut failures = vec![];
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let get = |k: &str| t.get(&format!("{name}.{k}")).unwrap_or_else(|| panic!("{name}.{k}"));
        let mut items: Vec<(&str, &Array)> = PARTS.iter().map(|p| (*p, get(p))).collect();
        if case["bias"].as_bool().unwrap() {
            items.push(("bias", get("bias")));
        }
        let p = QuantParams {
            mode: "paroquant".into(),
            bits: case["bits"].as_i64().unwrap() as i32,
            group_size: case["group_size"].as_i64().unwrap() as i32,
        };
        let layer = match wq.linear(named(&items), p) {
            RResult::ROk(l) => l,
            RResult::RErr(e) => panic!("{name}: {e:?}"),
        };
        let dims = layer.dims();
        assert_eq!((dims.0 as u64, dims.1 as u64), (case["in"].as_u64().unwrap(), case["out"].as_u64().unwrap()));
        let y = match layer.forward(MlxArray::from_ref(get("x"))) {
            RResult::ROk(y) => y.into_array(),
            RResult::RErr(e) => panic!("{name}: {e:?}"),
        };
        let want = get("y");
        assert_eq!((y.shape(), y.dtype()), (want.shape(), want.dtype()), "{name}");
        let (ours, golden) = (to_f32(&y), to_f32(want));
        let scale = golden.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = ours.iter().zip(&golden).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        // float32: summation order only; 16-bit: a rotated activation may round one ulp apart.
        let tol = if case["dtype"] == "float32" { 1e-5 } else { 2e-2 };
        eprintln!("{name} ({}): max relative error {err:.2e}", case["dtype"]);
        if err > tol {
            failures.push(format!("{name}: relative error {err:e} > {tol:e}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_paroquant_tensors_are_clear_errors() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let wq = reg.weight_quant("paroquant").unwrap();
    let (_, t) = fixtures();
    let get = |k: &str| &t[&format!("g128_k8_f32.{k}")];
    let p = || QuantParams { mode: "paroquant".into(), bits: 4, group_size: 128 };
    let err = |items: Vec<(&str, &Array)>, p: QuantParams| match wq.linear(named(&items), p) {
        RResult::ROk(_) => panic!("accepted"),
        RResult::RErr(e) => format!("{e:?}"),
    };
    let all = |skip: &str| PARTS.iter().filter(|n| **n != skip).map(|n| (*n, get(n))).collect::<Vec<_>>();
    assert!(err(all("theta"), p()).contains("theta"));
    assert!(err(all("pairs"), p()).contains("pairs"));
    let short = Array::zeros::<f32>(&[8, 3]).unwrap();
    let mut bad = all("theta");
    bad.push(("theta", &short));
    assert!(err(bad, p()).contains("theta: expected [8, 128]"));
    let mut gs = p();
    gs.group_size = 100;
    assert!(err(all(""), gs).contains("group size"));
}
