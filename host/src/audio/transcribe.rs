//! Whisper transcription, as openai-whisper's / faster-whisper's
//! `transcribe()` runs it: log-mel features (faster-whisper's front end,
//! mel.rs), 30 s windows starting at `seek`, one encoder forward per window,
//! the SOT sequence (`<|startofprev|>` and the previous windows' text when
//! conditioning on it, `<|startoftranscript|>`, language and task on
//! multilingual models, `<|notimestamps|>` without timestamps), decoding
//! under Whisper's logit filters (window.rs), then segments cut at timestamp
//! pairs and `seek` moved to the last timestamp (or past the window).
//!
//! Temperature fallback (faster-whisper's `generate_with_fallback`, the
//! same thresholds): each window is decoded at the first of
//! `Options::temperatures`; while the result's gzip compression ratio is
//! above `compression_ratio_threshold` (2.4: repetitive) or its average
//! log-probability below `logprob_threshold` (-1.0), and it is not silence
//! (no-speech probability above `no_speech_threshold`, 0.6, with that low
//! log-probability), the window is decoded again at the next temperature
//! (sampling, best of `best_of`, from a ChaCha8 RNG seeded with `seed`). When
//! every temperature fails, the result with the best average log-probability
//! among those under the compression threshold (else among all) is kept. A
//! window decoded above 0.5 does not prompt the next ones. With one
//! temperature, 0 (`Options::default()`), this is greedy decoding with no
//! fallback, as before.
use super::mel::{whisper_features, WINDOW_FRAMES};
use super::whisper::WhisperModel;
use super::window::{compression_ratio, decode_window, Decoded};
use super::{AudioError, SAMPLE_RATE};
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What the caller chooses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Language code ("en", "fr"); None: English on English-only models,
    /// detected from the first window on multilingual ones.
    pub language: Option<String>,
    /// Translate to English instead of transcribing.
    pub translate: bool,
    /// Sample timestamp tokens (segments); off: `<|notimestamps|>`, one segment per window.
    pub timestamps: bool,
    /// Prompt each window with the text decoded so far (mlx-whisper's default).
    pub condition_on_previous_text: bool,
    /// Temperatures tried in turn while a window fails the thresholds
    /// below (0: greedy). `[0.0]`: greedy, no fallback.
    pub temperatures: Vec<f32>,
    /// A window whose text's gzip compression ratio is above this failed
    /// (repetitive). None: not checked.
    pub compression_ratio_threshold: Option<f32>,
    /// A window whose average log-probability is below this failed; with
    /// `no_speech_threshold`, also the silence test.
    pub logprob_threshold: Option<f32>,
    /// A window whose no-speech probability is above this and whose average
    /// log-probability is below `logprob_threshold` is silence: skipped, and
    /// never retried.
    pub no_speech_threshold: Option<f32>,
    /// Samples drawn per window at a temperature above 0; the likeliest
    /// (sum of log-probabilities over length) is kept.
    pub best_of: usize,
    /// Seed of the sampling RNG (one per transcription).
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            language: None,
            translate: false,
            timestamps: true,
            condition_on_previous_text: true,
            temperatures: vec![0.0],
            compression_ratio_threshold: Some(2.4),
            logprob_threshold: Some(-1.0),
            no_speech_threshold: Some(0.6),
            best_of: 5,
            seed: 0,
        }
    }
}

/// `start`, `start + increment`, ... up to 1.0 (openai-whisper's CLI
/// schedule, `np.arange(start, 1.0 + 1e-6, increment)`); `[start]` alone
/// when `increment` is 0 or less. 0 with 0.2: 0.0, 0.2, ..., 1.0.
pub fn fallback_temperatures(start: f32, increment: f32) -> Vec<f32> {
    if increment <= 0.0 {
        return vec![start];
    }
    let mut out = Vec::new();
    for i in 0.. {
        let t = start as f64 + i as f64 * increment as f64;
        if t > 1.0 + 1e-6 {
            break;
        }
        out.push(((t * 1e6).round() / 1e6) as f32);
    }
    if out.is_empty() {
        out.push(start);
    }
    out
}

/// Above this temperature a window's text does not prompt the next windows.
const PROMPT_RESET_ON_TEMPERATURE: f32 = 0.5;

/// An option the model cannot honour (unknown language, translation on an
/// English-only model): the caller's error, not the model's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadOption(pub String);

#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub id: usize,
    /// First mel frame of the window it came from.
    pub seek: usize,
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    /// The temperature of the decoding kept (the last tried when all failed).
    pub temperature: f32,
    pub avg_logprob: f32,
    /// gzip compression ratio of the window's text.
    pub compression_ratio: f32,
    pub no_speech_prob: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transcript {
    /// "transcribe" or "translate".
    pub task: String,
    pub text: String,
    pub language: String,
    pub segments: Vec<Segment>,
    /// Seconds of audio.
    pub duration: f64,
}

