//! One 30 s window's decoding, as openai-whisper's `DecodingTask.run`
//! (mlx-whisper's port): the prompt (`<|startofprev|>` and earlier text,
//! then the SOT sequence) in one forward, which also gives the no-speech
//! probability, then one token at a time under Whisper's logit filters
//! (suppressed tokens, blank suppression at the first position, the
//! timestamp rules), greedy at temperature 0, else sampled from
//! `softmax(logits / temperature)` with the caller's seeded RNG. The
//! log-probabilities summed are those of the filtered logits at temperature
//! 1, as openai-whisper sums them. Also the gzip compression ratio the
//! temperature fallback checks (transcribe.rs).
use super::whisper::{Specials, WhisperModel};
use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One window's decoding result.
#[derive(Debug, Clone)]
pub(super) struct Decoded {
    /// Sampled tokens up to (not including) EOT.
    pub tokens: Vec<u32>,
    /// Sum of the sampled tokens' log-probabilities, EOT's included.
    pub sum_logprob: f64,
    /// `sum_logprob / (tokens + 1)`.
    pub avg_logprob: f32,
    pub no_speech_prob: f32,
}

/// Decodes one window with audio features `xa`: greedy when `temperature`
/// is 0, else sampled with `rng`.
pub(super) fn decode_window(
    model: &mut WhisperModel,
    xa: &mlx_rs::Array,
    sot_seq: &[u32],
    prompt: &[u32],
    timestamps: bool,
    temperature: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Decoded> {
    let sp = model.specials.clone();
    let n_ctx = model.dims.n_text_ctx;
    let sample_len = n_ctx / 2;
    let mut initial = Vec::new();
    if !prompt.is_empty() {
        initial.push(sp.sot_prev);
        initial.extend(&prompt[prompt.len().saturating_sub(n_ctx / 2 - 1)..]);
    }
    let sot_index = initial.len();
    initial.extend(sot_seq);
    let sample_begin = initial.len();

    let mut cache = model.new_cache();
    let first = model.decode(&mut cache, &initial, xa, true)?;
    let no_speech_prob = match sp.no_speech {
        Some(ns) => softmax_at(&first[sot_index], ns as usize),
        None => f32::NAN,
    };
    let mut logits = first.last().cloned().unwrap_or_default();
    let mut tokens = initial;
    let mut sum_logprob = 0f64;
    let mut sampled = 0usize;
    loop {
        apply_filters(&mut logits, &tokens, sample_begin, &sp, timestamps);
        let next = if temperature > 0.0 { sample(&logits, temperature, rng) } else { argmax(&logits) };
        sum_logprob += log_softmax_at(&logits, next) as f64;
        tokens.push(next as u32);
        sampled += 1;
        if next as u32 == sp.eot || sampled >= sample_len || tokens.len() > n_ctx {
            break;
        }
        logits = model.decode(&mut cache, &[next as u32], xa, false)?.pop().unwrap_or_default();
    }
    let mut out: Vec<u32> = tokens[sample_begin..].to_vec();
    // The EOT's log-probability is counted (mlx-whisper adds each step's
    // while the previous token was not EOT).
    if let Some(p) = out.iter().position(|&t| t == sp.eot) {
        out.truncate(p);
    }
    let avg_logprob = (sum_logprob / (out.len() + 1) as f64) as f32;
    Ok(Decoded { tokens: out, sum_logprob, avg_logprob, no_speech_prob })
}

/// A draw from `softmax(logits / temperature)` (openai-whisper's
/// `Categorical(logits=logits / temperature).sample()`); -inf never comes.
fn sample(logits: &[f32], temperature: f32, rng: &mut ChaCha8Rng) -> usize {
    let t = temperature as f64;
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return argmax(logits);
    }
    let w: Vec<f64> = logits.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut r = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &p) in w.iter().enumerate() {
        if p > 0.0 {
            last = i;
            if r < p {
                return i;
            }
            r -= p;
        }
    }
    last
}

/// The gzip compression ratio of `text` (bytes over zlib-compressed bytes,
/// as openai-whisper and faster-whisper compute it to spot repetition).
pub fn compression_ratio(text: &str) -> f32 {
    use std::io::Write;
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return 0.0;
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    if z.write_all(bytes).is_err() {
        return 0.0;
    }
    match z.finish() {
        Ok(c) if !c.is_empty() => bytes.len() as f32 / c.len() as f32,
        _ => 0.0,
    }
}

/// Whisper's logit filters, in mlx-whisper's order: blank suppression at
/// the first sampled position, the suppressed tokens, the timestamp rules.
fn apply_filters(logits: &mut [f32], tokens: &[u32], sample_begin: usize, sp: &Specials, timestamps: bool) {
    let ninf = f32::NEG_INFINITY;
    let set = |logits: &mut [f32], ids: &mut dyn Iterator<Item = usize>| {
        for i in ids {
            if let Some(x) = logits.get_mut(i) {
                *x = ninf;
            }
        }
    };
    if tokens.len() == sample_begin {
        set(logits, &mut sp.begin_suppress.iter().map(|&t| t as usize));
    }
    set(logits, &mut sp.suppress.iter().map(|&t| t as usize));
    if !timestamps {
        return;
    }
    let tb = sp.timestamp_begin as usize;
    let v = logits.len();
    if tb >= v {
        return;
    }
    // <|notimestamps|> is decided by the SOT sequence, never sampled.
    set(logits, &mut std::iter::once(sp.no_timestamps as usize));
    let seq = &tokens[sample_begin..];
    let is_ts = |t: u32| t as usize >= tb;
    let last_was_ts = seq.last().is_some_and(|&t| is_ts(t));
    let penultimate_was_ts = seq.len() < 2 || is_ts(seq[seq.len() - 2]);
    if last_was_ts {
        if penultimate_was_ts {
            set(logits, &mut (tb..v)); // has to be a text token
        } else {
            set(logits, &mut (0..sp.eot as usize)); // cannot be a text token
        }
    }
    // Timestamps never decrease, and each segment has a nonzero length
    // (openai-whisper's and faster-whisper's rule; mlx-whisper 0.4.3 slices
    // with the timestamp's index instead of its value, which masks nothing).
    if let Some(&last) = seq.iter().rev().find(|&&t| is_ts(t)) {
        let last = if last_was_ts && !penultimate_was_ts { last as usize } else { last as usize + 1 };
        set(logits, &mut (tb..last.min(v)));
    }
    if tokens.len() == sample_begin {
        set(logits, &mut (0..tb)); // the first token is a timestamp
        if let Some(m) = sp.max_initial_timestamp_index {
            set(logits, &mut ((tb + m as usize + 1).min(v)..v));
        }
    }
    // If the timestamps together are likelier than any text token, sample a timestamp.
    let lse = log_sum_exp(logits);
    let ts_lp = log_sum_exp(&logits[tb..]) - lse;
    let max_text = logits[..tb].iter().copied().fold(ninf, f32::max) - lse;
    if ts_lp > max_text {
        set(logits, &mut (0..tb));
    }
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + x.iter().map(|&v| (v - m).exp()).sum::<f32>().ln()
}

fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    x[i] - log_sum_exp(x)
}

fn softmax_at(x: &[f32], i: usize) -> f32 {
    if i >= x.len() {
        return f32::NAN;
    }
    log_softmax_at(x, i).exp()
}

/// The first index of the largest value (numpy's and MLX's argmax).
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
