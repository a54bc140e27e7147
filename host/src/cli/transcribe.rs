//! `rmlx transcribe`: speech to text with a Whisper model (model_type
//! `whisper`, e.g. from `rmlx convert --from-ct2`): greedy decoding over
//! 30 s windows (audio/transcribe.rs), printed as text, JSON, SRT or WebVTT.
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
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let translate = match args.task.as_str() {
        "transcribe" => false,
        "translate" => true,
        other => bail!("unknown --task `{other}` (transcribe, translate)"),
    };
    let fmt = format::Format::parse(&args.format).map_err(|e| anyhow::anyhow!("--format: {e}"))?;
    let audio = decode_file(&args.file)?;
    let registry = super::registry(settings)?;
    let mut model = WhisperModel::load(&args.model, &registry)?;
    let opts = transcribe::Options {
        language: args.language.clone(),
        translate,
        timestamps: !args.no_timestamps,
        condition_on_previous_text: !args.no_condition_on_previous_text,
    };
    let t = transcribe::transcribe(&mut model, &audio.samples, &opts)?;
    let out = format::render(&t, fmt);
    print!("{out}");
    if matches!(fmt, format::Format::Json | format::Format::VerboseJson) {
        println!();
    }
    Ok(())
}