/// Transcribes mono 16 kHz `samples`.
pub fn transcribe(model: &mut WhisperModel, samples: &[f32], opts: &Options) -> Result<Transcript> {
    if samples.is_empty() {
        return Err(AudioError::Empty.into());
    }
    if opts.temperatures.is_empty() || opts.temperatures.iter().any(|t| !t.is_finite() || *t < 0.0) {
        return Err(BadOption(format!("temperatures must be one or more finite values >= 0 (got {:?})", opts.temperatures)).into());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let sp = model.specials.clone();
    let mel = whisper_features(samples, model.dims.n_mels)?;
    let content_frames = mel.content_frames;
    let input_stride = WINDOW_FRAMES / model.dims.n_audio_ctx; // mel frames per audio position: 2
    let time_precision = (input_stride * super::mel::HOP) as f64 / SAMPLE_RATE as f64; // 0.02 s

    // The SOT sequence.
    let mut sot_seq = vec![sp.sot];
    let language = if sp.multilingual {
        let lang = match &opts.language {
            Some(l) => l.to_lowercase(),
            None => {
                let xa = model.encode(&mel.window_at(0).data)?;
                detect_language(model, &xa)?
            }
        };
        let id = *sp.languages.get(&lang).ok_or_else(|| {
            BadOption(format!("unknown language `{lang}` (this model knows: {})", sp.languages.keys().cloned().collect::<Vec<_>>().join(", ")))
        })?;
        sot_seq.push(id);
        let task = if opts.translate { sp.translate } else { sp.transcribe };
        sot_seq.push(task.ok_or_else(|| anyhow::anyhow!("generation_config.json names no transcribe/translate task tokens"))?);
        lang
    } else {
        if opts.translate {
            return Err(BadOption("this is an English-only Whisper model: it cannot translate (use a multilingual one, e.g. base)".into()).into());
        }
        if let Some(l) = opts.language.as_deref().filter(|l| !l.eq_ignore_ascii_case("en")) {
            return Err(BadOption(format!("this is an English-only Whisper model: language `{l}` is not available (en only)")).into());
        }
        "en".to_string()
    };
    if !opts.timestamps {
        sot_seq.push(sp.no_timestamps);
    }

    let mut seek = 0usize;
    let mut all_tokens: Vec<u32> = Vec::new();
    let mut prompt_reset_since = 0usize;
    let mut segments: Vec<Segment> = Vec::new();
    while seek < content_frames {
        let time_offset = seek as f64 * super::mel::HOP as f64 / SAMPLE_RATE as f64;
        let window = mel.window_at(seek);
        let segment_size = window.frames;
        let segment_duration = segment_size as f64 * super::mel::HOP as f64 / SAMPLE_RATE as f64;
        let xa = model.encode(&window.data)?;
        let prompt = if opts.condition_on_previous_text { &all_tokens[prompt_reset_since..] } else { &[][..] };
        let prompt = prompt.to_vec();
        let (d, temperature, ratio) = decode_with_fallback(opts, |t| {
            let d = best_of(opts.best_of, t, |t| decode_window(model, &xa, &sot_seq, &prompt, opts.timestamps, t, &mut rng))?;
            let ratio = compression_ratio(model.text(&d.tokens)?.trim());
            Ok((d, ratio))
        })?;
        // Silence: skipped, unless the log-probability is high enough.
        if let Some(ns) = opts.no_speech_threshold {
            let confident = opts.logprob_threshold.is_some_and(|lp| d.avg_logprob > lp);
            if d.no_speech_prob > ns && !confident {
                seek += segment_size;
                continue;
            }
        }
        let tokens = &d.tokens;
        let is_ts = |t: u32| t >= sp.timestamp_begin;
        let n = tokens.len();
        let single_timestamp_ending = n >= 2 && !is_ts(tokens[n - 2]) && is_ts(tokens[n - 1]);
        // Positions i where tokens[i-1] and tokens[i] are both timestamps.
        let consecutive: Vec<usize> = (1..n).filter(|&i| is_ts(tokens[i - 1]) && is_ts(tokens[i])).collect();
        let mut current: Vec<(f64, f64, Vec<u32>)> = Vec::new();
        if !consecutive.is_empty() {
            let mut slices = consecutive.clone();
            if single_timestamp_ending {
                slices.push(n);
            }
            let mut last = 0;
            for &cur in &slices {
                let sl = &tokens[last..cur];
                let start = time_offset + (sl[0] - sp.timestamp_begin) as f64 * time_precision;
                let end = time_offset + (sl[sl.len() - 1] - sp.timestamp_begin) as f64 * time_precision;
                current.push((start, end, sl.to_vec()));
                last = cur;
            }
            if single_timestamp_ending {
                seek += segment_size;
            } else {
                seek += (tokens[last - 1] - sp.timestamp_begin) as usize * input_stride;
            }
        } else {
            let mut duration = segment_duration;
            if let Some(&t) = tokens.iter().rev().find(|&&t| is_ts(t)) {
                if t != sp.timestamp_begin {
                    duration = (t - sp.timestamp_begin) as f64 * time_precision;
                }
            }
            current.push((time_offset, time_offset + duration, tokens.clone()));
            seek += segment_size;
        }
        for (start, end, toks) in current {
            let mut text = model.text(&toks)?;
            let mut toks = toks;
            // An instantaneous or empty segment is cleared (kept, with no text).
            if start == end || text.trim().is_empty() {
                text.clear();
                toks.clear();
            }
            all_tokens.extend(&toks);
            segments.push(Segment {
                id: segments.len(),
                seek: window.seek,
                start: round2(start),
                end: round2(end),
                text,
                tokens: toks,
                temperature,
                avg_logprob: d.avg_logprob,
                compression_ratio: ratio,
                no_speech_prob: d.no_speech_prob,
            });
        }
        if !opts.condition_on_previous_text || temperature > PROMPT_RESET_ON_TEMPERATURE {
            prompt_reset_since = all_tokens.len();
        }
    }
    let text = model.text(&all_tokens)?;
    let task = if opts.translate { "translate" } else { "transcribe" }.to_string();
    Ok(Transcript { task, text, language, segments, duration: samples.len() as f64 / SAMPLE_RATE as f64 })
}

fn round2(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The most likely language of the audio features `xa`: one forward of
/// `<|startoftranscript|>`, argmax over the language tokens.
pub fn detect_language(model: &mut WhisperModel, xa: &mlx_rs::Array) -> Result<String> {
    let sp = model.specials.clone();
    let mut cache = model.new_cache();
    let logits = model.decode(&mut cache, &[sp.sot], xa, false)?;
    let l = &logits[0];
    let (lang, _) = sp
        .languages
        .iter()
        .filter(|(_, &id)| (id as usize) < l.len())
        .max_by(|a, b| l[*a.1 as usize].total_cmp(&l[*b.1 as usize]))
        .ok_or_else(|| anyhow::anyhow!("this model lists no language tokens"))?;
    Ok(lang.clone())
}


/// The window decoded at `temperature`: greedy at 0; else `n` samples, the
/// likeliest kept (openai-whisper's ranking without a length penalty: sum of
/// log-probabilities over the number of tokens).
fn best_of(n: usize, temperature: f32, mut decode: impl FnMut(f32) -> Result<Decoded>) -> Result<Decoded> {
    if temperature <= 0.0 {
        return decode(0.0);
    }
    let mut best: Option<(f64, Decoded)> = None;
    for _ in 0..n.max(1) {
        let d = decode(temperature)?;
        let score = d.sum_logprob / d.tokens.len().max(1) as f64;
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, d));
        }
    }
    Ok(best.expect("at least one sample").1)
}

