//! TurboQuant (arXiv 2504.19874): `turbo4`, `turbo3`, `turbo2`, and the QJL
//! variants `turbo4q`, `turbo3q` for keys.
//!
//! - Rotation: Walsh-Hadamard with seeded random signs when head_dim is a
//!   power of two (64, 128, 256: MLX's `hadamard_transform`); otherwise a
//!   seeded dense random orthogonal matrix (QR of a Gaussian matrix), e.g.
//!   head_dim 80 or 96.
//! - Quantizer: per-vector L2 norm, Lloyd-Max codebook of the exact
//!   coordinate marginal of a random unit vector in R^D ([`crate::codebook`]),
//!   `b` bits per coordinate, bit-plane packed.
//! - `turboNq`: `N - 1` codebook bits plus the 1-bit QJL residual
//!   (TurboQuant_prod): unbiased `q·k` estimates, at the cost of variance.
//!
//! Bits per value: `b + 16/D` with a bf16/f16 norm (turbo3 at D = 128:
//! 3.125), `b + 32/D` with QJL (its residual norm).
use crate::{quant::NormMode, rotated::RotatedCodec, rotation::Rotation};

pub const SEED: u64 = 0x7475_7262_6F71_0001;

fn rotation(d: i32, seed: u64) -> Rotation {
    Rotation::hadamard_or_dense(d, seed)
}

/// `turbo{bits}` (`qjl`: `turbo{bits}q`).
pub fn turbo(name: &'static str, bits: i32, qjl: bool) -> RotatedCodec {
    RotatedCodec::new(name, bits, qjl, NormMode::Preserve, SEED, rotation)
}
