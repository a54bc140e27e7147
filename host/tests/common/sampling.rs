//! The exact distribution of short sampled continuations, for the
//! chi-square tests of speculative sampling.
use rmlx::engine::sampler::{Sampler, SamplingParams};
use rmlx::engine::{LoadedModel, Session};

/// Every 3-token continuation of `prompt` that plain sampling under `params`
/// can produce from `target`, with its probability. `mask` runs after the
/// sampler's processing, given the tokens generated before (a logits hook's
/// part; a no-op for none).
pub fn three_token_sequences(
    target: &mut LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    mask: impl Fn(&[u32], &mut Vec<f32>),
) -> Vec<(Vec<u32>, f64)> {
    let mut dist_after = |generated: &[u32]| -> Vec<f32> {
        let mut s = Session::new(target);
        let mut logits = s.prefill(prompt).unwrap();
        for &t in generated {
            logits = s.step(t).unwrap();
        }
        let mut sampler = Sampler::with_params(params.clone());
        sampler.set_prompt(prompt);
        for &t in generated {
            sampler.accept(t);
        }
        sampler.process(&mut logits);
        mask(generated, &mut logits);
        sampler.distribution(&logits)
    };
    let support = |p: &[f32]| -> Vec<u32> { (0..p.len() as u32).filter(|&i| p[i as usize] > 0.0).collect() };
    let mut expected = Vec::new();
    let p0 = dist_after(&[]);
    for a in support(&p0) {
        let p1 = dist_after(&[a]);
        for b in support(&p1) {
            let p2 = dist_after(&[a, b]);
            for c in support(&p2) {
                expected.push((vec![a, b, c], p0[a as usize] as f64 * p1[b as usize] as f64 * p2[c as usize] as f64));
            }
        }
    }
    expected
}
