//! Audio input for Whisper: decoding (wav, flac, mp3) to mono 16 kHz f32
//! samples ([`decode`]), Whisper's log-mel front end ([`mel`]), the loaded
//! model ([`whisper`]), one window's decoding ([`window`]), the
//! transcription loop with its temperature fallback ([`transcribe`]) and its
//! output formats ([`format`]).
//!
//! ```ignore
//! let audio = rmlx::audio::decode::decode_file(path)?;           // mono, 16 kHz
//! let mel = rmlx::audio::mel::whisper_features(&audio.samples, 80)?; // [frames, 80]
//! for w in mel.windows() { /* w.data: [3000, 80], w.seek: first frame */ }
//! ```
pub mod decode;
pub mod format;
pub mod mel;
pub mod transcribe;
pub mod whisper;
pub mod window;

/// Whisper's sample rate (Hz).
pub const SAMPLE_RATE: u32 = 16_000;

/// What can go wrong with audio input. Every variant is the caller's input
/// (an API route answers 400 with the message), never a panic.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("audio input is empty")]
    Empty,
    #[error("unsupported audio: {0} (rmlx reads wav, flac and mp3)")]
    Unsupported(String),
    #[error("malformed audio: {0}")]
    Malformed(String),
    #[error("reading audio {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("resampling {from} Hz to 16000 Hz: {message}")]
    Resample { from: u32, message: String },
    #[error("invalid mel request: {0}")]
    Mel(String),
}
