//! Seeded orthogonal rotations along the last axis, and the seeded RNG.
//!
//! Every rotation is orthogonal, so `inverse(forward(x)) == x` and inner
//! products are kept: `forward(q) · forward(k) == q · k`. That is what lets
//! the rotation families rotate the query instead of un-rotating keys.
use mlx_rs::{
    ops::{concatenate, matmul},
    Array, Dtype,
};
use rmlx_plugin_api::author::Result;

/// SplitMix64: a small, fixed, portable generator (the seeds are part of the
/// stored format: a block encoded today must decode the same tomorrow).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// ±1 with equal probability.
    pub fn sign(&mut self) -> f32 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

/// An orthogonal map of the last axis (length `d`).
#[derive(Debug, Clone)]
pub enum Rotation {
    /// `y = H (s ⊙ x) / sqrt(D)`: Walsh-Hadamard with random signs, `D` a
    /// power of two (MLX's `hadamard_transform`, O(D log D)).
    Hadamard { signs: Vec<f32> },
    /// `y = x Q` with `Q` `[D, D]` orthogonal (row-major).
    Dense { q: Vec<f32>, d: i32 },
    /// Block-diagonal: channel groups of `n`, `y_g = M_g x_g` with `mats`
    /// `[groups, n, n]` row-major; channels past `groups * n` pass unchanged.
    Blocks { n: i32, groups: i32, mats: Vec<f32>, d: i32 },
}

impl Rotation {
    /// Hadamard with seeded signs when `d` is a power of two, else a dense
    /// seeded orthogonal matrix (QR of a Gaussian matrix).
    pub fn hadamard_or_dense(d: i32, seed: u64) -> Self {
        if d > 0 && (d & (d - 1)) == 0 {
            let mut rng = Rng::new(seed);
            Rotation::Hadamard { signs: (0..d).map(|_| rng.sign()).collect() }
        } else {
            Self::dense(d, seed)
        }
    }

    /// A seeded random orthogonal `[d, d]` (modified Gram-Schmidt on a
    /// Gaussian matrix, in f64: Haar-distributed up to column signs).
    pub fn dense(d: i32, seed: u64) -> Self {
        let n = d as usize;
        let mut rng = Rng::new(seed);
        // Columns of `a` become the orthonormal basis.
        let mut a: Vec<Vec<f64>> = (0..n).map(|_| (0..n).map(|_| rng.normal()).collect()).collect();
        for j in 0..n {
            let (done, rest) = a.split_at_mut(j);
            let col = &mut rest[0];
            for prev in done.iter() {
                let dot: f64 = col.iter().zip(prev).map(|(x, y)| x * y).sum();
                col.iter_mut().zip(prev).for_each(|(x, y)| *x -= dot * y);
            }
            let norm = a[j].iter().map(|x| x * x).sum::<f64>().sqrt();
            a[j].iter_mut().for_each(|x| *x /= norm);
        }
        // Q[i][j] = a[j][i]
        let q = (0..n).flat_map(|i| a.iter().map(move |col| col[i] as f32).collect::<Vec<_>>()).collect();
        Rotation::Dense { q, d }
    }

    /// `x` [.., D] -> float32 [.., D].
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let x = x.as_dtype(Dtype::Float32)?;
        match self {
            Rotation::Hadamard { signs } => {
                let s = Array::from_slice(signs, &[signs.len() as i32]);
                Ok(x.multiply(&s)?.hadamard_transform(None)?)
            }
            Rotation::Dense { q, d } => Ok(matmul(&x, Array::from_slice(q, &[*d, *d]))?),
            Rotation::Blocks { .. } => self.blocks(&x, false),
        }
    }

    /// `y` [.., D] -> float32 [.., D], the inverse (transpose) of `forward`.
    pub fn inverse(&self, y: &Array) -> Result<Array> {
        let y = y.as_dtype(Dtype::Float32)?;
        match self {
            Rotation::Hadamard { signs } => {
                let s = Array::from_slice(signs, &[signs.len() as i32]);
                Ok(y.hadamard_transform(None)?.multiply(&s)?)
            }
            Rotation::Dense { q, d } => Ok(matmul(&y, Array::from_slice(q, &[*d, *d]).t())?),
            Rotation::Blocks { .. } => self.blocks(&y, true),
        }
    }

    /// The block-diagonal map (or its transpose) on float32 `x` [.., D].
    fn blocks(&self, x: &Array, transpose: bool) -> Result<Array> {
        let Rotation::Blocks { n, groups, mats, d } = self else { unreachable!() };
        let (n, g, d) = (*n, *groups, *d);
        let gn = g * n;
        let lead: Vec<i32> = x.shape()[..x.ndim() - 1].to_vec();
        let head = if gn == d { x.clone() } else { x.take_axis(Array::from_iter(0..gn, &[gn]), -1)? };
        // M [G, n, n] (or M^T); y[.., g, i] = sum_j M[g, i, j] x[.., g, j]
        let mut m = Array::from_slice(mats, &[g, n, n]);
        if transpose {
            m = m.transpose_axes(&[0, 2, 1])?;
        }
        let mut s = lead.clone();
        s.extend([g, 1, n]);
        let y = head.reshape(&s)?.multiply(&m)?.sum_axis(-1, false)?; // [.., G, n]
        let mut flat = lead.clone();
        flat.push(gn);
        let y = y.reshape(&flat)?;
        if gn == d {
            Ok(y)
        } else {
            let tail = x.take_axis(Array::from_iter(gn..d, &[d - gn]), -1)?;
            Ok(concatenate(&[y, tail], -1)?)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// forward(I) as a row-major [d, d] matrix.
    pub(crate) fn matrix(r: &Rotation, d: i32) -> Vec<f32> {
        let eye: Vec<f32> = (0..d * d).map(|i| if i / d == i % d { 1.0 } else { 0.0 }).collect();
        r.forward(&Array::from_slice(&eye, &[d, d])).unwrap().as_slice::<f32>().to_vec()
    }

    pub(crate) fn assert_orthogonal(r: &Rotation, d: i32) {
        let m = matrix(r, d);
        let n = d as usize;
        for i in 0..n {
            for j in 0..n {
                let dot: f32 = (0..n).map(|k| m[i * n + k] * m[j * n + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "({i}, {j}): {dot}");
            }
        }
        // inverse undoes forward
        let x = Array::from_iter((0..3 * d).map(|i| ((i * 37 % 11) as f32) - 5.0), &[3, d]);
        let back = r.inverse(&r.forward(&x).unwrap()).unwrap();
        let diff = back.subtract(&x).unwrap().abs().unwrap().max(None).unwrap().item_cast::<f32>();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn hadamard_and_dense_are_orthogonal() {
        assert!(matches!(Rotation::hadamard_or_dense(64, 7), Rotation::Hadamard { .. }));
        assert!(matches!(Rotation::hadamard_or_dense(96, 7), Rotation::Dense { .. }));
        for d in [64, 128, 96, 80] {
            assert_orthogonal(&Rotation::hadamard_or_dense(d, 7), d);
        }
    }

    #[test]
    fn seeds_are_deterministic() {
        let a = matrix(&Rotation::hadamard_or_dense(96, 3), 96);
        let b = matrix(&Rotation::hadamard_or_dense(96, 3), 96);
        let c = matrix(&Rotation::hadamard_or_dense(96, 4), 96);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
