//! The model catalog: the models a server may serve, by id, each with its
//! directory, its config facts and (loaded lazily, shared with the API side)
//! its tokenizer and chat template.
use crate::model::{text::TextSide, ModelDir};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::UNIX_EPOCH;

/// A servable model: where it is, its id, and (loaded lazily, shared with the
/// API side) its tokenizer and chat template.
pub struct ModelEntry {
    pub id: String,
    pub path: PathBuf,
    pub model_type: String,
    /// config.json `max_position_embeddings` (or similar), when given.
    pub context_length: Option<usize>,
    pub vocab_size: Option<usize>,
    /// Seconds since the epoch of the config file (OpenAI's `created`).
    pub created: u64,
    text: OnceLock<std::result::Result<Arc<TextSide>, String>>,
}

impl ModelEntry {
    pub fn open(id: String, path: &Path) -> Result<Self> {
        let dir = ModelDir::open(path)?;
        let cfg = &dir.config;
        let pick = |keys: &[&str]| {
            keys.iter().find_map(|k| {
                cfg.get(*k)
                    .or_else(|| cfg.get("text_config").and_then(|t| t.get(*k)))
                    .and_then(|v| v.as_u64())
            })
        };
        let context_length = pick(&[
            "max_position_embeddings",
            "max_sequence_length",
            "seq_length",
            "n_positions",
        ])
        .map(|v| v as usize);
        let vocab_size = pick(&["vocab_size"]).map(|v| v as usize);
        let created = std::fs::metadata(dir.file("config.json"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            id,
            path: dir.path.clone(),
            model_type: dir.model_type,
            context_length,
            vocab_size,
            created,
            text: OnceLock::new(),
        })
    }

    /// Tokenizer, chat template and EOS ids (loaded once; no MLX involved).
    pub fn text(&self) -> Result<Arc<TextSide>> {
        self.text
            .get_or_init(|| {
                ModelDir::open(&self.path)
                    .and_then(|d| TextSide::load(&d))
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(|e| anyhow!(e))
    }
}

/// The models a server may serve, by id.
#[derive(Default)]
pub struct ModelCatalog {
    pub entries: Vec<Arc<ModelEntry>>,
}

impl ModelCatalog {
    /// `models`: (optional id, directory); `models_dirs`: directories whose
    /// sub-directories with a config.json are models. The id is the folder's
    /// name unless given. Duplicate ids are an error.
    pub fn discover(models: &[(Option<String>, PathBuf)], models_dirs: &[PathBuf]) -> Result<Self> {
        let mut list: Vec<(Option<String>, PathBuf)> = models.to_vec();
        for d in models_dirs {
            let rd =
                std::fs::read_dir(d).with_context(|| format!("--models-dir {}", d.display()))?;
            let mut subs: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("config.json").is_file())
                .collect();
            subs.sort();
            list.extend(subs.into_iter().map(|p| (None, p)));
        }
        let mut entries: Vec<Arc<ModelEntry>> = Vec::new();
        for (id, path) in list {
            let id = match id {
                Some(id) => id,
                None => folder_name(&path),
            };
            if let Some(prev) = entries.iter().find(|e| e.id == id) {
                if prev.path == path {
                    continue;
                }
                bail!("two models have the id `{id}`: {} and {} (name one in rmlx.toml [[server.models]])", prev.path.display(), path.display());
            }
            entries.push(Arc::new(ModelEntry::open(id, &path)?));
        }
        Ok(Self { entries })
    }

    pub fn get(&self, id: &str) -> Option<Arc<ModelEntry>> {
        self.entries.iter().find(|e| e.id == id).cloned()
    }
}

fn folder_name(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
