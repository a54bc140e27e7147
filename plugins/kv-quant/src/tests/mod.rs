//! Tests of every family: round-trip error, attention over paged blocks
//! against a dense reference, rotated scores/mix, bits per value.
mod attend;
mod bits;
mod centered;
mod fused;
mod fused_encode;
mod geometry;
mod roundtrip;

use crate::rotation::Rng;
use mlx_rs::{Array, Dtype};
use rmlx_plugin_api::author::kv::LayerDims;

pub fn dims(kv_heads: i32, head_dim: i32, dtype: Dtype) -> LayerDims {
    LayerDims { kv_heads, head_dim, dtype }
}

/// float32 [n, k, d] of N(0, 1).
pub fn gaussian(n: i32, k: i32, d: i32, seed: u64) -> Array {
    let mut rng = Rng::new(seed);
    Array::from_iter((0..n * k * d).map(|_| rng.normal() as f32), &[n, k, d])
}

/// Keys shaped like a real model's: N(0, 1) plus a few outlier channels of
/// `scale` times the rest (a fixed per-channel offset and scale, as RoPE'd
/// keys with a large k_norm weight have).
pub fn with_outliers(n: i32, k: i32, d: i32, seed: u64, channels: &[i32], scale: f32) -> Array {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity((n * k * d) as usize);
    for _ in 0..n * k {
        for c in 0..d {
            let x = rng.normal() as f32;
            v.push(if channels.contains(&c) { scale * (1.0 + 0.5 * x) } else { x });
        }
    }
    Array::from_slice(&v, &[n, k, d])
}

pub fn to_vec(a: &Array) -> Vec<f32> {
    a.as_dtype(Dtype::Float32).unwrap().contiguous().unwrap().as_slice::<f32>().to_vec()
}

/// Mean over vectors of ||x̂ - x||² / ||x||², for x [N, K, D] and x̂ [N, K, D].
pub fn rel_mse(x: &Array, xh: &Array) -> f64 {
    let d = *x.shape().last().unwrap() as usize;
    let (a, b) = (to_vec(x), to_vec(xh));
    let mut sum = 0.0;
    let n = a.len() / d;
    for v in 0..n {
        let (mut e, mut s) = (0.0f64, 0.0f64);
        for i in 0..d {
            let (p, q) = (a[v * d + i] as f64, b[v * d + i] as f64);
            e += (p - q).powi(2);
            s += p * p;
        }
        sum += e / s.max(1e-30);
    }
    sum / n as f64
}
