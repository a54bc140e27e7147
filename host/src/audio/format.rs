//! A transcript written as text, JSON (OpenAI's `verbose_json` shape), SRT
//! or WebVTT.
use super::transcribe::Transcript;
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The text alone.
    Text,
    /// `{"text": ...}` (OpenAI's `json`).
    Json,
    /// Text, language, duration and segments (OpenAI's `verbose_json`).
    VerboseJson,
    Srt,
    Vtt,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "text" => Self::Text,
            "json" => Self::Json,
            "verbose_json" => Self::VerboseJson,
            "srt" => Self::Srt,
            "vtt" => Self::Vtt,
            other => bail!("unknown format `{other}` (text, json, verbose_json, srt, vtt)"),
        })
    }

    /// The HTTP content type of [`render`]'s output.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text | Self::Srt => "text/plain; charset=utf-8",
            Self::Vtt => "text/vtt; charset=utf-8",
            Self::Json | Self::VerboseJson => "application/json",
        }
    }
}

/// `seconds` as `HH:MM:SS<sep>mmm`.
fn timestamp(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

/// The transcript in `format`; text formats end with a newline.
pub fn render(t: &Transcript, format: Format) -> String {
    let cues = || t.segments.iter().filter(|s| !s.text.trim().is_empty());
    match format {
        Format::Text => format!("{}\n", t.text.trim()),
        Format::Json => serde_json::json!({ "text": t.text.trim() }).to_string(),
        Format::VerboseJson => serde_json::json!({
            "task": t.task,
            "language": t.language,
            "duration": t.duration,
            "text": t.text.trim(),
            "segments": t.segments,
        })
        .to_string(),
        Format::Srt => cues()
            .enumerate()
            .map(|(i, s)| {
                format!("{}\n{} --> {}\n{}\n\n", i + 1, timestamp(s.start, ','), timestamp(s.end, ','), s.text.trim().replace("-->", "->"))
            })
            .collect(),
        Format::Vtt => {
            let mut out = String::from("WEBVTT\n\n");
            for s in cues() {
                out += &format!("{} --> {}\n{}\n\n", timestamp(s.start, '.'), timestamp(s.end, '.'), s.text.trim().replace("-->", "->"));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::transcribe::{Segment, Transcript};
    use super::*;

    fn t() -> Transcript {
        let seg = |id, start, end, text: &str| Segment {
            id,
            seek: 0,
            start,
            end,
            text: text.into(),
            tokens: vec![],
            temperature: 0.0,
            avg_logprob: -0.1,
            compression_ratio: 1.0,
            no_speech_prob: 0.01,
        };
        Transcript {
            task: "transcribe".into(),
            text: " Hello there. General Kenobi.".into(),
            language: "en".into(),
            segments: vec![seg(0, 0.0, 3.2, " Hello there."), seg(1, 3.2, 3661.5, " General Kenobi."), seg(2, 4.0, 4.0, "")],
            duration: 3662.0,
        }
    }

    #[test]
    fn formats() {
        assert_eq!(render(&t(), Format::Text), "Hello there. General Kenobi.\n");
        assert_eq!(render(&t(), Format::Json), r#"{"text":"Hello there. General Kenobi."}"#);
        assert_eq!(
            render(&t(), Format::Srt),
            "1\n00:00:00,000 --> 00:00:03,200\nHello there.\n\n2\n00:00:03,200 --> 01:01:01,500\nGeneral Kenobi.\n\n"
        );
        assert_eq!(
            render(&t(), Format::Vtt),
            "WEBVTT\n\n00:00:00.000 --> 00:00:03.200\nHello there.\n\n00:00:03.200 --> 01:01:01.500\nGeneral Kenobi.\n\n"
        );
        let v: serde_json::Value = serde_json::from_str(&render(&t(), Format::VerboseJson)).unwrap();
        assert_eq!(v["segments"].as_array().unwrap().len(), 3);
        assert_eq!(v["language"], "en");
        assert!(Format::parse("xml").is_err());
    }
}
