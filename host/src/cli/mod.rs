//! `rmlx` subcommands, one file each.
mod bench;
mod convert;
mod generate;
mod info;
mod ls;
mod metrics;
mod openapi;
mod plugins;
mod pull;
mod serve;

use crate::{config::Settings, plugins::Registry};
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "rmlx", version, about = "Inference and conversion server for MLX-format models")]
pub struct Cli {
    /// Configuration file (default: ./rmlx.toml when present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Plugin directory (default: plugins/ beside the binary).
    #[arg(long, global = true)]
    pub plugins: Option<PathBuf>,
    /// Compute dtype for loaded models: model (the files' own), auto (float32
    /// on the CPU backend), float32, float16, bfloat16.
    #[arg(long, global = true)]
    pub dtype: Option<String>,
    /// Dequantize affine layers at load (dense weights; faster batched decode on CPU).
    #[arg(long, global = true)]
    pub dequantize: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List loaded plugins and what each provides.
    Plugins(plugins::Args),
    /// Describe a model directory and the plugins that would serve it.
    Info(info::Args),
    /// Generate text from a prompt.
    Generate(generate::Args),
    /// Serve the HTTP API.
    Serve(serve::Args),
    /// Measure speed: in-process (--model DIR, like mlx_lm.benchmark) or against a server (--url URL).
    Bench(bench::Args),
    /// Print the HTTP API's OpenAPI document.
    Openapi(openapi::Args),
    /// Convert a model into MLX format.
    Convert(convert::Args),
    /// Download a model from the Hugging Face hub into its cache (shared with mlx-lm).
    Pull(pull::Args),
    /// List the models in the Hugging Face hub cache, with their sizes.
    Ls(ls::Args),
    /// Show the runs `rmlx serve` recorded in its SQLite run log, and a run's figures.
    Metrics(metrics::Args),
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let mut flags = serde_json::json!({ "plugins_dir": cli.plugins });
    if let Some(d) = &cli.dtype {
        flags["dtype"] = d.clone().into();
    }
    if cli.dequantize {
        flags["dequantize"] = true.into();
    }
    if let Command::Serve(a) = &cli.command {
        crate::logging::init(&serve::log_options(a))?;
        flags["server"] = serve::flags(a)?;
    }
    let settings = Settings::load(cli.config.as_deref(), flags)?;
    crate::runtime::init(&settings)?;
    match cli.command {
        Command::Plugins(a) => plugins::run(a, &settings),
        Command::Info(a) => info::run(a, &settings),
        Command::Generate(a) => generate::run(a, &settings),
        Command::Serve(a) => serve::run(a, &settings),
        Command::Bench(a) => bench::run(a, &settings),
        Command::Openapi(a) => openapi::run(a, &settings),
        Command::Convert(a) => convert::run(a, &settings),
        Command::Metrics(a) => metrics::run(a, &settings),
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
