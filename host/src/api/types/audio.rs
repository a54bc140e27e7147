//! OpenAI's audio routes (`/v1/audio/transcriptions`, `/v1/audio/translations`):
//! the multipart form and the JSON answers.
use poem_openapi::{
    payload::{Json, PlainText},
    types::multipart::Upload,
    ApiResponse, Multipart, Object, ResponseContent,
};

/// A transcription or translation request (multipart/form-data).
#[derive(Multipart, Debug)]
pub struct AudioForm {
    /// The audio file: wav, flac or mp3, any rate and channel count.
    pub file: Upload,
    /// A served Whisper model (GET /v1/models); may be left out when the server serves one model.
    #[oai(default)]
    pub model: String,
    /// The spoken language, ISO-639-1 (`en`, `fr`); default: detected (English on `.en` models).
    /// Transcriptions only.
    pub language: Option<String>,
    /// `json` (default), `text`, `srt`, `verbose_json` or `vtt`.
    pub response_format: Option<String>,
    /// Sampling temperature, 0 to 1 (default 0: greedy). As OpenAI documents it, the
    /// temperature rises (by 0.2, up to 1) for a window whose text is repetitive
    /// (gzip compression ratio over 2.4) or unlikely (average log-probability under -1).
    pub temperature: Option<f64>,
    /// Accepted and ignored (rmlx conditions each window on the text decoded before it).
    pub prompt: Option<String>,
}

/// One segment of a `verbose_json` answer.
#[derive(Object, Debug, Clone)]
#[oai(skip_serializing_if_is_none)]
pub struct TranscriptionSegment {
    pub id: u32,
    /// First mel frame (10 ms each) of the 30 s window it was decoded in.
    pub seek: u32,
    /// Seconds.
    pub start: f64,
    pub end: f64,
    pub text: String,
    /// Token ids, timestamp tokens included.
    pub tokens: Vec<u32>,
    /// The temperature the window was decoded at.
    pub temperature: f64,
    pub avg_logprob: f64,
    /// The gzip compression ratio of the window's text (the fallback's repetition test).
    pub compression_ratio: Option<f64>,
    pub no_speech_prob: f64,
}

/// A `json` answer (`text` only) or a `verbose_json` one (everything).
#[derive(Object, Debug, Clone)]
#[oai(skip_serializing_if_is_none)]
pub struct Transcription {
    pub text: String,
    /// `transcribe` or `translate` (verbose_json).
    pub task: Option<String>,
    /// verbose_json: the language spoken (ISO-639-1).
    pub language: Option<String>,
    /// verbose_json: seconds of audio.
    pub duration: Option<f64>,
    /// verbose_json: the segments.
    pub segments: Option<Vec<TranscriptionSegment>>,
}

#[derive(ResponseContent)]
pub enum TranscriptionBody {
    /// `json` and `verbose_json`.
    Json(Json<Transcription>),
    /// `text`, `srt` and `vtt`.
    Text(PlainText<String>),
}

#[derive(ApiResponse)]
pub enum TranscriptionResponse {
    /// The transcript, in the shape `response_format` asked for.
    #[oai(status = 200)]
    Ok(TranscriptionBody),
}
