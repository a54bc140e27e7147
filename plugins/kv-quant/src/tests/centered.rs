//! A calibrated (centered) codec: the mean comes back exactly in decode,
//! scores and mix, and keys with a large shared component lose much less.
use super::{dims, with_outliers};
use crate::codec;
use mlx_rs::{ops::indexing::TryIndexOp, Array, Dtype};
use rmlx_plugin_api::{
    author::{
        kv::{calibrated, gqa_matmul, max_abs_diff, KvCodecImpl},
        Tensors,
    },
    NamedArray,
};

fn mean_of(x: &Array) -> Array {
    x.mean_axis(0, false).unwrap() // [N, K, D] -> [K, D]
}

fn centered(name: &str, mean: &Array) -> Box<dyn KvCodecImpl> {
    let data = vec![NamedArray { name: "mean".into(), array: rmlx_plugin_api::MlxArray::from_ref(mean) }];
    calibrated(codec(name).unwrap(), Tensors::new("test ", data.into())).unwrap()
}

/// Relative squared error of decode(encode(x)) [1, K, N, D] against x [N, K, D].
fn rel_err(c: &dyn KvCodecImpl, x: &Array) -> f32 {
    let d = dims(x.dim(1), x.dim(2), Dtype::Float32);
    let comps: Vec<Array> = c.encode(x, &d).unwrap().into_iter().map(|a| a.expand_dims(0).unwrap()).collect();
    let y = c.decode(&comps, &d).unwrap(); // [1, K, N, D]
    let x = x.transpose_axes(&[1, 0, 2]).unwrap().expand_dims(0).unwrap();
    let e = y.subtract(&x).unwrap().square().unwrap().sum(None).unwrap().item::<f32>();
    e / x.square().unwrap().sum(None).unwrap().item::<f32>()
}

#[test]
fn centering_recovers_the_mean_exactly_and_shrinks_the_error() {
    // Keys with a large shared per-channel offset, as small models' are.
    let x = with_outliers(256, 2, 64, 7, &[3, 17, 40], 12.0);
    let mean = mean_of(&x);
    for name in ["turbo3", "turbo4", "planar3", "iso3", "rotor3"] {
        let plain = rel_err(&*codec(name).unwrap(), &x);
        let c = rel_err(&*centered(name, &mean), &x);
        assert!(c < plain * 0.5, "{name}: centered {c} vs plain {plain}");
    }
}

#[test]
fn centered_scores_and_mix_equal_the_decoded_reference() {
    let x = with_outliers(16, 2, 64, 3, &[5], 8.0);
    let mean = mean_of(&x);
    let c = centered("turbo3", &mean);
    let d = dims(2, 64, Dtype::Float32);
    let comps: Vec<Array> = c.encode(&x, &d).unwrap().into_iter().map(|a| a.expand_dims(0).unwrap()).collect();
    let k = c.decode(&comps, &d).unwrap(); // [1, K, T, D]
    let q = super::gaussian(4, 1, 64, 9).reshape(&[1, 4, 1, 64]).unwrap(); // [1, H, 1, D]
    let want = gqa_matmul(&q, &k.transpose_axes(&[0, 1, 3, 2]).unwrap()).unwrap();
    let got = c.scores(&q, &comps, &d).unwrap();
    assert!(max_abs_diff(&got, &want).unwrap() < 1e-3, "{}", max_abs_diff(&got, &want).unwrap());
    // Probabilities summing to less than 1 (a sink took some): the mean's share follows.
    let p = mlx_rs::ops::softmax_axis(&got, -1, true).unwrap().multiply(Array::from_f32(0.7)).unwrap();
    let want = gqa_matmul(&p, &k).unwrap();
    let got = c.mix(&p, &comps, &d).unwrap();
    assert!(max_abs_diff(&got, &want).unwrap() < 1e-3);
    // A mean of the wrong shape is refused by name.
    let bad = centered("turbo3", &mean.try_index(0..1).unwrap());
    assert!(bad.check(&d).unwrap_err().message.contains("kv-calibrate"));
    // Families without calibration say so.
    assert!(codec("q8").unwrap().calibration().is_none());
    assert_eq!(codec("turbo3").unwrap().calibration().as_deref(), Some("mean"));
}
