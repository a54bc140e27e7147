//! Pearson's chi-square test, for checking that speculative decoding
//! emits tokens with the verifier's distribution (the unit tests here and
//! host/tests/speculative.rs).

/// Upper regularized incomplete gamma Q(a, x): ln Γ by Lanczos'
/// approximation, then the power series below x = a + 1 and Lentz's
/// continued fraction above. P(χ²_k > s) = Q(k / 2, s / 2).
pub fn gamma_q(a: f64, x: f64) -> f64 {
    fn ln_gamma(x: f64) -> f64 {
        let c = [76.18009172947146, -86.50532032941677, 24.01409824083091, -1.231739572450155, 0.1208650973866179e-2, -0.5395239384953e-5];
        let mut y = x;
        let t = x + 5.5 - (x + 0.5) * (x + 5.5).ln();
        let mut s = 1.000000000190015;
        for c in c {
            y += 1.0;
            s += c / y;
        }
        -t + (2.5066282746310005 * s / x).ln()
    }
    if x <= 0.0 {
        return 1.0;
    }
    let gln = ln_gamma(a);
    if x < a + 1.0 {
        let (mut ap, mut sum) = (a, 1.0 / a);
        let mut del = sum;
        for _ in 0..10_000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * (-x + a * x.ln() - gln).exp()
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / 1e-300;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < 1e-300 {
                d = 1e-300;
            }
            c = b + an / c;
            if c.abs() < 1e-300 {
                c = 1e-300;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + a * x.ln() - gln).exp() * h
    }
}

/// Pearson's chi-square p-value of `counts` against probabilities
/// `expected` (0 when a cell of probability 0 has counts).
pub fn chi_square_p(counts: &[u64], expected: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0);
    for (&c, &e) in counts.iter().zip(expected) {
        if e == 0.0 {
            if c > 0 {
                // An outcome of probability 0 happened: no fit at all.
                return 0.0;
            }
            continue;
        }
        let e = e * n as f64;
        stat += (c as f64 - e).powi(2) / e;
        cells += 1;
    }
    gamma_q((cells - 1) as f64 / 2.0, stat / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chi_square_helper_is_calibrated() {
        // P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 18.307) = 0.05,
        // P(chi2_100 > 80) = 0.92966 (scipy's gammaincc).
        assert!((gamma_q(0.5, 3.841 / 2.0) - 0.05).abs() < 1e-4);
        assert!((gamma_q(5.0, 18.307 / 2.0) - 0.05).abs() < 1e-4);
        assert!((gamma_q(50.0, 40.0) - 0.92966).abs() < 1e-4);
        // Counts as expected fit; skewed counts and an impossible outcome do not.
        assert!(chi_square_p(&[250, 250, 500, 0], &[0.25, 0.25, 0.5, 0.0]) > 0.99);
        assert!(chi_square_p(&[300, 200, 500, 0], &[0.25, 0.25, 0.5, 0.0]) < 1e-3);
        assert_eq!(chi_square_p(&[250, 250, 499, 1], &[0.25, 0.25, 0.5, 0.0]), 0.0);
    }
}
