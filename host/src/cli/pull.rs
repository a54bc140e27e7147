//! `rmlx pull REPO`: download a model from the Hugging Face hub into the hub
//! cache (shared with mlx-lm), and print where it is. Nothing is loaded.
use crate::config::Settings;
use crate::hub::{Hub, PullOptions};
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Repo id on the hub, as org/name (e.g. mlx-community/Qwen3-0.6B-4bit).
    pub repo: String,
    /// Branch, tag or commit to download.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Download every file of the repo, not only those mlx-lm fetches
    /// (safetensors, JSON, tokenizer and template files).
    #[arg(long)]
    pub all_files: bool,
}

pub fn run(args: Args, _settings: &Settings) -> Result<()> {
    let hub = Hub::from_env()?;
    let opts = PullOptions { revision: args.revision, all_files: args.all_files, progress: true };
    let path = hub.pull(&args.repo, &opts)?;
    println!("{}", path.display());
    Ok(())
}
