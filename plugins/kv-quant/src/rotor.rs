//! RotorQuant: `rotor4`, `rotor3` (and `rotor4q`, `rotor3q` with the 1-bit
//! QJL residual for keys). Each group of 3 channels is a vector of Cl(3,0)
//! rotated by the sandwich product `x -> R x R̃` with a seeded unit rotor
//! `R = s + b12 e12 + b13 e13 + b23 e23`, then TurboQuant's scalar quantizer
//! (per-vector norm + Lloyd-Max codebook; norm-preserving without QJL).
//!
//! The sandwich is evaluated with the geometric product once, when the codec
//! first sees a head dim, into the 3x3 matrix it equals on vectors; encoding
//! and attention apply that matrix. head_dim not divisible by 3 (64, 128):
//! the last `D mod 3` channels pass unrotated (still quantized).
use crate::{
    quant::NormMode,
    rotated::RotatedCodec,
    rotation::{Rng, Rotation},
};

pub const SEED: u64 = 0x726F_746F_7200_0001;

/// A multivector of Cl(3,0), indexed by blade bitmask (bit 0: e1, bit 1: e2,
/// bit 2: e3): [1, e1, e2, e12, e3, e13, e23, e123].
pub type Multivector = [f64; 8];

/// The sign of the product of basis blades `a` and `b` (Euclidean metric):
/// (-1)^(number of transpositions to bring the product to canonical order).
fn blade_sign(a: usize, b: usize) -> f64 {
    let mut x = a >> 1;
    let mut swaps = 0;
    while x != 0 {
        swaps += (x & b).count_ones();
        x >>= 1;
    }
    if swaps % 2 == 0 {
        1.0
    } else {
        -1.0
    }
}

/// The geometric product `a b`.
pub fn gp(a: &Multivector, b: &Multivector) -> Multivector {
    let mut r = [0.0; 8];
    for i in 0..8 {
        for j in 0..8 {
            r[i ^ j] += blade_sign(i, j) * a[i] * b[j];
        }
    }
    r
}

/// The reverse `R̃`: grade k gets (-1)^(k(k-1)/2).
pub fn reverse(a: &Multivector) -> Multivector {
    let mut r = *a;
    for (i, x) in r.iter_mut().enumerate() {
        let k = i.count_ones();
        if (k * (k.saturating_sub(1)) / 2) % 2 == 1 {
            *x = -*x;
        }
    }
    r
}

/// The 3x3 matrix (row-major) of `x -> R x R̃` on vectors.
pub fn sandwich_matrix(r: &Multivector) -> [f32; 9] {
    let rr = reverse(r);
    let basis = [1usize, 2, 4]; // e1, e2, e3
    let mut m = [0.0f32; 9];
    for (j, &ej) in basis.iter().enumerate() {
        let mut e = [0.0; 8];
        e[ej] = 1.0;
        let img = gp(&gp(r, &e), &rr);
        for (i, &ei) in basis.iter().enumerate() {
            m[i * 3 + j] = img[ei] as f32;
        }
    }
    m
}

/// A seeded unit rotor (uniform over rotations: a uniform point of S^3 as
/// scalar + bivector coefficients).
pub fn random_rotor(rng: &mut Rng) -> Multivector {
    let v = [rng.normal(), rng.normal(), rng.normal(), rng.normal()];
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut r = [0.0; 8];
    r[0] = v[0] / n; // scalar
    r[3] = v[1] / n; // e12
    r[5] = v[2] / n; // e13
    r[6] = v[3] / n; // e23
    r
}

/// One seeded rotor per group of 3 channels.
pub fn rotors(d: i32, seed: u64) -> Rotation {
    let mut rng = Rng::new(seed);
    let groups = d / 3;
    let mats = (0..groups).flat_map(|_| sandwich_matrix(&random_rotor(&mut rng))).collect();
    Rotation::Blocks { n: 3, groups, mats, d }
}

pub fn rotor(name: &'static str, bits: i32, qjl: bool) -> RotatedCodec {
    RotatedCodec::new(name, bits, qjl, NormMode::Preserve, SEED, rotors)
}
