//! PlanarQuant: `planar4`, `planar3`. A 2-D Givens rotation per channel pair
//! `(2i, 2i+1)`, angles seeded and uniform in [0, 2π), then the same scalar
//! quantizer as TurboQuant: per-vector norm + Lloyd-Max codebook of the
//! unit-vector coordinate marginal (norm-preserving, see [`NormMode`]).
//! O(D) per vector. An odd last channel passes unrotated.
//!
//! A pair rotation does not spread an outlier channel over the whole vector
//! (TurboQuant's rotation does), so on keys with a few huge channels the
//! codebook fits worse; see the tests for numbers.
use crate::{
    quant::NormMode,
    rotated::RotatedCodec,
    rotation::{Rng, Rotation},
};

pub const SEED: u64 = 0x706C_616E_6172_0001;

/// Seeded Givens blocks [[c, -s], [s, c]] for `d / 2` pairs.
pub fn givens(d: i32, seed: u64) -> Rotation {
    let mut rng = Rng::new(seed);
    let groups = d / 2;
    let mats = (0..groups)
        .flat_map(|_| {
            let t = 2.0 * std::f64::consts::PI * rng.uniform();
            let (s, c) = (t.sin() as f32, t.cos() as f32);
            [c, -s, s, c]
        })
        .collect();
    Rotation::Blocks { n: 2, groups, mats, d }
}

pub fn planar(name: &'static str, bits: i32) -> RotatedCodec {
    RotatedCodec::new(name, bits, false, NormMode::Preserve, SEED, givens)
}
