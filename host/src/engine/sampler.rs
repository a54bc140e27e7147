//! Token sampling in the host, on f32 logits (deterministic per seed, on any
//! backend).
//!
//! Order, as mlx-lm: logit processors first (`logit_bias`, the repetition
//! penalty over the last `repetition_context` tokens, OpenAI's presence and
//! frequency penalties over the generated tokens), then an optional mask from
//! the caller (constrained decoding), then the sampler: `top_k`, `top_p` and
//! `min_p` filter on the untempered distribution, and the token is drawn from
//! what is left at `temperature` (argmax when it is 0). Log-probabilities are
//! those of the processed (and masked) distribution at temperature 1.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Everything that decides the next token.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off. Divides positive logits and multiplies negative ones of tokens
    /// seen in the last `repetition_context` tokens (prompt included).
    pub repetition_penalty: f32,
    pub repetition_context: usize,
    /// Subtracted once from every token generated so far.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// Added to the logit of a token id.
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same tokens.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context: 20,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// One sampled token with its log-probability and, when asked, the most
/// likely alternatives (most likely first).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Clone: speculative decoding processes draft positions on a copy whose
/// history runs ahead of the accepted tokens.
#[derive(Clone)]
pub struct Sampler {
    p: SamplingParams,
    rng: ChaCha8Rng,
    /// Prompt (for the repetition penalty) then generated tokens.
    history: Vec<u32>,
    prompt_len: usize,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// Temperature and top-p only (what `rmlx generate` takes).
    pub fn new(temperature: f32, top_p: f32, seed: Option<u64>) -> Self {
        Self::with_params(SamplingParams { temperature, top_p, seed, ..SamplingParams::default() })
    }

    pub fn with_params(p: SamplingParams) -> Self {
        let rng = match p.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { p, rng, history: Vec::new(), prompt_len: 0, counts: HashMap::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.p
    }

    /// The prompt, seen by the repetition penalty.
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        self.history = prompt.to_vec();
        self.prompt_len = prompt.len();
        self.counts.clear();
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Greedy with nothing that changes the logits: the device's argmax is
    /// the token (the engine then skips copying the logits to the host).
    pub fn is_plain_greedy(&self) -> bool {
        self.p.temperature <= 0.0
            && self.p.logit_bias.is_empty()
            && self.p.repetition_penalty == 1.0
            && self.p.presence_penalty == 0.0
            && self.p.frequency_penalty == 0.0
    }

    /// Greedy with at most a `logit_bias` (no penalties, which depend on the
    /// history): the engine adds the bias on the device and takes the argmax
    /// there (`device_bias`).
    pub fn is_device_greedy(&self) -> bool {
        self.p.temperature <= 0.0
            && self.p.repetition_penalty == 1.0
            && self.p.presence_penalty == 0.0
            && self.p.frequency_penalty == 0.0
    }

    /// Applies logit_bias and the penalties in place.
    pub fn process(&self, logits: &mut [f32]) {
        for &(id, b) in &self.p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if self.p.repetition_penalty != 1.0 && self.p.repetition_context > 0 {
            let start = self.history.len().saturating_sub(self.p.repetition_context);
            let mut seen: Vec<u32> = self.history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * self.p.repetition_penalty } else { *l / self.p.repetition_penalty };
                }
            }
        }
        if self.p.presence_penalty != 0.0 || self.p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= self.p.presence_penalty + self.p.frequency_penalty * n as f32;
                }
            }
        }
    }

    /// Records a token as generated (for the penalties).
    pub fn accept(&mut self, token: u32) {
        self.history.push(token);
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Processes, samples and records one token (no logprobs).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut l = logits.to_vec();
        self.process(&mut l);
        let t = self.choose(&l);
        self.accept(t);
        t
    }

    /// Chooses a token from already processed (and masked) logits, records it,
    /// and returns its log-probability and the `top_n` most likely tokens.
    pub fn sample_processed(&mut self, logits: &[f32], top_n: Option<usize>) -> Sampled {
        let token = self.choose(logits);
        self.accept(token);
        logprobs(logits, token, top_n)
    }

    /// The sampling chain on processed logits; does not record.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        let cand = match self.candidates(logits) {
            Some(c) => c,
            None => return argmax(logits),
        };
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in &cand {
            if r < c.1 {
                return c.0;
            }
            r -= c.1;
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }

    /// The distribution `choose` draws from, as probabilities over the
    /// vocabulary (zero outside what top-k, min-p and top-p keep; one-hot
    /// at the argmax when greedy). Speculative decoding's acceptance uses
    /// it for the verifier and the drafter alike.
    pub fn distribution(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; logits.len()];
        match self.candidates(logits) {
            Some(cand) => {
                let total: f32 = cand.iter().map(|c| c.1).sum();
                for (id, w) in cand {
                    out[id as usize] = w / total;
                }
            }
            None if logits.is_empty() => {}
            None => out[argmax(logits) as usize] = 1.0,
        }
        out
    }

    /// The tokens `choose` may draw, with their weights at `temperature`
    /// (unnormalized), after top-k, min-p and top-p; None when greedy (or
    /// nothing is finite): the argmax is the token.
    fn candidates(&self, logits: &[f32]) -> Option<Vec<(u32, f32)>> {
        if self.p.temperature <= 0.0 {
            return None;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // (id, untempered probability up to a constant, logit)
        let mut cand: Vec<(u32, f32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, &l)| l > f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, (l - max).exp(), l))
            .collect();
        if cand.is_empty() {
            return None;
        }
        let filtering = (self.p.top_k > 0 && self.p.top_k < cand.len())
            || (self.p.top_p > 0.0 && self.p.top_p < 1.0)
            || self.p.min_p > 0.0;
        if filtering {
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if self.p.top_k > 0 && self.p.top_k < cand.len() {
                cand.truncate(self.p.top_k);
            }
            if self.p.min_p > 0.0 {
                // relative to the most likely token (probabilities share the constant)
                let floor = cand[0].1 * self.p.min_p;
                cand.retain(|c| c.1 >= floor);
            }
            if self.p.top_p > 0.0 && self.p.top_p < 1.0 {
                let total: f32 = cand.iter().map(|c| c.1).sum();
                let mut acc = 0.0;
                let mut keep = cand.len();
                for (i, c) in cand.iter().enumerate() {
                    acc += c.1 / total;
                    if acc >= self.p.top_p {
                        keep = i + 1;
                        break;
                    }
                }
                cand.truncate(keep);
            }
        }
        Some(cand.iter().map(|c| (c.0, ((c.2 - max) / self.p.temperature).exp())).collect())
    }
}

