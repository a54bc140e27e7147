//! Fixtures for `scripts/gpu/nvrtc_kernels.py`: the composed encode
//! (`RotatedCodec::composed_encode`, MLX on this CPU) of float32 vectors
//! [29, 3, D] (vector 0 zero, one outlier channel) for every rotation kind
//! (Hadamard at D = 8..256, dense at 80/96, Givens, quaternion, rotor blocks
//! with tails, QJL, group norms), with the kernel's constant inputs, as raw
//! little-endian files plus `cases.txt` (one line per case: index, name, N,
//! K, D, bits, group, rotation kind, block n, blocks, QJL, preserve).
//!
//!   cargo run -p rmlx-kv-quant --example encode_fixtures -- DIR   (~1.2 MB)
use mlx_rs::{Array, Dtype};
use rmlx_kv_quant::{iso::iso, planar::{givens, planar}, quant::NormMode, rotated::RotatedCodec, rotation::{Rng, Rotation}, rotor::rotor, turbo::turbo};
use rmlx_plugin_api::author::kv::LayerDims;
use std::io::Write;

fn dump(path: &str, a: &Array) {
    let a = a.contiguous().unwrap();
    let bytes: Vec<u8> = match a.dtype() {
        Dtype::Float32 => a.as_slice::<f32>().iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::Uint32 => a.as_slice::<u32>().iter().flat_map(|v| v.to_le_bytes()).collect(),
        t => panic!("{t:?}"),
    };
    std::fs::write(path, bytes).unwrap();
}
fn dumpv(path: &str, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: encode_fixtures DIR");
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<(RotatedCodec, i32)> = vec![
        (turbo("turbo4", 4, false), 128), (turbo("turbo3", 3, false), 64), (turbo("turbo2", 2, false), 256),
        (turbo("turbo3", 3, false), 16), (turbo("turbo4", 4, false), 8), (turbo("turbo4", 4, false), 96),
        (turbo("turbo3q", 3, true), 128), (turbo("turbo4q", 4, true), 80),
        (planar("planar4", 4), 128), (planar("planar3", 3), 80), (iso("iso3", 3), 128), (iso("iso4", 4), 96),
        (rotor("rotor3", 3, false), 128), (rotor("rotor4", 4, false), 64), (rotor("rotor3q", 3, true), 96),
        (RotatedCodec::new("planar3g16", 3, false, NormMode::Preserve, 5, givens).with_group(16), 64),
    ];
    let mut man = std::fs::File::create(format!("{dir}/cases.txt")).unwrap();
    for (i, (c, d)) in cases.iter().enumerate() {
        let d = *d;
        let (n, k) = (29, 3);
        let mut rng = Rng::new(100 + i as u64);
        let v: Vec<f32> = (0..n * k * d).map(|j| if j < k * d { 0.0 } else { rng.normal() as f32 * if j % d == 1 { 8.0 } else { 1.0 } }).collect();
        let x = Array::from_slice(&v, &[n, k, d]);
        let dims = LayerDims { kv_heads: k, head_dim: d, dtype: Dtype::Float32 };
        let comps = c.composed_encode(&x, &dims).unwrap();
        let p = c.prepared(d).unwrap();
        let (kind, bn, bg, rot, scale): (i32, i32, i32, Vec<f32>, f32) = match &p.rot {
            Rotation::Hadamard { signs } => (0, 1, 0, signs.clone(), (1.0 / (d as f64).sqrt()) as f32),
            Rotation::Blocks { n, groups, mats, .. } => (1, *n, *groups, mats.clone(), 1.0),
            Rotation::Dense { q, .. } => (2, 1, 0, q.clone(), 1.0),
        };
        let mut cb = p.book.mids.clone();
        cb.extend(&p.book.levels);
        let pre = format!("{dir}/c{i}");
        dumpv(&format!("{pre}_x.bin"), &v);
        dumpv(&format!("{pre}_rot.bin"), &rot);
        dumpv(&format!("{pre}_cb.bin"), &cb);
        dumpv(&format!("{pre}_params.bin"), &[scale]);
        dumpv(&format!("{pre}_s.bin"), p.qjl.as_deref().unwrap_or(&[0.0]));
        for (j, a) in comps.iter().enumerate() {
            dump(&format!("{pre}_out{j}.bin"), a);
        }
        let g = c.group_size(d);
        writeln!(man, "{i} {} {n} {k} {d} {} {g} {kind} {bn} {bg} {} {}", c.name, c.mse_bits(), c.qjl as i32, (c.norm_mode == NormMode::Preserve) as i32).unwrap();
    }
}