/// faster-whisper's `generate_with_fallback`: `decode(t)` (the decoding and
/// its compression ratio) at each of `opts.temperatures` until one passes
/// the thresholds (see the module doc). Returns the decoding kept, its
/// temperature (the last tried when all failed) and compression ratio.
fn decode_with_fallback(opts: &Options, mut decode: impl FnMut(f32) -> Result<(Decoded, f32)>) -> Result<(Decoded, f32, f32)> {
    let mut all: Vec<(Decoded, f32, f32)> = Vec::new();
    let mut below_cr: Vec<usize> = Vec::new();
    for &t in &opts.temperatures {
        let (d, ratio) = decode(t)?;
        let mut needs_fallback = false;
        if let Some(cr) = opts.compression_ratio_threshold {
            if ratio > cr {
                needs_fallback = true; // too repetitive
            } else {
                below_cr.push(all.len());
            }
        }
        let low_logprob = opts.logprob_threshold.is_some_and(|lp| d.avg_logprob < lp);
        if low_logprob {
            needs_fallback = true;
        }
        if opts.no_speech_threshold.is_some_and(|ns| d.no_speech_prob > ns) && low_logprob {
            needs_fallback = false; // silence
        }
        if !needs_fallback {
            return Ok((d, t, ratio));
        }
        all.push((d, t, ratio));
    }
    // Every temperature failed: the best average log-probability among
    // those under the compression threshold, else among all, with the last
    // temperature tried (it decides the prompt reset).
    let last_t = *opts.temperatures.last().expect("checked non-empty");
    let pool: Vec<usize> = if below_cr.is_empty() { (0..all.len()).collect() } else { below_cr };
    // The first of equals, as Python's max.
    let best = pool.into_iter().reduce(|a, b| if all[b].0.avg_logprob > all[a].0.avg_logprob { b } else { a }).expect("one at least");
    let (d, _, ratio) = all.swap_remove(best);
    Ok((d, last_t, ratio))
}

#[cfg(test)]
#[path = "transcribe_tests.rs"]
mod tests;
