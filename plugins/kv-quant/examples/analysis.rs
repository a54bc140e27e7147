//! Why does turbo3 break small dense models? Attention-level error of the
//! key codecs on real keys (dumped by scripts/dump_kv.py) or synthetic keys
//! shaped like them (a large common "DC" component, a few outlier channels,
//! an attention-sink token).
//!
//!   cargo run -p rmlx-kv-quant --example analysis -- DUMP.safetensors [layers]
//!   cargo run -p rmlx-kv-quant --example analysis -- synthetic D
//!
//! Per layer, keys only are quantized (values exact) unless the label says
//! `kv`: `kmse` = sum ||k̂ - k||² / sum ||k||²; `dlogit` = RMS error of
//! the scaled logits; `kl` = mean KL(p || p̂) of the attention rows (causal);
//! `out` = relative MSE of the attention output.
use mlx_rs::{
    ops::{logsumexp_axis, select, softmax_axis},
    Array, Dtype,
};
use rmlx_kv_quant::{codec, quant::NormMode, rotated::RotatedCodec, rotation::{Rng, Rotation}};
use rmlx_plugin_api::author::kv::{gqa_matmul, KvCodecImpl, LayerDims};

struct Variant {
    label: &'static str,
    codec: Box<dyn KvCodecImpl>,
    /// Subtract each head's mean key first (an oracle calibration).
    center: bool,
    /// The dtype norms/scales are stored in.
    dtype: Dtype,
    /// Quantize values with this codec too.
    values: Option<Box<dyn KvCodecImpl>>,
}

fn v(label: &'static str, codec: Box<dyn KvCodecImpl>) -> Variant {
    Variant { label, codec, center: false, dtype: Dtype::Bfloat16, values: None }
}

fn variants() -> Vec<Variant> {
    let dense = |d: i32, s: u64| Rotation::dense(d, s);
    let had = |d: i32, s: u64| Rotation::hadamard_or_dense(d, s);
    let only = std::env::var("VARIANTS").ok();
    let mut out = vec![
        v("q8", codec("q8").unwrap()),
        v("fp8", codec("fp8").unwrap()),
        v("q4", codec("q4").unwrap()),
        v("turbo4", codec("turbo4").unwrap()),
        v("turbo3", codec("turbo3").unwrap()),
        v("turbo2", codec("turbo2").unwrap()),
        v("turbo3 raw-norm", Box::new(RotatedCodec::new("t3raw", 3, false, NormMode::Raw, 1, had))),
        v("turbo3 dense-rot", Box::new(RotatedCodec::new("t3dense", 3, false, NormMode::Preserve, 1, dense))),
        Variant { dtype: Dtype::Float32, ..v("turbo3 f32-norm", codec("turbo3").unwrap()) },
        Variant { dtype: Dtype::Float16, ..v("turbo3 f16-norm", codec("turbo3").unwrap()) },
        v("turbo3q (qjl)", codec("turbo3q").unwrap()),
        v("turbo4q (qjl)", codec("turbo4q").unwrap()),
        Variant { center: true, ..v("turbo3 centered", codec("turbo3").unwrap()) },
        Variant { center: true, ..v("turbo2 centered", codec("turbo2").unwrap()) },
        v("planar3", codec("planar3").unwrap()),
        v("iso3", codec("iso3").unwrap()),
        v("rotor3", codec("rotor3").unwrap()),
        Variant { center: true, ..v("rotor3 centered", codec("rotor3").unwrap()) },
        Variant { center: true, ..v("q4 centered", codec("q4").unwrap()) },
    ];
    for (label, k, vn) in [
        ("kv turbo3", "turbo3", "turbo3"),
        ("kv turbo4", "turbo4", "turbo4"),
        ("kv q4", "q4", "q4"),
        ("k q8 v turbo3", "q8", "turbo3"),
        ("k q8 v turbo4", "q8", "turbo4"),
        ("k fp8 v turbo3", "fp8", "turbo3"),
    ] {
        out.push(Variant { values: codec(vn), ..v(label, codec(k).unwrap()) });
    }
    out.push(Variant { center: true, ..v("turbo4 centered", codec("turbo4").unwrap()) });
    let g = |name: &'static str, bits: i32, rot: fn(i32, u64) -> Rotation, group: i32| -> Box<dyn KvCodecImpl> {
        Box::new(RotatedCodec::new(name, bits, false, NormMode::Preserve, 1, rot).with_group(group))
    };
    out.push(v("turbo3 g32", g("t3g32", 3, had, 32)));
    out.push(v("planar3 g32", g("p3g32", 3, rmlx_kv_quant::planar::givens, 32)));
    out.push(v("planar3 g16", g("p3g16", 3, rmlx_kv_quant::planar::givens, 16)));
    out.push(v("iso3 g32", g("i3g32", 3, rmlx_kv_quant::iso::quaternions, 32)));
    out.push(v("rotor3 g32", g("r3g32", 3, rmlx_kv_quant::rotor::rotors, 32)));
    out.push(v("planar4 g32", g("p4g32", 4, rmlx_kv_quant::planar::givens, 32)));
    out.push(v("planar2 g32", g("p2g32", 2, rmlx_kv_quant::planar::givens, 32)));
    out.push(Variant { center: true, ..v("q8 centered", codec("q8").unwrap()) });
    if let Some(only) = only {
        out.retain(|v| only.split(',').any(|o| o == v.label));
    }
    out
}

