//! Hugging Face hub models: `--model` takes a directory or a repo id
//! (`mlx-community/Qwen3-0.6B-4bit`). A repo id resolves in the local cache
//! that huggingface_hub (and so mlx-lm) uses, and is downloaded into it when
//! missing (download.rs), so rmlx and mlx-lm share one copy.
//!
//! The cache layout (huggingface_hub's):
//! ```text
//! <cache>/models--org--name/
//!   refs/main                 the commit hash `main` points at
//!   blobs/<etag>              file contents, named by the hub's etag
//!   snapshots/<commit>/<file> relative symlinks into blobs/
//! ```
//! `<cache>` is `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub mod download;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub use download::{Hub, PullOptions};

/// The hub cache directory from the environment (see the module docs).
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return d;
    }
    if let Some(h) = env("HF_HOME") {
        return h.join("hub");
    }
    let cache = env("XDG_CACHE_HOME")
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// True for `org/name`: one slash, each part of letters, digits, `-`, `_`
/// and `.`, neither starting with `.` or `-` (the hub's rule for model ids).
pub fn is_repo_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else { return false };
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    part(org) && part(name)
}

/// `org/name` -> `models--org--name`.
pub fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// `models--org--name` -> `org/name` (None for other names).
pub fn repo_from_folder(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    let (org, name) = rest.split_once("--")?;
    let id = format!("{org}/{name}");
    is_repo_id(&id).then_some(id)
}

/// The snapshot directory of a cached repo folder (`models--org--name`) at
/// `revision`: the commit in `refs/<revision>`, or `revision` itself when it
/// is a commit with a snapshot. None when it is not cached.
pub fn snapshot_in(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| revision.to_string());
    if commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let snap = repo_dir.join("snapshots").join(commit);
    snap.join("config.json").is_file().then_some(snap)
}

/// The cached snapshot of `repo` at `revision` in `cache`, if any.
pub fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    snapshot_in(&cache.join(repo_folder(repo)), revision)
}

/// Whether downloads are off (`HF_HUB_OFFLINE=1`, as huggingface_hub).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// A model given as `--model`: a directory, or a repo id found in the hub
/// cache or downloaded into it.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub path: PathBuf,
    /// The repo id when `--model` named one (its natural model id).
    pub repo: Option<String>,
}

/// Resolves `--model`: an existing directory is used as it is; a repo id
/// (`org/name`) comes from the hub cache, downloaded on a miss.
pub fn resolve(spec: &str) -> Result<ResolvedModel> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(ResolvedModel { path: p.to_path_buf(), repo: None });
    }
    if !is_repo_id(spec) {
        if p.exists() {
            bail!("--model {spec}: not a directory");
        }
        bail!("--model {spec}: no such directory, and not a Hugging Face repo id (org/name)");
    }
    let cache = cache_dir();
    if let Some(snap) = cached_snapshot(&cache, spec, "main") {
        return Ok(ResolvedModel { path: snap, repo: Some(spec.to_string()) });
    }
    if offline() {
        bail!("--model {spec}: no such directory, not in the hub cache {} and HF_HUB_OFFLINE is set", cache.display());
    }
    let hub = Hub::from_env()?;
    eprintln!("{spec}: not in {}, downloading from {}", cache.display(), hub.endpoint);
    let path = hub
        .pull(spec, &PullOptions::default())
        .with_context(|| format!("--model {spec}: no such directory; downloading it from {} failed", hub.endpoint))?;
    Ok(ResolvedModel { path, repo: Some(spec.to_string()) })
}

/// [`resolve`] for the commands that take one model: the directory.
pub fn resolve_dir(spec: &Path) -> Result<PathBuf> {
    match spec.to_str() {
        Some(s) => resolve(s).map(|r| r.path),
        None => Ok(spec.to_path_buf()),
    }
}

/// A model in the hub cache (what `rmlx ls` lists).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedModel {
    pub repo: String,
    /// The snapshot `refs/main` points at (else the newest snapshot).
    pub path: Option<PathBuf>,
    pub revision: Option<String>,
    /// Bytes of blobs/ (every revision, partial downloads excluded).
    pub size_bytes: u64,
    /// Files still downloading (`*.incomplete`).
    pub incomplete: usize,
}

/// The models in a hub cache, by repo id.
pub fn list_cached(cache: &Path) -> Result<Vec<CachedModel>> {
    let rd = match std::fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", cache.display())),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(repo) = repo_from_folder(&name) else { continue };
        let dir = e.path();
        let (mut size_bytes, mut incomplete) = (0u64, 0usize);
        if let Ok(blobs) = std::fs::read_dir(dir.join("blobs")) {
            for b in blobs.flatten() {
                if b.file_name().to_string_lossy().ends_with(".incomplete") {
                    incomplete += 1;
                } else {
                    size_bytes += b.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let path = snapshot_in(&dir, "main").or_else(|| newest_snapshot(&dir));
        let revision = path.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        out.push(CachedModel { repo, path, revision, size_bytes, incomplete });
    }
    out.sort_by(|a, b| a.repo.to_lowercase().cmp(&b.repo.to_lowercase()));
    Ok(out)
}

/// The most recently modified snapshot with a config.json.
pub fn newest_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(repo_dir.join("snapshots"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// `1234567` -> `1.2 MB` (decimal units, as the hub shows sizes).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in ["mlx-community/Qwen3-0.6B-4bit", "a/b", "Org_1/name.v2"] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in ["", "name", "a/b/c", "./x", "../x", "/abs", "a/", "/b", "a/.b", "a/-b", "a/b c", "a/b..c"] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn folders_round_trip() {
        assert_eq!(repo_folder("mlx-community/Qwen3-0.6B-4bit"), "models--mlx-community--Qwen3-0.6B-4bit");
        assert_eq!(repo_from_folder("models--mlx-community--Qwen3-0.6B-4bit").as_deref(), Some("mlx-community/Qwen3-0.6B-4bit"));
        assert_eq!(repo_from_folder("datasets--a--b"), None);
        assert_eq!(repo_from_folder("models--a"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
    }
}
