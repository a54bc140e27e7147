//! `rmlx ls`: the models in the Hugging Face hub cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else ~/.cache/huggingface/hub), with their sizes.
use crate::config::Settings;
use crate::hub::{cache_dir, human_bytes, list_cached};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hub cache to list [default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, _settings: &Settings) -> Result<()> {
    let cache = args.cache_dir.unwrap_or_else(cache_dir);
    let models = list_cached(&cache)?;
    if args.json {
        println!("{}", serde_json::json!({"cache": cache, "models": models}));
        return Ok(());
    }
    if models.is_empty() {
        println!("no models in {}", cache.display());
        return Ok(());
    }
    let w = models.iter().map(|m| m.repo.len()).max().unwrap_or(4).max(4);
    println!("{:<w$}  {:>9}  {:<12}  PATH", "REPO", "SIZE", "REVISION");
    for m in &models {
        let rev = m.revision.as_deref().map(|r| &r[..r.len().min(12)]).unwrap_or("-");
        let mut size = human_bytes(m.size_bytes);
        if m.incomplete > 0 {
            size.push('+');
        }
        let path = m.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(no complete snapshot)".into());
        println!("{:<w$}  {:>9}  {:<12}  {}", m.repo, size, rev, path);
    }
    println!("cache: {} (+: a download is unfinished; `rmlx pull` resumes it)", cache.display());
    Ok(())
}
