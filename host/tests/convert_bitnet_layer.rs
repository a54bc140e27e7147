//! wquant-bitnet: BitNet b1.58 ternary layers built by the plugin (loaded from
//! the staged plugin directory through the host's registry) give mlx-lm's
//! BitLinear outputs on a tiny `mlx_lm.models.bitnet.Model`'s layers
//! (`tests/fixtures/bitnet`, from `tests/goldens/make_bitnet_goldens.py`),
//! in float32, bfloat16 and float16, with `bitlinear` (divide by the scale)
//! and `autobitlinear` (multiply) scales; bad tensors are clear errors.
mod common;

use abi_stable::std_types::{RResult, RVec};
use mlx_rs::{Array, Dtype};
use rmlx_plugin_api::{MlxArray, NamedArray, QuantParams};
use std::collections::HashMap;

fn fixtures() -> (serde_json::Value, HashMap<String, Array>) {
    let dir = common::fixture("bitnet");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("bitnet_layers.json")).unwrap()).unwrap();
    let tensors = Array::load_safetensors(dir.join("bitnet_layers.safetensors")).unwrap();
    (meta, tensors)
}

fn params(mode: &str) -> QuantParams {
    QuantParams { mode: mode.into(), bits: 2, group_size: 0 }
}

fn named(items: &[(&str, &Array)]) -> RVec<NamedArray> {
    items.iter().map(|(n, a)| NamedArray { name: (*n).into(), array: MlxArray::from_ref(a) }).collect()
}

fn to_f32(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

#[test]
fn bitnet_layers_match_mlx_lm_bitlinear() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    assert_eq!(reg.weight_quant_plugin("bitnet").unwrap().info.id, "wquant-bitnet");
    let (meta, t) = fixtures();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    let mut failures = vec![];
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mode = case["mode"].as_str().unwrap();
        let get = |k: &str| t.get(&format!("{name}.{k}")).unwrap_or_else(|| panic!("{name}.{k}"));
        let mut items = vec![("weight", get("weight")), ("weight_scale", get("weight_scale"))];
        if case["bias"].as_bool().unwrap() {
            items.push(("bias", get("bias")));
        }
        let wq = reg.weight_quant(mode).unwrap();
        let layer = match wq.linear(named(&items), params(mode)) {
            RResult::ROk(l) => l,
            RResult::RErr(e) => panic!("{name}: {e:?}"),
        };
        let dims = layer.dims();
        assert_eq!((dims.0 as u64, dims.1 as u64), (case["in"].as_u64().unwrap(), case["out"].as_u64().unwrap()), "{name} dims");
        let x = get("x");
        let y = match layer.forward(MlxArray::from_ref(x)) {
            RResult::ROk(y) => y.into_array(),
            RResult::RErr(e) => panic!("{name}: {e:?}"),
        };
        let want = get("y");
        assert_eq!(y.shape(), want.shape(), "{name} shape");
        assert_eq!(y.dtype(), want.dtype(), "{name} dtype");
        let (ours, golden) = (to_f32(&y), to_f32(want));
        let scale = golden.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = ours.iter().zip(&golden).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        // float32: accumulation order only; 16-bit: at most one rounding step of the output.
        let tol = if case["dtype"] == "float32" { 1e-5 } else { 1e-2 };
        eprintln!("{name} ({mode}, {}): max relative error {err:.2e}", case["dtype"]);
        if err > tol {
            failures.push(format!("{name}: relative error {err:e} > {tol:e}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_bitnet_tensors_are_clear_errors() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let (_, t) = fixtures();
    let w = &t["q_proj_f32.weight"];
    let s = &t["q_proj_f32.weight_scale"];
    let wq = reg.weight_quant("bitnet").unwrap();
    let err = |items: &[(&str, &Array)]| match wq.linear(named(items), params("bitnet")) {
        RResult::ROk(_) => panic!("accepted {:?}", items.iter().map(|(n, _)| *n).collect::<Vec<_>>()),
        RResult::RErr(e) => format!("{e:?}"),
    };
    assert!(err(&[("weight", w)]).contains("weight_scale"));
    let as_u32 = w.as_dtype(Dtype::Uint32).unwrap();
    assert!(err(&[("weight", &as_u32), ("weight_scale", s)]).contains("uint8"));
    let two = Array::from_slice(&[1f32, 2.0], &[2]);
    assert!(err(&[("weight", w), ("weight_scale", &two)]).contains("one value"));
    let odd = Array::zeros::<u8>(&[4, 40]).unwrap();
    assert!(err(&[("weight", &odd), ("weight_scale", s)]).contains("multiple of 32"));
    let emb = wq.embedding(named(&[("weight", w), ("weight_scale", s)]), params("bitnet"));
    assert!(matches!(emb, RResult::RErr(_)), "embeddings stay dense in BitNet");
}
