//! POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI): a
//! multipart upload decoded here (off the async threads), transcribed by
//! Whisper on the engine thread (`Worker::on_engine`, which keeps MLX on the
//! one thread that owns it; the Whisper model is loaded there once and kept
//! beside the scheduler's models, not in its pool), answered as JSON or text.
use super::errors::{ApiError, OaiResult, OpenAIError};
use super::generation::worker_error;
use super::types::audio::*;
use super::{State, Tag};
use crate::audio::{
    decode::decode_bytes,
    format::{render, Format},
    transcribe::{fallback_temperatures, transcribe, BadOption, Options, Transcript},
    whisper::WhisperModel,
};
use poem_openapi::{
    payload::{Json, PlainText},
    OpenApi,
};
use std::cell::RefCell;
use std::path::PathBuf;

pub struct AudioApi(pub State);

/// The step of the temperature fallback schedule (openai-whisper's default).
const FALLBACK_STEP: f32 = 0.2;

#[OpenApi]
impl AudioApi {
    /// Create a transcription
    ///
    /// OpenAI's speech-to-text with a served Whisper model (`model_type:
    /// whisper`). The file is wav, flac or mp3; decoded over 30 s windows
    /// with timestamps, as `rmlx transcribe` (docs/CLI.md).
    /// `response_format`: `json` (default), `text`, `srt`, `verbose_json`,
    /// `vtt`. `temperature` (0 to 1, default 0) is the first of a fallback
    /// schedule stepping by 0.2 up to 1: 0 decodes greedily, and a window
    /// whose text is repetitive (gzip compression ratio over 2.4) or
    /// unlikely (average log-probability under -1) is decoded again at the
    /// next temperature (sampled, best of 5, seeded). A file that is not
    /// audio rmlx can read is a 400.
    #[oai(path = "/v1/audio/transcriptions", method = "post", operation_id = "createTranscription", tag = "Tag::OpenAI")]
    async fn transcriptions(&self, form: AudioForm) -> OaiResult<TranscriptionResponse> {
        run(self.0.clone(), form, false).await.map_err(OpenAIError::from)
    }

    /// Create a translation
    ///
    /// OpenAI's speech translation into English with a served multilingual
    /// Whisper model; the spoken language is detected. Same form and
    /// answers as /v1/audio/transcriptions.
    #[oai(path = "/v1/audio/translations", method = "post", operation_id = "createTranslation", tag = "Tag::OpenAI")]
    async fn translations(&self, form: AudioForm) -> OaiResult<TranscriptionResponse> {
        run(self.0.clone(), form, true).await.map_err(OpenAIError::from)
    }
}

thread_local! {
    /// The engine thread's Whisper model (one at a time), by directory.
    static MODEL: RefCell<Option<(PathBuf, WhisperModel)>> = const { RefCell::new(None) };
}

/// On the engine thread: loads (or reuses) the model at `path` and
/// transcribes. Err((true, m)) is the caller's fault (400), (false, m) ours.
fn on_engine(reg: &crate::plugins::Registry, path: PathBuf, samples: Vec<f32>, opts: Options) -> Result<Transcript, (bool, String)> {
    MODEL.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(p, _)| *p != path) {
            *slot = None;
            let m = WhisperModel::load(&path, reg).map_err(|e| (false, format!("loading {}: {e:#}", path.display())))?;
            *slot = Some((path, m));
        }
        let (_, model) = slot.as_mut().expect("loaded above");
        transcribe(model, &samples, &opts).map_err(|e| (e.downcast_ref::<BadOption>().is_some(), format!("{e:#}")))
    })
}

async fn run(state: State, form: AudioForm, translate: bool) -> Result<TranscriptionResponse, ApiError> {
    let entry = state.model(&form.model)?;
    if entry.model_type != "whisper" {
        return Err(ApiError::bad_request(
            "model",
            format!("The model `{}` is a `{}` model: the audio routes need a Whisper model", entry.id, entry.model_type),
        ));
    }
    let format = Format::parse(form.response_format.as_deref().unwrap_or("json"))
        .map_err(|e| ApiError::bad_request("response_format", e.to_string()))?;
    let temperature = form.temperature.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&temperature) {
        return Err(ApiError::bad_request("temperature", format!("`temperature` must be between 0 and 1 (got {temperature})")));
    }
    let ext = form.file.file_name().and_then(|n| n.rsplit_once('.')).map(|(_, e)| e.to_ascii_lowercase());
    let bytes = form.file.into_vec().await.map_err(|e| ApiError::bad_request("file", format!("reading the upload: {e}")))?;
    let audio = tokio::task::spawn_blocking(move || decode_bytes(bytes, ext.as_deref()))
        .await
        .map_err(|e| ApiError::internal(format!("audio decoding thread: {e}")))?
        .map_err(|e| ApiError::bad_request("file", e.to_string()).with_code("invalid_file"))?;
    let opts = Options {
        language: if translate { None } else { form.language.clone() },
        translate,
        // OpenAI: at 0 the temperature rises while the thresholds fail.
        temperatures: fallback_temperatures(temperature as f32, FALLBACK_STEP),
        ..Options::default()
    };
    let path = entry.path.clone();
    let t = state
        .worker
        .on_engine(move |reg| on_engine(reg, path, audio.samples, opts))
        .await
        .map_err(worker_error)?
        .map_err(|(user, m)| if user { ApiError::bad_request(if translate { "model" } else { "language" }, m) } else { ApiError::internal(m) })?;
    Ok(TranscriptionResponse::Ok(match format {
        Format::Json => TranscriptionBody::Json(Json(Transcription {
            text: t.text.trim().to_string(),
            task: None,
            language: None,
            duration: None,
            segments: None,
        })),
        Format::VerboseJson => TranscriptionBody::Json(Json(verbose(&t))),
        other => TranscriptionBody::Text(PlainText(render(&t, other))),
    }))
}

fn verbose(t: &Transcript) -> Transcription {
    let segments = t
        .segments
        .iter()
        .map(|s| TranscriptionSegment {
            id: s.id as u32,
            seek: s.seek as u32,
            start: s.start,
            end: s.end,
            text: s.text.clone(),
            tokens: s.tokens.clone(),
            temperature: s.temperature as f64,
            avg_logprob: s.avg_logprob as f64,
            compression_ratio: Some(s.compression_ratio as f64),
            no_speech_prob: s.no_speech_prob as f64,
        })
        .collect();
    Transcription {
        text: t.text.trim().to_string(),
        task: Some(t.task.clone()),
        language: Some(t.language.clone()),
        duration: Some(t.duration),
        segments: Some(segments),
    }
}
