//! Expert (switch) layers in each microscaled mode against the per-expert
//! dense matmul of the dequantized weights.
use super::*;
use rmlx_plugin_api::abi_stable::std_types::RVec;
use mlx_rs::random;
use rmlx_plugin_api::{MlxArray, NamedArray};

fn tensors(items: Vec<(&str, Array)>) -> Tensors {
    let v: RVec<NamedArray> =
        items.into_iter().map(|(n, a)| NamedArray { name: n.into(), array: MlxArray::from_array(a) }).collect();
    Tensors::new("", v)
}

/// Per-expert dense reference: x [..., 1|k, 1, in] @ W[idx]^T -> [..., k, 1, out].
fn reference(x: &Array, w: &Array, idx: &Array, bias: Option<&Array>) -> Array {
    let sel = w.take_axis(idx, 0).unwrap(); // [..., k, out, in]
    let y = x.matmul(sel.swap_axes(-1, -2).unwrap()).unwrap();
    match bias {
        Some(b) => y.add(b.take_axis(idx, 0).unwrap().expand_dims(-2).unwrap()).unwrap(),
        None => y,
    }
}

fn close(a: &Array, b: &Array) {
    assert_eq!(a.shape(), b.shape());
    assert_eq!(a.dtype(), b.dtype());
    let d = a.subtract(b).unwrap().abs().unwrap().max(None).unwrap().item_cast::<f32>();
    assert!(d < 1e-4, "max |diff| {d}");
}

fn params(f: FpFormat) -> QuantParams {
    QuantParams { mode: f.mode.into(), bits: f.bits, group_size: f.group_size }
}

#[test]
fn switch_equals_per_expert_matmul_of_dequantized_weights() {
    random::seed(5).unwrap();
    let (e, out, inp) = (4, 40, 64);
    let w = random::normal::<f32>(&[e, out, inp], None, None, None).unwrap().multiply(Array::from_f32(0.1)).unwrap();
    let bias = random::normal::<f32>(&[e, out], None, None, None).unwrap();
    for f in FORMATS {
        let q = ops::quantize(&w, f.group_size, f.bits, f.mode).unwrap();
        let (wq, s) = (&q[0], &q[1]); // [E, out, in*bits/32], uint8 [E, out, in/group]
        assert_eq!(q.len(), 2, "{}: no biases", f.mode);
        let dq = ops::dequantize(wq, s, None, f.group_size, f.bits, f.mode, None, Some(Dtype::Float32)).unwrap();
        for with_bias in [false, true] {
            let mut items = vec![("weight", wq.clone()), ("scales", s.clone())];
            if with_bias {
                items.push(("bias", bias.clone()));
            }
            let layer = FpQuant(f).switch_linear(tensors(items), &params(f)).unwrap();
            assert_eq!(layer.dims(), (4, 64, 40), "{}", f.mode);
            let bb = with_bias.then_some(&bias);
            let x = random::normal::<f32>(&[2, 3, 1, 1, inp], None, None, None).unwrap();
            let idx = Array::from_slice(&[0u32, 3, 1, 1, 2, 0, 3, 2, 1, 0, 2, 3], &[2, 3, 2]);
            close(&layer.forward(&x, &idx, false).unwrap(), &reference(&x, &dq, &idx, bb));
            let x = random::normal::<f32>(&[6, 1, inp], None, None, None).unwrap();
            let idx = Array::from_slice(&[0u32, 0, 1, 2, 3, 3], &[6]);
            let want = reference(&x.expand_dims(-3).unwrap(), &dq, &idx.expand_dims(-1).unwrap(), bb);
            close(&layer.forward(&x, &idx, true).unwrap(), &want.squeeze_axes(&[-3]).unwrap());
        }
        // mlx-lm's affine layout (with biases) under this mode is refused by name.
        let items = vec![("weight", wq.clone()), ("scales", s.clone()), ("biases", s.clone())];
        let err = FpQuant(f).switch_linear(tensors(items), &params(f)).err().unwrap();
        assert!(err.message.contains("has no biases"), "{}", err.message);
    }
}

/// nvfp4 experts with one global scale each (mlx-lm's `_quantize_experts`):
/// each expert is dequantized with its own scale.
#[test]
fn nvfp4_switch_with_per_expert_global_scale() {
    random::seed(6).unwrap();
    let (e, out, inp) = (3, 16, 32);
    let w = random::normal::<f32>(&[e, out, inp], None, None, None).unwrap();
    let q = ops::quantize(&w, 16, 4, "nvfp4").unwrap();
    let g = Array::from_slice(&[0.5f32, 2.0, 7.0], &[3]);
    let items = vec![("weight", q[0].clone()), ("scales", q[1].clone()), ("global_scale", g.clone())];
    let layer = FpQuant(NVFP4).switch_linear(tensors(items), &params(NVFP4)).unwrap();
    let x = random::normal::<f32>(&[4, 1, 1, inp], None, None, None).unwrap();
    let idx = Array::from_slice(&[0u32, 2, 1, 0, 2, 2, 1, 1], &[4, 2]);
    let y = layer.forward(&x, &idx, false).unwrap(); // [4, 2, 1, out]
    let ids: Vec<u32> = idx.as_slice::<u32>().to_vec();
    for (n, &ex) in ids.iter().enumerate() {
        let i = Array::from_int(ex as i32);
        let (wi, si) = (q[0].take_axis(&i, 0).unwrap(), q[1].take_axis(&i, 0).unwrap());
        let gi = g.take_axis(&i, 0).unwrap();
        let dq = ops::dequantize(&wi, &si, None, 16, 4, "nvfp4", Some(&gi), Some(Dtype::Float32)).unwrap();
        let xt = x.take_axis(Array::from_int(n as i32 / 2), 0).unwrap().reshape(&[1, inp]).unwrap();
        let want = xt.matmul(dq.t()).unwrap(); // [1, out]
        let got = y.reshape(&[8, 1, out]).unwrap().take_axis(Array::from_int(n as i32), 0).unwrap();
        close(&got, &want);
    }
    let bad = vec![("weight", q[0].clone()), ("scales", q[1].clone()), ("global_scale", Array::from_slice(&[1.0f32, 2.0], &[2]))];
    let err = FpQuant(NVFP4).switch_linear(tensors(bad), &params(NVFP4)).err().unwrap();
    assert!(err.message.contains("one per expert"), "{}", err.message);
}
