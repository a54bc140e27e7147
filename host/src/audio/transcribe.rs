//! Whisper transcription, as mlx-whisper's `transcribe()` runs it with
//! greedy decoding (temperature 0, no fallback): log-mel features
//! (faster-whisper's front end, mel.rs), 30 s windows starting at `seek`,
//! one encoder forward per window, the SOT sequence (`<|startofprev|>` and
//! the previous windows' text when conditioning on it, `<|startoftranscript|>`,
//! language and task on multilingual models, `<|notimestamps|>` without
//! timestamps), greedy decoding under Whisper's logit filters (suppressed
//! tokens, blank suppression at the first position, the timestamp rules),
//! then segments cut at timestamp pairs and `seek` moved to the last
//! timestamp (or past the window).
use super::mel::{whisper_features, WINDOW_FRAMES};
use super::whisper::WhisperModel;
use super::{AudioError, SAMPLE_RATE};
use anyhow::Result;
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
}

impl Default for Options {
    fn default() -> Self {
        Self { language: None, translate: false, timestamps: true, condition_on_previous_text: true }
    }
}

/// An option the model cannot honour (unknown language, translation on an
/// English-only model): the caller's error, not the model's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadOption(pub String);

/// mlx-whisper's thresholds: a window whose no-speech probability exceeds
/// 0.6 while its average log-probability is at most -1 is skipped as silence.
const NO_SPEECH_THRESHOLD: f32 = 0.6;
const LOGPROB_THRESHOLD: f32 = -1.0;

#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub id: usize,
    /// First mel frame of the window it came from.
    pub seek: usize,
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub temperature: f32,
    pub avg_logprob: f32,
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

/// One window's decoding result.
struct Decoded {
    tokens: Vec<u32>,
    avg_logprob: f32,
    no_speech_prob: f32,
}

/// Transcribes mono 16 kHz `samples`.
pub fn transcribe(model: &mut WhisperModel, samples: &[f32], opts: &Options) -> Result<Transcript> {
    if samples.is_empty() {
        return Err(AudioError::Empty.into());
    }
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
        let d = decode_window(model, &xa, &sot_seq, prompt, opts.timestamps)?;
        if d.no_speech_prob > NO_SPEECH_THRESHOLD && d.avg_logprob <= LOGPROB_THRESHOLD {
            seek += segment_size;
            continue;
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
                temperature: 0.0,
                avg_logprob: d.avg_logprob,
                no_speech_prob: d.no_speech_prob,
            });
        }
        if !opts.condition_on_previous_text {
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

/// Greedy decoding of one window (mlx-whisper's `DecodingTask.run` with
/// temperature 0): returns the sampled tokens up to (not including) EOT.
fn decode_window(model: &mut WhisperModel, xa: &mlx_rs::Array, sot_seq: &[u32], prompt: &[u32], timestamps: bool) -> Result<Decoded> {
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
        let next = argmax(&logits);
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
    Ok(Decoded { tokens: out, avg_logprob, no_speech_prob })
}

/// Whisper's logit filters, in mlx-whisper's order: blank suppression at
/// the first sampled position, the suppressed tokens, the timestamp rules.
fn apply_filters(logits: &mut [f32], tokens: &[u32], sample_begin: usize, sp: &super::whisper::Specials, timestamps: bool) {
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
