//! Whisper's log-mel spectrogram, as the references compute it
//! (faster-whisper's `feature_extractor.py`, openai-whisper's and
//! mlx-whisper's `audio.py`):
//!
//! 1. append `padding` zero samples (faster-whisper: 160, one hop;
//!    openai-whisper and mlx-whisper: 480 000, 30 s);
//! 2. reflect-pad 200 samples (`n_fft / 2`) on both sides (numpy's `reflect`:
//!    the edge sample is not repeated);
//! 3. frames of 400 samples every 160, times a periodic Hann window
//!    (`np.hanning(401)[:-1]`), real FFT, power `|X|^2`; the last frame is
//!    dropped (`stft[..., :-1]`);
//! 4. Slaney mel filters (librosa's `filters.mel(sr=16000, n_fft=400,
//!    norm="slaney", htk=False)`, computed here), 80 or 128 bins;
//! 5. `log10(max(x, 1e-10))`, clamped below at the global maximum minus 8,
//!    then `(x + 4) / 4`.
//!
//! The result is frame-major, `[frames, n_mels]`: the layout MLX's `conv1d`
//! takes (`[B, L, C]`), and mlx-whisper's. faster-whisper's arrays are the
//! transpose, `[n_mels, frames]`.
//!
//! The encoder sees 30 s windows of [`WINDOW_FRAMES`] frames: a slice of the
//! content frames starting at `seek`, zero-padded (in the log-mel domain, as
//! both references' `pad_or_trim` do) or cut to 3000 frames.
use std::sync::Arc;

use realfft::RealFftPlanner;

use super::AudioError;

/// FFT size (25 ms at 16 kHz).
pub const N_FFT: usize = 400;
/// Hop between frames (10 ms at 16 kHz).
pub const HOP: usize = 160;
/// Frequency bins of one frame's real FFT.
pub const N_FREQ: usize = N_FFT / 2 + 1;
/// Frames in one 30 s encoder window.
pub const WINDOW_FRAMES: usize = 3000;
/// Samples in one 30 s window at 16 kHz.
pub const WINDOW_SAMPLES: usize = 480_000;
/// faster-whisper's default padding (one hop of zeros).
pub const FASTER_WHISPER_PADDING: usize = HOP;

/// A log-mel spectrogram.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub n_mels: usize,
    /// Frames computed (including the padding's frames).
    pub n_frames: usize,
    /// Frames that hold the audio (the references' `content_frames`); the
    /// ones after it come from the padding alone.
    pub content_frames: usize,
    /// [n_frames, n_mels], frame-major.
    pub data: Vec<f32>,
}

/// One 30 s encoder input.
#[derive(Debug, Clone, PartialEq)]
pub struct MelWindow {
    /// First content frame of the window.
    pub seek: usize,
    /// Content frames in it (the rest, up to 3000, is zero padding).
    pub frames: usize,
    /// [WINDOW_FRAMES, n_mels]
    pub data: Vec<f32>,
}

/// The periodic Hann window of `N_FFT` points: `0.5 - 0.5 cos(2 pi n / N)`
/// (numpy's `hanning(N + 1)[:-1]`, torch's `hann_window(N)`).
pub fn hann_window() -> Vec<f64> {
    (0..N_FFT)
        .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
        .collect()
}

