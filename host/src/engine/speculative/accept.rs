//! Which draft tokens the verifier keeps: pure functions over token ids and
//! probability vectors, so the rules are tested on their own.
//!
//! - Greedy: the longest run of draft tokens equal to the verifier's argmax
//!   at their position, then the verifier's own token after that run (its
//!   correction, or the bonus token when every draft was kept).
//! - Sampling (Leviathan et al. 2023, Chen et al. 2023): draft token x_i was
//!   drawn from the drafter's distribution q_i; keep it with probability
//!   min(1, p_i(x_i) / q_i(x_i)), p_i being the verifier's; at the first
//!   rejection draw from normalize(max(0, p_i - q_i)) and stop; when all are
//!   kept draw the bonus token from p_k. Every emitted token is then
//!   distributed exactly as p (the verifier's sampler: temperature, top-k,
//!   min-p, top-p, penalties), whatever q is.
use rand::Rng;

/// Greedy acceptance. `target[i]` is the verifier's token after the
/// context plus `draft[..i]` (so `target.len() == draft.len() + 1`).
/// Returns (draft tokens kept, the verifier's token that follows them).
pub fn accept_greedy(draft: &[u32], target: &[u32]) -> (usize, u32) {
    assert_eq!(target.len(), draft.len() + 1, "the verifier scores every draft position and one more");
    accept_greedy_with(draft, |i| target[i])
}

/// Greedy acceptance with the verifier's token at position i computed on
/// demand (`target(i)`, called in order and only as far as needed): a
/// constrained row's position i needs its constraint advanced through
/// `draft[..i]` first.
pub fn accept_greedy_with(draft: &[u32], mut target: impl FnMut(usize) -> u32) -> (usize, u32) {
    for (i, &d) in draft.iter().enumerate() {
        let t = target(i);
        if t != d {
            return (i, t);
        }
    }
    (draft.len(), target(draft.len()))
}

/// Rejection-sampling acceptance. `q[i]` is the distribution draft token
/// `draft[i]` was drawn from; `p(i)` the verifier's distribution at
/// position i (after the context plus `draft[..i]`), for i in 0..=k; it is
/// called in order and only as far as needed. Returns (draft tokens kept,
/// the token that follows them).
pub fn accept_sampled<R: Rng>(
    draft: &[u32],
    q: &[Vec<f32>],
    mut p: impl FnMut(usize) -> Vec<f32>,
    rng: &mut R,
) -> (usize, u32) {
    assert_eq!(draft.len(), q.len(), "one drafter distribution per draft token");
    for (i, (&x, qi)) in draft.iter().zip(q).enumerate() {
        let pi = p(i);
        let (px, qx) = (pi[x as usize] as f64, qi[x as usize] as f64);
        // qx > 0: x was drawn from q_i. px >= qx always keeps it.
        let u: f64 = rng.random();
        if qx > 0.0 && u * qx < px {
            continue;
        }
        return (i, draw(&residual(&pi, qi), rng).unwrap_or_else(|| draw(&pi, rng).unwrap_or(x)));
    }
    let k = draft.len();
    let pk = p(k);
    (k, draw(&pk, rng).unwrap_or(0))
}

/// max(0, p - q), unnormalized (`draw` normalizes).
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect()
}

