//! An MLX model directory (the mlx-community layout): config.json, weights
//! (`model.safetensors`, or shards with `model.safetensors.index.json`),
//! tokenizer files and the chat template.
use super::safetensors;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct ModelDir {
    pub path: PathBuf,
    pub config_text: String,
    pub config: serde_json::Value,
    pub model_type: String,
    pub weight_files: Vec<PathBuf>,
}

impl ModelDir {
    /// Opens and checks a model directory; every problem is a one-line error.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("model directory not found: {}", path.display());
        }
        if !path.is_dir() {
            bail!("{} is not a directory (expected an MLX model directory)", path.display());
        }
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            bail!("{}: no config.json (is this an MLX model directory?)", path.display());
        }
        let config_text =
            std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&config_text)
            .map_err(|e| anyhow::anyhow!("{}: malformed JSON: {e}", config_path.display()))?;
        if !config.is_object() {
            bail!("{}: expected a JSON object", config_path.display());
        }
        let model_type = match config.get("model_type") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => bail!("{}: model_type must be a string", config_path.display()),
            None => bail!("{}: no model_type field", config_path.display()),
        };
        let weight_files = find_weights(path)?;
        Ok(Self { path: path.to_path_buf(), config_text, config, model_type, weight_files })
    }

    /// Bytes of weights on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.weight_files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// The weight files, from the index when there is one, each checked for truncation.
fn find_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: malformed JSON: {e}", index.display()))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: no weight_map", index.display());
        };
        let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        names.sort();
        names.dedup();
        let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        for f in &files {
            if !f.is_file() {
                bail!("{} lists {} but the file is missing", index.display(), f.display());
            }
        }
        files
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        files
    };
    if files.is_empty() {
        bail!("{}: no *.safetensors weights", dir.display());
    }
    for f in &files {
        safetensors::check_file(f)?;
    }
    Ok(files)
}