/// [T, K, D] -> decoded [K, T, D] float32, optionally centered per head
/// (the mean comes back after decoding: exact, it is not quantized).
fn roundtrip(var: &Variant, codec: &dyn KvCodecImpl, x: &Array, d: &LayerDims, calib: Option<&Array>) -> Array {
    let f32 = |a: &Array| a.as_dtype(Dtype::Float32).unwrap();
    let xb = x.as_dtype(Dtype::Bfloat16).unwrap().as_dtype(Dtype::Float32).unwrap();
    let mean = if var.center {
        // the calibration text's mean key when given, else this text's own
        calib.map(|c| c.mean_axis(1, true).unwrap().transpose_axes(&[1, 0, 2]).unwrap()).unwrap_or_else(|| xb.mean_axis(0, true).unwrap())
    } else { mlx_rs::ops::zeros_like(xb.take_axis(Array::from_int(0).expand_dims(0).unwrap(), 0).unwrap()).unwrap() }; // [1, K, D]
    let comps: Vec<Array> = codec.encode(&xb.subtract(&mean).unwrap().as_dtype(d.dtype).unwrap(), d).unwrap();
    let comps: Vec<Array> = comps.iter().map(|a| a.expand_dims(0).unwrap()).collect();
    let y = f32(&codec.decode(&comps, d).unwrap()).squeeze_axes(&[0]).unwrap(); // [K, T, D]
    y.add(mean.transpose_axes(&[1, 0, 2]).unwrap()).unwrap()
}

fn mean_f32(a: &Array) -> f32 {
    a.mean(None).unwrap().item_cast::<f32>()
}

/// q [H, T, D], k/v [K, T, D] (float32) -> (kmse, dlogit, kl, out).
fn measure(var: &Variant, q: &Array, k: &Array, vv: &Array, calib: Option<&Array>) -> [f32; 4] {
    let (h, t, dh) = (q.dim(0), q.dim(1), q.dim(2));
    let kh = k.dim(0);
    let d = LayerDims { kv_heads: kh, head_dim: dh, dtype: var.dtype };
    let kt = k.transpose_axes(&[1, 0, 2]).unwrap(); // [T, K, D]
    let khat = roundtrip(var, var.codec.as_ref(), &kt, &d, calib); // [K, T, D]
    let vhat = match &var.values {
        // values are not centered
        Some(c) => roundtrip(&Variant { center: false, ..v("", codec("q8").unwrap()) }, c.as_ref(), &vv.transpose_axes(&[1, 0, 2]).unwrap(), &d, None),
        None => vv.clone(),
    };
    // energy-weighted: sum ||k̂ - k||² / sum ||k||²
    let kmse = mean_f32(&khat.subtract(k).unwrap().square().unwrap()) / mean_f32(&k.square().unwrap());
    let scale = Array::from_f32(1.0 / (dh as f32).sqrt());
    let q4 = q.expand_dims(0).unwrap();
    let scores = |kk: &Array| gqa_matmul(&q4, &kk.expand_dims(0).unwrap().transpose_axes(&[0, 1, 3, 2]).unwrap()).unwrap().multiply(&scale).unwrap();
    let (s, sh) = (scores(k), scores(&khat)); // [1, H, T, T]
    let causal = Array::from_iter((0..t).flat_map(|i| (0..t).map(move |j| j <= i)), &[t, t]);
    let neg = Array::from_f32(-1e30);
    let (sm, shm) = (select(&causal, &s, &neg).unwrap(), select(&causal, &sh, &neg).unwrap());
    // A constant shift per query does not change attention: compare the
    // logits after removing each row's mean over its visible positions.
    let cnt = Array::from_iter((1..=t).map(|c| c as f32), &[t, 1]);
    let diff = select(&causal, sh.subtract(&s).unwrap(), Array::from_f32(0.0)).unwrap();
    let row_mean = diff.sum_axis(-1, true).unwrap().divide(&cnt).unwrap();
    let centered = select(&causal, diff.subtract(&row_mean).unwrap(), Array::from_f32(0.0)).unwrap();
    let dlogit = (centered.square().unwrap().sum(None).unwrap().item_cast::<f32>() / (h as f32 * (t * (t + 1) / 2) as f32)).sqrt();
    let lp = sm.subtract(logsumexp_axis(&sm, -1, true).unwrap()).unwrap();
    let lph = shm.subtract(logsumexp_axis(&shm, -1, true).unwrap()).unwrap();
    let p = softmax_axis(&sm, -1, true).unwrap();
    let kl = mean_f32(&p.multiply(lp.subtract(&lph).unwrap()).unwrap().sum_axis(-1, false).unwrap());
    let ph = softmax_axis(&shm, -1, true).unwrap();
    let o = gqa_matmul(&p, &vv.expand_dims(0).unwrap()).unwrap();
    let oh = gqa_matmul(&ph, &vhat.expand_dims(0).unwrap()).unwrap();
    let out = mean_f32(&oh.subtract(&o).unwrap().square().unwrap().sum_axis(-1, false).unwrap())
        / mean_f32(&o.square().unwrap().sum_axis(-1, false).unwrap());
    [kmse, dlogit, kl, out]
}

