//! `rmlx transcribe`: speech to text with a Whisper model (model_type
//! `whisper`, e.g. from `rmlx convert --from-ct2`): greedy decoding over
//! 30 s windows with openai-whisper's temperature fallback
//! (audio/transcribe.rs), printed as text, JSON, SRT or WebVTT.
use crate::audio::{decode::decode_file, format, transcribe, whisper::WhisperModel};
use crate::config::Settings;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Whisper model directory (MLX layout: config.json with model_type whisper)
    #[arg(short = 'm', long, value_name = "DIR")]
    model: PathBuf,
    /// Audio file: wav, flac or mp3 (any rate, any channels)
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Spoken language (en, fr, ...) [default: en on English-only models, detected on multilingual ones]
    #[arg(long, value_name = "CODE")]
    language: Option<String>,
    /// transcribe, or translate into English (multilingual models)
    #[arg(long, default_value = "transcribe", value_name = "TASK")]
    task: String,
    /// Output: text, json, verbose_json, srt, vtt
    #[arg(long, default_value = "text", value_name = "FORMAT")]
    format: String,
    /// Decode without timestamp tokens (`<|notimestamps|>`): one segment per 30 s window
    #[arg(long)]
    no_timestamps: bool,
    /// Do not prompt each window with the text decoded before it
    #[arg(long)]
    no_condition_on_previous_text: bool,
    /// Decoding temperature (0: greedy), the first of the fallback schedule
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    temperature: f32,
    /// Step of the fallback schedule: a window that fails the thresholds is decoded again at T + step, ... up to 1.0 (0: no fallback)
    #[arg(long, default_value_t = 0.2, value_name = "STEP")]
    temperature_increment_on_fallback: f32,
    /// Samples drawn per window at a temperature above 0 (the likeliest is kept)
    #[arg(long, default_value_t = 5, value_name = "N")]
    best_of: usize,
    /// Seed of the sampling at temperatures above 0
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
    /// A window whose text's gzip compression ratio is above this fails (repetitive)
    #[arg(long, default_value_t = 2.4, value_name = "X")]
    compression_ratio_threshold: f32,
    /// A window whose average log-probability is below this fails
    #[arg(long, default_value_t = -1.0, value_name = "X", allow_negative_numbers = true)]
    logprob_threshold: f32,
    /// A window whose no-speech probability is above this, with a log-probability below --logprob-threshold, is silence (skipped)
    #[arg(long, default_value_t = 0.6, value_name = "X")]
    no_speech_threshold: f32,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let translate = match args.task.as_str() {
        "transcribe" => false,
        "translate" => true,
        other => bail!("unknown --task `{other}` (transcribe, translate)"),
    };
    if !(0.0..=1.0).contains(&args.temperature) {
        bail!("--temperature must be between 0 and 1 (got {})", args.temperature);
    }
    if !args.temperature_increment_on_fallback.is_finite() || args.temperature_increment_on_fallback < 0.0 {
        bail!("--temperature-increment-on-fallback must be 0 or more (got {})", args.temperature_increment_on_fallback);
    }
    if args.best_of == 0 {
        bail!("--best-of must be at least 1");
    }
    let fmt = format::Format::parse(&args.format).map_err(|e| anyhow::anyhow!("--format: {e}"))?;
    let audio = decode_file(&args.file)?;
    let registry = super::registry(settings)?;
    let mut model = WhisperModel::load(&args.model, &registry)?;
    let opts = transcribe::Options {
        language: args.language.clone(),
        translate,
        timestamps: !args.no_timestamps,
        condition_on_previous_text: !args.no_condition_on_previous_text,
        temperatures: transcribe::fallback_temperatures(args.temperature, args.temperature_increment_on_fallback),
        compression_ratio_threshold: Some(args.compression_ratio_threshold),
        logprob_threshold: Some(args.logprob_threshold),
        no_speech_threshold: Some(args.no_speech_threshold),
        best_of: args.best_of,
        seed: args.seed,
    };
    let t = transcribe::transcribe(&mut model, &audio.samples, &opts)?;
    let out = format::render(&t, fmt);
    print!("{out}");
    if matches!(fmt, format::Format::Json | format::Format::VerboseJson) {
        println!();
    }
    Ok(())
}