/// A token drawn from `weights` (non-negative, any total); None when they
/// are all zero.
pub fn draw<R: Rng>(weights: &[f32], rng: &mut R) -> Option<u32> {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    // Also None for a NaN total.
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let mut r = rng.random::<f64>() * total;
    let mut last = None;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            if r < w as f64 {
                return Some(i as u32);
            }
            r -= w as f64;
            last = Some(i as u32);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::super::stats::chi_square_p;
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn greedy_keeps_the_longest_matching_run_then_the_verifiers_token() {
        assert_eq!(accept_greedy(&[5, 6, 7], &[5, 6, 7, 8]), (3, 8));
        assert_eq!(accept_greedy(&[5, 6, 7], &[5, 9, 7, 8]), (1, 9));
        assert_eq!(accept_greedy(&[5, 6, 7], &[1, 6, 7, 8]), (0, 1));
        assert_eq!(accept_greedy(&[], &[4]), (0, 4));
        // On demand: positions past the first mismatch are never asked for.
        let mut asked = Vec::new();
        let r = accept_greedy_with(&[5, 6, 7], |i| {
            asked.push(i);
            [5, 9, 7, 8][i]
        });
        assert_eq!((r, asked), ((1, 9), vec![0, 1]));
    }

    #[test]
    fn one_hot_distributions_reduce_to_greedy() {
        let hot = |i: usize| {
            let mut v = vec![0.0; 6];
            v[i] = 1.0;
            v
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let target = [2usize, 3, 4, 5];
        for (draft, want) in [(vec![2, 3, 4], (3, 5)), (vec![2, 1, 4], (1, 3)), (vec![0, 3, 4], (0, 2))] {
            let q: Vec<Vec<f32>> = draft.iter().map(|&d| hot(d as usize)).collect();
            for _ in 0..20 {
                assert_eq!(accept_sampled(&draft, &q, |i| hot(target[i]), &mut rng), want);
            }
        }
    }

    #[test]
    fn draw_skips_zero_weights_and_refuses_all_zero() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let t = draw(&[0.0, 2.0, 0.0, 1.0, 0.0], &mut rng).unwrap();
            assert!(t == 1 || t == 3);
        }
        assert_eq!(draw(&[0.0, 0.0], &mut rng), None);
        assert_eq!(draw(&[], &mut rng), None);
    }

    fn normalize(v: &[f32]) -> Vec<f32> {
        let s: f32 = v.iter().sum();
        v.iter().map(|x| x / s).collect()
    }

    /// One round over fixed distributions: the first emitted token follows
    /// p_0 whatever q is (q zero where p is not, and the reverse; q equal
    /// to p; q far from p).
    #[test]
    fn the_first_emitted_token_follows_the_verifiers_distribution() {
        let p0 = normalize(&[0.3, 0.0, 0.25, 0.05, 0.4, 0.0]);
        let p1 = normalize(&[0.1, 0.2, 0.3, 0.4, 0.0, 0.0]);
        let cases = [
            normalize(&[0.0, 0.5, 0.1, 0.1, 0.0, 0.3]),
            p0.clone(),
            normalize(&[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]),
            normalize(&[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
        ];
        for (c, q0) in cases.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(100 + c as u64);
            let mut counts = vec![0u64; 6];
            for _ in 0..60_000 {
                let d0 = draw(q0, &mut rng).unwrap();
                let d1 = draw(&p1, &mut rng).unwrap();
                let ps = [p0.clone(), p1.clone(), p1.clone()];
                let (n, next) = accept_sampled(&[d0, d1], &[q0.clone(), p1.clone()], |i| ps[i].clone(), &mut rng);
                counts[if n == 0 { next } else { d0 } as usize] += 1;
            }
            let exp: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
            let pv = chi_square_p(&counts, &exp);
            assert!(pv > 1e-3, "case {c}: counts {counts:?} vs p {p0:?}: chi-square p-value {pv}");
        }
    }

    /// Whole generations from synthetic Markov "models" over 5 tokens (the
    /// verifier's and the drafter's next-token distributions depend on the
    /// previous token): three tokens emitted by speculative rounds of k = 2
    /// (drafts, acceptance, correction or bonus, the next round from what was
    /// kept) have the joint distribution of three tokens drawn from the
    /// verifier alone: chi-square over the 125 sequences.
    #[test]
    fn speculative_generations_follow_the_verifiers_joint_distribution() {
        const V: usize = 5;
        let p_rows: Vec<Vec<f32>> = (0..V)
            .map(|prev| normalize(&(0..V).map(|t| 1.0 + ((prev * 7 + t * 3) % 5) as f32 + if t == prev { 0.0 } else { 1.5 }).collect::<Vec<_>>()))
            .collect();
        let q_rows: Vec<Vec<f32>> = (0..V)
            .map(|prev| normalize(&(0..V).map(|t| if t == (prev + 1) % V { 6.0 } else if t == 4 { 0.0 } else { 1.0 }).collect::<Vec<_>>()))
            .collect();
        let start = 2usize;
        let mut counts = vec![0u64; V * V * V];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut drafted, mut kept) = (0, 0);
        for _ in 0..100_000 {
            let mut out: Vec<u32> = Vec::new();
            while out.len() < 3 {
                let last = *out.last().unwrap_or(&(start as u32)) as usize;
                let k = 2.min(3 - out.len() - 1);
                let (mut d, mut q, mut prev) = (Vec::new(), Vec::new(), last);
                for _ in 0..k {
                    let t = draw(&q_rows[prev], &mut rng).unwrap();
                    q.push(q_rows[prev].clone());
                    d.push(t);
                    prev = t as usize;
                }
                let ctx: Vec<usize> = std::iter::once(last).chain(d.iter().map(|&t| t as usize)).collect();
                let (n, next) = accept_sampled(&d, &q, |i| p_rows[ctx[i]].clone(), &mut rng);
                drafted += k;
                kept += n;
                out.extend(&d[..n]);
                out.push(next);
            }
            counts[out[0] as usize * V * V + out[1] as usize * V + out[2] as usize] += 1;
        }
        let mut exp = vec![0.0f64; V * V * V];
        for a in 0..V {
            for b in 0..V {
                for c in 0..V {
                    exp[a * V * V + b * V + c] = p_rows[start][a] as f64 * p_rows[a][b] as f64 * p_rows[b][c] as f64;
                }
            }
        }
        let pv = chi_square_p(&counts, &exp);
        assert!(pv > 1e-3, "chi-square p-value {pv}");
        // Both paths ran: some drafts kept, some rejected.
        assert!(kept > drafted / 10 && kept < drafted * 9 / 10, "{kept} of {drafted} kept");
    }
}