/// Synthetic q, k, v shaped like the real dumps: per head a common key
/// `mu` (DC, `dc` of the key energy) with 3 outlier channels, noise, token 0
/// an attention sink (`sink` x the median norm, aligned with the queries),
/// queries N(0, 1) plus a pull toward `mu`.
fn synthetic(d: i32, t: i32, dc: f32, sink: f32, seed: u64) -> (Array, Array, Array) {
    let (h, kh) = (4, 2);
    let mut rng = Rng::new(seed);
    let mut q = vec![0f32; (h * t * d) as usize];
    let mut k = vec![0f32; (kh * t * d) as usize];
    let mut v = vec![0f32; (kh * t * d) as usize];
    for head in 0..kh as usize {
        // mu: 3 outlier channels carry most of it, the rest small
        let mut mu: Vec<f32> = (0..d).map(|_| 0.3 * rng.normal() as f32).collect();
        for c in [2usize, 11, (d - 7) as usize] {
            mu[c] = 6.0 * rng.sign();
        }
        let m2: f32 = mu.iter().map(|x| x * x).sum();
        let a = (dc / (1.0 - dc) * d as f32 / m2).sqrt(); // DC energy share = dc
        for ti in 0..t as usize {
            for (c, &m) in mu.iter().enumerate() {
                let i = (head * t as usize + ti) * d as usize + c;
                k[i] = a * m + rng.normal() as f32;
                v[i] = rng.normal() as f32;
                if ti == 0 {
                    k[i] = a * m * sink;
                }
            }
        }
        for hh in 0..(h / kh) as usize {
            let qh = head * (h / kh) as usize + hh;
            for ti in 0..t as usize {
                for c in 0..d as usize {
                    q[(qh * t as usize + ti) * d as usize + c] = 1.5 * rng.normal() as f32 + 0.15 * mu[c];
                }
            }
        }
    }
    (Array::from_slice(&q, &[h, t, d]), Array::from_slice(&k, &[kh, t, d]), Array::from_slice(&v, &[kh, t, d]))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut layers: Vec<(String, Array, Array, Array, Option<Array>)> = Vec::new();
    // CALIB=dump: centered variants subtract that text's mean key per layer
    let calib = std::env::var("CALIB").ok().map(|p| Array::load_safetensors(p).expect("read the calibration dump"));
    if args.get(1).map(String::as_str) == Some("synthetic") {
        let d: i32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
        for (i, (dc, sink)) in [(0.0, 1.0), (0.6, 1.0), (0.9, 1.0), (0.6, 3.0)].into_iter().enumerate() {
            let (q, k, v) = synthetic(d, 384, dc, sink, 100 + i as u64);
            layers.push((format!("dc {dc} sink {sink}"), q, k, v, None));
        }
    } else {
        let path = args.get(1).expect("usage: analysis DUMP.safetensors [l1,l2,..] | synthetic D");
        let map = Array::load_safetensors(path).expect("read the dump");
        let n = map.keys().filter(|k| k.starts_with('k')).count();
        let pick: Vec<usize> = match args.get(2) {
            Some(s) => s.split(',').map(|x| x.parse().unwrap()).collect(),
            None => (0..n).collect(),
        };
        for l in pick {
            let g = |p: &str| map[&format!("{p}{l}")].as_dtype(Dtype::Float32).unwrap();
            let c = calib.as_ref().map(|m| m[&format!("k{l}")].as_dtype(Dtype::Float32).unwrap());
            layers.push((format!("layer {l}"), g("q"), g("k"), g("v"), c));
        }
    }
    println!("{:18} {:>8} {:>8} {:>9} {:>8}   worst kl (layer)", "variant", "kmse", "dlogit", "kl", "out");
    for var in variants() {
        let rows: Vec<[f32; 4]> = layers.iter().map(|(_, q, k, v, c)| measure(&var, q, k, v, c.as_ref())).collect();
        let avg = |i: usize| rows.iter().map(|r| r[i]).sum::<f32>() / rows.len() as f32;
        let (wi, w) = rows.iter().enumerate().fold((0, 0.0f32), |acc, (i, r)| if r[2] > acc.1 { (i, r[2]) } else { acc });
        println!("{:18} {:8.4} {:8.4} {:9.5} {:8.4}   {:.4} ({})", var.label, avg(0), avg(1), avg(2), avg(3), w, layers[wi].0);
        if layers.len() <= 6 {
            for (r, (name, ..)) in rows.iter().zip(&layers) {
                println!("    {name:14} {:8.4} {:8.4} {:9.5} {:8.4}", r[0], r[1], r[2], r[3]);
            }
        }
    }
}
