//! `rmlx` subcommands, one file each.
mod bench;
mod chat;
pub mod common;
mod convert;
mod eval;
mod generate;
mod info;
mod kv_calibrate;
mod ls;
mod metrics;
mod openapi;
mod plugins;
mod pull;
mod serve;
mod textgen;
mod transcribe;

use crate::{config::Settings, plugins::Registry};
use anyhow::Result;
use clap::{Parser, Subcommand};
use common::{ConfigFlags, LoadFlags, PluginFlags, With};

#[derive(Parser, Debug)]
#[command(name = "rmlx", version, about = "Inference and conversion server for MLX-format models")]
pub struct Cli {
    /// The flags of `common.rs`, accepted before the command too (`rmlx
    /// --dtype float32 serve`) for compatibility; the command's own wins.
    #[command(flatten)]
    pub before: common::Before,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List loaded plugins and what each provides.
    Plugins(With<plugins::Args, PluginFlags>),
    /// Describe a model directory and the plugins that would serve it.
    Info(With<info::Args, PluginFlags>),
    /// Generate text from a prompt (through the chat template when the model has one).
    Generate(With<generate::Args, LoadFlags>),
    /// Chat with a model in the terminal: history, a system prompt, /reset, tokens per second.
    Chat(With<chat::Args, LoadFlags>),
    /// Serve the HTTP API.
    Serve(With<serve::Args, LoadFlags>),
    /// Measure speed: in-process (--model DIR, like mlx_lm.benchmark) or against a server (--url URL).
    Bench(With<bench::Args, LoadFlags>),
    /// Evaluate a model: `eval ppl` (perplexity under a KV-cache family).
    Eval(eval::Args),
    /// Fit the per-model calibration of the KV families that use one (per-layer key and value means).
    KvCalibrate(With<kv_calibrate::Args, LoadFlags>),
    /// Transcribe (or translate) speech with a Whisper model: text, json, srt or vtt.
    Transcribe(With<transcribe::Args, LoadFlags>),
    /// Print the HTTP API's OpenAPI document.
    Openapi(openapi::Args),
    /// Convert a model into MLX format.
    Convert(convert::Args),
    /// Download a model from the Hugging Face hub into its cache (shared with mlx-lm).
    Pull(pull::Args),
    /// List the models in the Hugging Face hub cache, with their sizes.
    Ls(ls::Args),
    /// Show the runs `rmlx serve` recorded in its SQLite run log, and a run's figures.
    Metrics(With<metrics::Args, ConfigFlags>),
}

pub fn run() -> Result<()> {
    let cli = common::parse();
    // The command's flag group over the same flags given before the command.
    let g = match &cli.command {
        Command::Plugins(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Info(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Generate(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Chat(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Serve(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Bench(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Eval(a) => cli.before.clone().merge(a.flags()),
        Command::KvCalibrate(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Transcribe(a) => cli.before.clone().merge(a.flags.clone()),
        Command::Metrics(a) => cli.before.clone().merge(a.flags.clone()),
        _ => cli.before.clone(),
    };
    if !matches!(cli.command, Command::Serve(_)) {
        common::quiet_on_closed_pipe();
    }
    let mut flags = serde_json::json!({ "plugins_dir": g.plugins });
    if let Some(d) = &g.dtype {
        flags["dtype"] = d.clone().into();
    }
    if let Some(d) = &g.dequantize {
        flags["dequantize"] = d.clone().into();
    }
    for (key, v) in ["kv_cache", "kv_cache_k", "kv_cache_v"].into_iter().zip(&g.kv_cache) {
        if let Some(v) = v {
            flags[key] = v.clone().into();
        }
    }
    if let Command::Serve(a) = &cli.command {
        crate::logging::init(&serve::log_options(&a.args))?;
        flags["server"] = serve::flags(&a.args)?;
    }
    let settings = Settings::load(g.config.as_deref(), flags)?;
    crate::runtime::init(&settings)?;
    match cli.command {
        Command::Plugins(a) => plugins::run(a.args, &settings),
        Command::Info(a) => info::run(a.args, &settings),
        Command::Generate(a) => generate::run(a.args, &settings),
        Command::Chat(a) => chat::run(a.args, &settings),
        Command::Serve(a) => serve::run(a.args, &settings),
        Command::Bench(a) => bench::run(a.args, &settings),
        Command::Eval(a) => eval::run(a, &settings),
        Command::KvCalibrate(a) => kv_calibrate::run(a.args, &settings),
        Command::Transcribe(a) => transcribe::run(a.args, &settings),
        Command::Openapi(a) => openapi::run(a, &settings),
        Command::Convert(a) => convert::run(a, &settings),
        Command::Metrics(a) => metrics::run(a.args, &settings),
        Command::Pull(a) => pull::run(a, &settings),
        Command::Ls(a) => ls::run(a, &settings),
    }
}

/// Loads the plugin directory, warning about files that were refused.
pub fn registry(settings: &Settings) -> Result<Registry> {
    let dir = settings.plugins_dir();
    let reg = Registry::load(&dir)?;
    for r in &reg.refused {
        eprintln!("warning: skipped {}: {}", r.path.display(), r.reason);
    }
    Ok(reg)
}
