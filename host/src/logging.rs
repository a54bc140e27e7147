//! Where log lines go and how they look: stderr, `text` (colour only on a
//! terminal) or `json` (one object per line), filtered by `--log-level`, else
//! the `RMLX_LOG` environment variable (an `EnvFilter` directive list, like
//! `RUST_LOG`), else the command's default (`rmlx serve`: info, one line per
//! request; other commands: warnings only).
//!
//! tracing-subscriber's own `fmt` layer does the formatting (its `json`
//! feature for JSON), so the format of a line is its documented one.
use anyhow::{Context, Result};
use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn name(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// rmlx's own lines at this level; libraries (HTTP server, tokenizers)
    /// at warnings at most, so `debug` is rmlx's debug, not hyper's.
    pub fn filter(self) -> String {
        match self {
            LogLevel::Off | LogLevel::Error | LogLevel::Warn => self.name().to_string(),
            l => format!("warn,rmlx={}", l.name()),
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines: `TIME LEVEL target: message key=value ...`.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message`, the fields, `target`.
    Json,
}

#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// `--log-level`: wins over RMLX_LOG.
    pub level: Option<LogLevel>,
    pub format: LogFormat,
    /// Without --log-level and RMLX_LOG.
    pub default_level: LogLevel,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self { level: None, format: LogFormat::Text, default_level: LogLevel::Warn }
    }
}

/// The filter `o` asks for (see the module doc).
pub fn filter(o: &LogOptions) -> Result<EnvFilter> {
    if let Some(l) = o.level {
        return Ok(EnvFilter::new(l.filter()));
    }
    match std::env::var("RMLX_LOG") {
        Ok(s) if !s.trim().is_empty() => EnvFilter::try_new(s.trim())
            .with_context(|| format!("RMLX_LOG={s:?} is not a log filter (e.g. info, or warn,rmlx::engine=debug)")),
        _ => Ok(EnvFilter::new(o.default_level.filter())),
    }
}

/// Installs the process's log subscriber (once: later calls do nothing).
pub fn init(o: &LogOptions) -> Result<()> {
    let filter = filter(o)?;
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    let _ = match o.format {
        // Colour codes only for a person at a terminal (and not with NO_COLOR).
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).try_init()
        }
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
    };
    Ok(())
}

