//! IsoQuant: `iso4`, `iso3`. Each group of 4 channels is a quaternion `p`
//! rotated by left multiplication with a seeded unit quaternion `q`
//! (`p -> q ⊗ p`, an isoclinic rotation of R^4, uniform `q` on S^3), then
//! TurboQuant's scalar quantizer (per-vector norm + Lloyd-Max codebook,
//! norm-preserving). Channels past the last full group pass unrotated.
use crate::{
    quant::NormMode,
    rotated::RotatedCodec,
    rotation::{Rng, Rotation},
};

pub const SEED: u64 = 0x6973_6F71_7561_0001;

/// The matrix of `p -> q ⊗ p` for `q = (a, b, c, d)` (w, x, y, z), row-major.
pub fn left_mul(q: [f64; 4]) -> [f32; 16] {
    let [a, b, c, d] = q;
    [a, -b, -c, -d, b, a, -d, c, c, d, a, -b, d, -c, b, a].map(|x| x as f32)
}

/// Seeded uniform unit quaternions, one per group of 4 channels.
pub fn quaternions(d: i32, seed: u64) -> Rotation {
    let mut rng = Rng::new(seed);
    let groups = d / 4;
    let mats = (0..groups)
        .flat_map(|_| {
            let q = [rng.normal(), rng.normal(), rng.normal(), rng.normal()];
            let n = q.iter().map(|x| x * x).sum::<f64>().sqrt();
            left_mul(q.map(|x| x / n))
        })
        .collect();
    Rotation::Blocks { n: 4, groups, mats, d }
}

pub fn iso(name: &'static str, bits: i32) -> RotatedCodec {
    RotatedCodec::new(name, bits, false, NormMode::Preserve, SEED, quaternions)
}
