//! The model catalog: the models a server may serve, by id, each with its
//! directory, its config facts and (loaded lazily, shared with the API side)
//! its tokenizer and chat template.
use crate::model::{pooling::EmbedSpec, text::TextSide, ModelDir};
use anyhow::{anyhow, Context, Result};
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
    /// How it embeds, when it is an embedding model (model/pooling.rs):
    /// such a model serves /v1/embeddings and no generation routes.
    pub embedding: Option<EmbedSpec>,
    /// Its default drafter for speculative decoding (`rmlx serve
    /// --draft-model`, `--draft-kind`), loaded with it (speculative/serve.rs).
    pub draft: Option<crate::engine::speculative::serve::DraftSpec>,
    /// Its other drafters, after the default (`--drafter`, `drafters` in
    /// [[server.models]]): a request names one by kind (`draft_kind`).
    /// Each kind at most once among all of them ([`ModelEntry::drafters`]).
    pub extra_drafters: Vec<crate::engine::speculative::serve::DraftSpec>,
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
        let embedding = EmbedSpec::detect(&dir.path, &dir.model_type, cfg)?;
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
            embedding,
            draft: None,
            extra_drafters: Vec::new(),
            text: OnceLock::new(),
        })
    }

    /// Every drafter it is served with, the default first.
    pub fn drafters(&self) -> impl Iterator<Item = &crate::engine::speculative::serve::DraftSpec> {
        self.draft.iter().chain(&self.extra_drafters)
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

/// A model the server found but cannot serve, and why (listed by
/// GET /v1/models as unavailable; it never stops the server).
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub id: String,
    pub path: PathBuf,
    pub reason: String,
}

/// The models a server may serve, by id.
#[derive(Default)]
pub struct ModelCatalog {
    pub entries: Vec<Arc<ModelEntry>>,
    /// Models found that cannot be served (a broken config.json, an unknown
    /// `model_type`, a duplicate id, ...).
    pub unavailable: Vec<Unavailable>,
}

impl ModelCatalog {
    /// `models`: (optional id, directory); `models_dirs`: directories whose
    /// sub-directories with a config.json are models, and Hugging Face hub
    /// caches (`models--org--name` folders, id `org/name`, the snapshot of
    /// `refs/main`). The id is the folder's name (a symlink's own name) unless
    /// given. A model that cannot be opened is listed in `unavailable`, not
    /// an error; only an unreadable `models_dirs` entry is.
    pub fn discover(models: &[(Option<String>, PathBuf)], models_dirs: &[PathBuf]) -> Result<Self> {
        let mut list: Vec<(Option<String>, PathBuf)> = models.to_vec();
        for d in models_dirs {
            let rd =
                std::fs::read_dir(d).with_context(|| format!("--models-dir {}", d.display()))?;
            let mut subs: Vec<(Option<String>, PathBuf)> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| {
                    let name = p.file_name()?.to_string_lossy().into_owned();
                    match crate::hub::repo_from_folder(&name) {
                        // A hub cache: the snapshot `main` points at (else the newest).
                        Some(repo) => {
                            let snap = crate::hub::snapshot_in(&p, "main").or_else(|| crate::hub::newest_snapshot(&p))?;
                            Some((Some(repo), snap))
                        }
                        None => p.join("config.json").is_file().then_some((None, p)),
                    }
                })
                .collect();
            subs.sort_by(|a, b| a.1.cmp(&b.1));
            list.extend(subs);
        }
        let mut cat = Self::default();
        for (id, path) in list {
            let id = match id {
                Some(id) => id,
                None => folder_name(&path),
            };
            let taken = cat.entries.iter().map(|e| (&e.id, &e.path)).chain(cat.unavailable.iter().map(|u| (&u.id, &u.path))).find(|(i, _)| **i == id);
            if let Some((_, prev)) = taken {
                if *prev == path {
                    continue;
                }
                let reason = format!("the id `{id}` is taken by {} (name one in rmlx.toml [[server.models]])", prev.display());
                cat.unavailable.push(Unavailable { id, path, reason });
                continue;
            }
            match ModelEntry::open(id.clone(), &path) {
                Ok(e) => cat.entries.push(Arc::new(e)),
                Err(e) => cat.unavailable.push(Unavailable { id, path, reason: format!("{e:#}") }),
            }
        }
        Ok(cat)
    }

    /// Moves the models no loaded plugin can serve (an unknown `model_type`,
    /// an unsupported `quant_method`) to `unavailable`.
    pub fn check(&mut self, reg: &crate::plugins::Registry) {
        let (ok, bad): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries).into_iter().map(|e| {
            let why = reg.architecture_plugin(&e.model_type).err().or_else(|| {
                let dir = ModelDir::open(&e.path).ok()?;
                let quant = crate::model::QuantSpec::from_config(&dir.config).ok()?;
                quant.check_method(&|mode| reg.weight_quant_plugin(mode).is_ok()).err()
            });
            (e, why)
        }).partition(|(_, why)| why.is_none());
        self.entries = ok.into_iter().map(|(e, _)| e).collect();
        for (e, why) in bad {
            let reason = why.map(|w| format!("{w:#}")).unwrap_or_default();
            self.unavailable.push(Unavailable { id: e.id.clone(), path: e.path.clone(), reason });
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<ModelEntry>> {
        self.entries.iter().find(|e| e.id == id).cloned()
    }

    /// Why `id` cannot be served, when it is a model that was found.
    pub fn unavailable(&self, id: &str) -> Option<&Unavailable> {
        self.unavailable.iter().find(|u| u.id == id)
    }

    /// The one servable model, when there is exactly one (a request may
    /// then leave `model` out).
    pub fn only(&self) -> Option<Arc<ModelEntry>> {
        match self.entries.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }
}

/// A model's default id: the folder's name as given, so a symlink is named
/// by the link, not its target (`.` and the like: the real folder's name).
fn folder_name(p: &Path) -> String {
    match p.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => {
            let c = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| c.display().to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::folder_name;
    use std::path::Path;

    #[test]
    fn folder_names() {
        assert_eq!(folder_name(Path::new("/a/b/model")), "model");
        assert_eq!(folder_name(Path::new("rel/model/")), "model");
        let here = std::env::current_dir().unwrap();
        assert_eq!(folder_name(Path::new(".")), here.file_name().unwrap().to_string_lossy());
    }
}