fn hz_to_mel(f: f64) -> f64 {
    // Slaney: linear below 1 kHz, logarithmic above.
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

/// Slaney-normalised mel filters for 16 kHz and a 400-point FFT, in float32
/// as the references use them. [n_mels, N_FREQ]
pub fn mel_filters(n_mels: usize) -> Result<Vec<f32>, AudioError> {
    if n_mels != 80 && n_mels != 128 {
        return Err(AudioError::Mel(format!("Whisper uses 80 or 128 mel bins, not {n_mels}")));
    }
    let sr = super::SAMPLE_RATE as f64;
    // [N_FREQ] centre frequency of each FFT bin
    let fft_freqs: Vec<f64> = (0..N_FREQ).map(|k| k as f64 * sr / N_FFT as f64).collect();
    // [n_mels + 2] band edges, uniform in mel between 0 Hz and sr / 2
    let max_mel = hz_to_mel(sr / 2.0);
    let freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(max_mel * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut w = vec![0f32; n_mels * N_FREQ];
    for m in 0..n_mels {
        let (lo, c, hi) = (freqs[m], freqs[m + 1], freqs[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - lo) / (c - lo);
            let upper = (hi - f) / (hi - c);
            w[m * N_FREQ + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    Ok(w)
}

/// numpy's `reflect` padding index: position `i` (may be negative or past
/// the end) of a signal of length `n` mirrored about its first and last
/// samples, repeatedly when the pad is longer than the signal.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let mut j = i.rem_euclid(period);
    if j >= n as isize {
        j = period - j;
    }
    j as usize
}

/// The log-mel spectrogram of 16 kHz mono `samples` after `padding` zero
/// samples are appended. `content_frames` is `n_frames - padding / HOP`
/// (faster-whisper's `features.shape[-1] - 1` for padding 160, openai's
/// `mel.shape[-2] - 3000` for padding 480 000).
pub fn log_mel_spectrogram(samples: &[f32], n_mels: usize, padding: usize) -> Result<LogMel, AudioError> {
    if samples.is_empty() {
        return Err(AudioError::Empty);
    }
    if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
        return Err(AudioError::Malformed(format!("sample {i} is not a finite number")));
    }
    let filters = mel_filters(n_mels)?; // [n_mels, N_FREQ]
    let window = hann_window(); // [N_FFT]
    let n = samples.len() + padding;
    let pad = N_FFT / 2;
    // frames of the centred STFT, less the last one
    let n_stft = 1 + (n + 2 * pad - N_FFT) / HOP;
    let n_frames = n_stft - 1;
    if n_frames == 0 {
        return Err(AudioError::Mel(format!("{} samples give no frame", samples.len())));
    }
    let at = |i: usize| -> f64 {
        // i indexes the reflect-padded signal of length n + 2 * pad
        let j = reflect(i as isize - pad as isize, n);
        if j < samples.len() { samples[j] as f64 } else { 0.0 }
    };
    let mut planner = RealFftPlanner::<f64>::new();
    let fft: Arc<dyn realfft::RealToComplex<f64>> = planner.plan_fft_forward(N_FFT);
    let mut frame = fft.make_input_vec(); // [N_FFT]
    let mut spec = fft.make_output_vec(); // [N_FREQ]
    let mut scratch = fft.make_scratch_vec();
    let mut power = vec![0f64; N_FREQ]; // [N_FREQ]
    let mut out = vec![0f32; n_frames * n_mels]; // [n_frames, n_mels]
    let mut max = f64::NEG_INFINITY;
    for t in 0..n_frames {
        for (k, x) in frame.iter_mut().enumerate() {
            *x = at(t * HOP + k) * window[k];
        }
        fft.process_with_scratch(&mut frame, &mut spec, &mut scratch)
            .map_err(|e| AudioError::Mel(format!("FFT: {e}")))?;
        for (p, c) in power.iter_mut().zip(&spec) {
            *p = c.re * c.re + c.im * c.im;
        }
        for m in 0..n_mels {
            let row = &filters[m * N_FREQ..(m + 1) * N_FREQ];
            let e: f64 = row.iter().zip(&power).map(|(&w, &p)| w as f64 * p).sum();
            let l = e.max(1e-10).log10();
            max = max.max(l);
            out[t * n_mels + m] = l as f32;
        }
    }
    let floor = (max - 8.0) as f32;
    for v in &mut out {
        *v = (v.max(floor) + 4.0) / 4.0;
    }
    Ok(LogMel { n_mels, n_frames, content_frames: n_frames.saturating_sub(padding / HOP), data: out })
}

/// Features the way faster-whisper computes them (padding one hop):
/// [frames, n_mels], `content_frames = frames - 1`.
pub fn whisper_features(samples: &[f32], n_mels: usize) -> Result<LogMel, AudioError> {
    log_mel_spectrogram(samples, n_mels, FASTER_WHISPER_PADDING)
}

/// `frames` ([len, n_mels]) cut or zero-padded to `WINDOW_FRAMES` frames
/// (the references' `pad_or_trim`). [WINDOW_FRAMES, n_mels]
pub fn pad_or_trim(frames: &[f32], n_mels: usize) -> Vec<f32> {
    let mut v = frames[..frames.len().min(WINDOW_FRAMES * n_mels)].to_vec();
    v.resize(WINDOW_FRAMES * n_mels, 0.0);
    v
}

impl LogMel {
    /// The encoder window that starts at content frame `seek`: at most 3000
    /// content frames (never padding frames), zero-padded to 3000.
    pub fn window_at(&self, seek: usize) -> MelWindow {
        let seek = seek.min(self.content_frames);
        let frames = (self.content_frames - seek).min(WINDOW_FRAMES);
        let slice = &self.data[seek * self.n_mels..(seek + frames) * self.n_mels];
        MelWindow { seek, frames, data: pad_or_trim(slice, self.n_mels) }
    }

    /// Consecutive 30 s windows over the content (seek 0, 3000, ...). A
    /// decoder that moves `seek` by its timestamps uses [`Self::window_at`].
    pub fn windows(&self) -> Vec<MelWindow> {
        (0..self.content_frames).step_by(WINDOW_FRAMES).map(|s| self.window_at(s)).collect()
    }

    /// Frame `t`'s `n_mels` values.
    pub fn frame(&self, t: usize) -> &[f32] {
        &self.data[t * self.n_mels..(t + 1) * self.n_mels]
    }
}

#[cfg(test)]
#[path = "mel_tests.rs"]
mod tests;