/// `token` with its log-probability and the `top_n` most likely tokens
/// under already processed (and masked) `logits` at temperature 1: what a
/// request's `logprobs` reports (plain decoding, and speculative decoding
/// at each verified position). None: no logprobs (0 and no alternatives).
pub fn logprobs(logits: &[f32], token: u32, top_n: Option<usize>) -> Sampled {
    let (logprob, top) = match top_n {
        Some(n) => {
            let lse = logsumexp(logits);
            let lp = logits[token as usize] - lse;
            let top = top_indices(logits, n).into_iter().map(|i| (i, logits[i as usize] - lse)).collect();
            (lp, top)
        }
        None => (0.0, Vec::new()),
    };
    Sampled { token, logprob, top }
}

fn logsumexp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let s: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// The `n` largest logits' indices, largest first (ties: lower id first).
fn top_indices(logits: &[f32], n: usize) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx
}

/// Index of the largest logit (the first on ties, like mx.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// top-1 minus top-2 logit.
pub fn margin(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in logits {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    a - b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { temperature: 1.0, ..Default::default() }
    }

    #[test]
    fn greedy_is_argmax_and_logprobs_are_normalized() {
        let mut s = Sampler::with_params(SamplingParams::default());
        let l = [0.0, 2.0, 1.0, 2.0];
        let out = s.sample_processed(&l, Some(3));
        assert_eq!(out.token, 1);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = l.iter().map(|&x| (x - logsumexp(&l)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!((out.logprob - out.top[0].1).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::with_params(SamplingParams { seed: Some(seed), ..params() });
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_min_p_one_are_greedy() {
        let logits = [0.1, 0.5, 0.3, 0.2];
        for p in [SamplingParams { top_k: 1, ..params() }, SamplingParams { min_p: 1.0, ..params() }] {
            let mut s = Sampler::with_params(SamplingParams { seed: Some(1), ..p });
            assert!((0..20).all(|_| s.sample(&logits) == 1));
        }
    }

    #[test]
    fn bias_and_penalties() {
        let mut s = Sampler::with_params(SamplingParams {
            logit_bias: vec![(0, 10.0)],
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&[0.0, 1.0, 0.5]), 0);
        s.accept(0);
        // token 0 seen twice: 10 - 1 - 0.5*2 = 8
        let mut l = vec![0.0, 1.0, 0.5];
        s.process(&mut l);
        assert_eq!(l, vec![8.0, 1.0, 0.5]);
        let mut r = Sampler::with_params(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() });
        r.set_prompt(&[1, 2]);
        let mut l = vec![1.0, 1.0, -1.0];
        r.process(&mut l);
        assert_eq!(l, vec![1.0, 0.5, -2.0]);
    }
}
