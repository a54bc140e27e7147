//! Lloyd-Max scalar codebooks for one coordinate of a random unit vector.
//!
//! After a uniformly random rotation, each coordinate `t` of a unit vector in
//! `R^D` has the density `f(t) ∝ (1 - t²)^((D-3)/2)` on `[-1, 1]` (the exact
//! marginal; close to `N(0, 1/D)` for large `D`). The codebook is the
//! Lloyd-Max quantizer of that density: levels that are the conditional means
//! of their cells, cells split at the midpoints between levels. Computed here
//! once per (D, bits), deterministically, by Lloyd's iteration on a fine grid.
use std::f64::consts::PI;

/// A scalar codebook: `levels` ascending, `mids[i]` the boundary between
/// levels `i` and `i + 1`.
#[derive(Debug, Clone)]
pub struct Codebook {
    pub levels: Vec<f32>,
    pub mids: Vec<f32>,
    /// Expected `||y - ĉ||²` of a unit vector (D times the per-coordinate
    /// distortion): the MSE of the quantizer on unit vectors, as the paper
    /// states it (b = 1, 2, 3, 4: about 0.36, 0.117, 0.0345, 0.0095).
    pub distortion: f64,
}

/// Grid points for the numerical integrals.
const GRID: usize = 1 << 16;

/// The Lloyd-Max codebook of `2^bits` levels for a coordinate of a random
/// unit vector in `R^d` (`d >= 3`, `1 <= bits <= 8`).
pub fn sphere_codebook(d: usize, bits: u32) -> Codebook {
    assert!(d >= 3 && (1..=8).contains(&bits), "codebook for d {d}, bits {bits}");
    let n = 1usize << bits;
    // The density beyond 12 standard deviations (1/sqrt(d)) is negligible.
    let tmax = (12.0 / (d as f64).sqrt()).min(1.0);
    let dt = 2.0 * tmax / GRID as f64;
    let ts: Vec<f64> = (0..GRID).map(|i| -tmax + (i as f64 + 0.5) * dt).collect();
    let expo = (d as f64 - 3.0) / 2.0;
    let mut w: Vec<f64> = ts.iter().map(|t| (1.0 - t * t).max(0.0).powf(expo)).collect();
    let total: f64 = w.iter().sum();
    w.iter_mut().for_each(|x| *x /= total);
    // Prefix sums of mass and first moment: cell [a, b) in O(1).
    let mut cm = vec![0.0; GRID + 1];
    let mut cx = vec![0.0; GRID + 1];
    for i in 0..GRID {
        cm[i + 1] = cm[i] + w[i];
        cx[i + 1] = cx[i] + w[i] * ts[i];
    }
    let index = |b: f64| (((b + tmax) / dt).round().max(0.0) as usize).min(GRID);

    // Start from the quantiles of N(0, 1/d) (symmetric), then iterate.
    let sigma = 1.0 / (d as f64).sqrt();
    let mut c: Vec<f64> = (0..n).map(|i| sigma * normal_quantile((i as f64 + 0.5) / n as f64)).collect();
    for _ in 0..1000 {
        let bounds: Vec<usize> = std::iter::once(0)
            .chain((0..n - 1).map(|i| index(0.5 * (c[i] + c[i + 1]))))
            .chain(std::iter::once(GRID))
            .collect();
        let mut moved: f64 = 0.0;
        for i in 0..n {
            let (a, b) = (bounds[i], bounds[i + 1]);
            let m = cm[b] - cm[a];
            if m > 0.0 {
                let next = (cx[b] - cx[a]) / m;
                moved = moved.max((next - c[i]).abs());
                c[i] = next;
            }
        }
        if moved < 1e-12 {
            break;
        }
    }
    // Symmetrize exactly (the density is even).
    for i in 0..n / 2 {
        let m = 0.5 * (c[n - 1 - i] - c[i]);
        c[i] = -m;
        c[n - 1 - i] = m;
    }
    let mids: Vec<f64> = (0..n - 1).map(|i| 0.5 * (c[i] + c[i + 1])).collect();
    let mut dist = 0.0;
    let mut k = 0;
    for (i, &t) in ts.iter().enumerate() {
        while k < n - 1 && t >= mids[k] {
            k += 1;
        }
        dist += w[i] * (t - c[k]).powi(2);
    }
    Codebook {
        levels: c.iter().map(|&x| x as f32).collect(),
        mids: mids.iter().map(|&x| x as f32).collect(),
        distortion: dist * d as f64,
    }
}

/// The standard normal quantile (Acklam's rational approximation; only a
/// starting point for Lloyd's iteration).
fn normal_quantile(p: f64) -> f64 {
    let a = [-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.357751867269, -30.66479806614716, 2.506628277459239];
    let b = [-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972, -13.28068155288572];
    let c = [-7.784894002430293e-03, -0.3223964580411365, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
    let d = [7.784695709041462e-03, 0.3224671290700398, 2.445134137142996, 3.754408661907416];
    let tail = |q: f64| (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0)
    }
}

/// `sqrt(pi / 2)`: the QJL estimator's constant.
pub fn qjl_const() -> f32 {
    (PI / 2.0).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_d_matches_gaussian_lloyd_max() {
        // Known Lloyd-Max quantizers of N(0, 1): positive levels and MSE.
        let known: [(u32, &[f64], f64); 3] = [
            (1, &[0.7979], 0.3634),
            (2, &[0.4528, 1.5104], 0.1175),
            (3, &[0.2451, 0.7560, 1.3439, 2.1519], 0.03454),
        ];
        let d = 4096usize;
        for (bits, pos, mse) in known {
            let cb = sphere_codebook(d, bits);
            let s = (d as f64).sqrt();
            let n = cb.levels.len();
            for (i, &want) in pos.iter().enumerate() {
                let got = cb.levels[n / 2 + i] as f64 * s;
                assert!((got - want).abs() < 2e-3, "bits {bits} level {i}: {got} vs {want}");
            }
            assert!((cb.distortion - mse).abs() < 2e-3 * mse.max(0.1), "bits {bits}: {} vs {mse}", cb.distortion);
        }
        assert!((sphere_codebook(d, 4).distortion - 0.009497).abs() < 1e-4);
    }

    #[test]
    fn small_d_uses_the_exact_marginal() {
        // At D = 64 the Beta marginal has lighter tails than N(0, 1/64): the
        // outer levels sit slightly inside the Gaussian ones, and the
        // distortion is a little lower.
        let cb = sphere_codebook(64, 3);
        let g = 2.1519 / 8.0;
        assert!(cb.levels[7] < g && cb.levels[7] > 0.95 * g, "{:?}", cb.levels);
        assert!(cb.distortion < 0.0346 && cb.distortion > 0.030, "{}", cb.distortion);
        assert_eq!(cb.mids.len(), 7);
        assert_eq!(cb.mids[3], 0.0);
    }
}
