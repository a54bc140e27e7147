//! Downloads a model repo from the Hugging Face hub into the hub cache, in
//! huggingface_hub's layout (see mod.rs), so mlx-lm finds what rmlx pulled
//! and the other way round.
//!
//! Routes used (`HF_ENDPOINT`, default https://huggingface.co):
//! - `GET /api/models/{repo}/revision/{rev}`: the commit `rev` points at;
//! - `GET /api/models/{repo}/tree/{commit}?recursive=true`: the files, with
//!   sizes and ids (`lfs.oid`, the sha256, for LFS files; the git blob id
//!   otherwise: the etags huggingface_hub names blobs by), paged by `Link`;
//! - `GET /{repo}/resolve/{commit}/{file}`: a file's bytes (redirects to a
//!   CDN are followed; the token is not sent across hosts).
//!
//! A file downloads into `blobs/<etag>.incomplete`; a dropped connection or
//! an interrupted run resumes from its length with an HTTP `Range` request.
//! `HF_TOKEN` (else the token file huggingface_hub's login writes) goes as
//! `Authorization: Bearer`.
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{header, StatusCode};
use serde::Deserialize;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The files mlx-lm downloads (its `allow_patterns`): weights, configs,
/// tokenizers and templates, not other formats' weights.
const MLX_PATTERNS: &[&str] =
    &["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"];

/// Attempts per file before a download error is final (each resumes).
const ATTEMPTS: usize = 5;

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct Hub {
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    pub token: Option<String>,
    /// The hub cache (see [`super::cache_dir`]).
    pub cache: PathBuf,
}

/// What to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Branch, tag or commit (default `main`).
    pub revision: String,
    /// Every file of the repo, not only those mlx-lm would fetch.
    pub all_files: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self { revision: "main".into(), all_files: false, progress: true }
    }
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    oid: String,
    size: Option<u64>,
}

/// One file to fetch: its path in the repo, blob name and size.
struct RemoteFile {
    path: String,
    etag: String,
    size: Option<u64>,
}

impl Hub {
    /// The hub from `HF_ENDPOINT`, `HF_TOKEN` and the cache variables.
    pub fn from_env() -> Result<Self> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim()
            .trim_end_matches('/')
            .to_string();
        reqwest::Url::parse(&endpoint).with_context(|| format!("HF_ENDPOINT {endpoint:?} is not a URL"))?;
        Ok(Self { endpoint, token: token_from_env(), cache: super::cache_dir() })
    }

    /// Downloads `repo` at `opts.revision` into the cache (what is there
    /// already is kept) and returns its snapshot directory.
    pub fn pull(&self, repo: &str, opts: &PullOptions) -> Result<PathBuf> {
        if !super::is_repo_id(repo) {
            bail!("`{repo}` is not a Hugging Face repo id (org/name)");
        }
        if opts.revision.is_empty() || opts.revision.contains("..") || opts.revision.starts_with('/') {
            bail!("--revision {:?} is not a branch, tag or commit", opts.revision);
        }
        // reqwest runs on tokio: its own small runtime on a thread of its own,
        // so this works from inside a server's runtime as well as outside.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(self.pull_async(repo, opts))
            })
            .join()
            .map_err(|_| anyhow!("the download thread panicked"))?
        })
    }

    async fn pull_async(&self, repo: &str, opts: &PullOptions) -> Result<PathBuf> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("rmlx/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let repo_dir = self.cache.join(super::repo_folder(repo));
        let rev = &opts.revision;
        let info: RevisionInfo = self
            .get_json(&client, &format!("{}/api/models/{repo}/revision/{}", self.endpoint, encode_path(rev)), repo, rev)
            .await?;
        let commit = info.sha;
        if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("{repo}: the hub answered an odd commit id {commit:?}");
        }
        let files = self.list_files(&client, repo, &commit).await?;
        let files: Vec<RemoteFile> = files.into_iter().filter(|f| opts.all_files || wanted(&f.path)).collect();
        if files.is_empty() {
            bail!("{repo}: no model files at {rev} ({commit})");
        }
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        // What still has to come.
        let todo: Vec<&RemoteFile> = files.iter().filter(|f| !snapshot.join(&f.path).exists()).collect();
        let total: u64 = todo.iter().filter_map(|f| f.size).sum();
        let bar = progress_bar(opts.progress && !todo.is_empty(), total);
        for f in &todo {
            bar.set_message(f.path.clone());
            let blob = blobs.join(&f.etag);
            if !blob.is_file() {
                self.fetch_blob(&client, repo, &commit, f, &blob, &bar).await?;
            } else {
                bar.inc(f.size.unwrap_or(0));
            }
            link(&blob, &snapshot.join(&f.path))?;
        }
        bar.finish_and_clear();
        if *rev != commit {
            let r = repo_dir.join("refs").join(rev);
            if let Some(parent) = r.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&r, &commit).with_context(|| format!("writing {}", r.display()))?;
        }
        if !todo.is_empty() {
            eprintln!("{repo}: {} file(s), {} into {}", todo.len(), super::human_bytes(total), snapshot.display());
        }
        Ok(snapshot)
    }

    fn request(&self, client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let r = client.get(url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, client: &reqwest::Client, url: &str, repo: &str, rev: &str) -> Result<T> {
        let resp = self.request(client, url).send().await.with_context(|| format!("GET {url}"))?;
        let resp = self.check(resp, repo, rev)?;
        resp.json().await.with_context(|| format!("GET {url}: not the JSON the hub answers"))
    }

    /// A readable error for the hub's refusals.
    fn check(&self, resp: reqwest::Response, repo: &str, rev: &str) -> Result<reqwest::Response> {
        let s = resp.status();
        if s.is_success() {
            return Ok(resp);
        }
        let url = resp.url().clone();
        match s {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => bail!(
                "{repo}: access refused (HTTP {}) by {}: the repo is gated or private; {}",
                s.as_u16(),
                self.endpoint,
                if self.token.is_some() { "HF_TOKEN does not give access to it" } else { "set HF_TOKEN to a token with access" }
            ),
            StatusCode::NOT_FOUND => bail!("{repo}: not found on {} at revision {rev} ({url})", self.endpoint),
            _ => bail!("{repo}: HTTP {s} from {url}"),
        }
    }

    /// Every file of the repo at `commit`, following the tree's pages.
    async fn list_files(&self, client: &reqwest::Client, repo: &str, commit: &str) -> Result<Vec<RemoteFile>> {
        let mut url = format!("{}/api/models/{repo}/tree/{commit}?recursive=true", self.endpoint);
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let resp = self.request(client, &url).send().await.with_context(|| format!("GET {url}"))?;
            let resp = self.check(resp, repo, commit)?;
            let next = next_link(resp.headers());
            let page: Vec<TreeEntry> = resp.json().await.with_context(|| format!("GET {url}: not a file tree"))?;
            for e in page.into_iter().filter(|e| e.kind == "file") {
                if !safe_rel_path(&e.path) {
                    bail!("{repo}: the hub listed an unsafe path {:?}", e.path);
                }
                let (etag, size) = match e.lfs {
                    Some(l) => (l.oid, l.size.or(e.size)),
                    None => (e.oid.ok_or_else(|| anyhow!("{repo}: {} has no oid in the tree", e.path))?, e.size),
                };
                if etag.is_empty() || !etag.chars().all(|c| c.is_ascii_alphanumeric()) {
                    bail!("{repo}: {} has an odd id {etag:?}", e.path);
                }
                out.push(RemoteFile { path: e.path, etag, size });
            }
            match next {
                Some(n) => url = n,
                None => return Ok(out),
            }
        }
        bail!("{repo}: the file tree has too many pages")
    }

    /// Downloads one file into `blob`, resuming `<blob>.incomplete`.
    async fn fetch_blob(&self, client: &reqwest::Client, repo: &str, commit: &str, f: &RemoteFile, blob: &Path, bar: &ProgressBar) -> Result<()> {
        let part = PathBuf::from(format!("{}.incomplete", blob.display()));
        let url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, encode_path(&f.path));
        let mut last_err = None;
        // Bytes already counted on the bar for this file.
        let mut shown = 0u64;
        for attempt in 1..=ATTEMPTS {
            let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            bar.inc(have.saturating_sub(shown));
            shown = shown.max(have);
            if f.size.is_some_and(|s| have == s && s > 0) {
                break;
            }
            match self.fetch_range(client, &url, &part, have, f, bar, &mut shown, repo, commit).await {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => {
                    if e.downcast_ref::<Final>().is_some() {
                        return Err(e);
                    }
                    bar.suspend(|| eprintln!("{}: {e:#} (attempt {attempt}/{ATTEMPTS}; resuming)", f.path));
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e.context(format!("downloading {} ({} bytes kept in {} to resume)", f.path, std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0), part.display())));
        }
        let got = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if let Some(s) = f.size {
            if got != s {
                bail!("downloading {}: got {got} bytes, the hub lists {s}", f.path);
            }
        }
        std::fs::rename(&part, blob).with_context(|| format!("renaming {} to {}", part.display(), blob.display()))
    }

    /// One request for `url` from byte `have` on, appended to `part`.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_range(
        &self,
        client: &reqwest::Client,
        url: &str,
        part: &Path,
        have: u64,
        f: &RemoteFile,
        bar: &ProgressBar,
        shown: &mut u64,
        repo: &str,
        commit: &str,
    ) -> Result<()> {
        let mut req = self.request(client, url);
        if have > 0 {
            req = req.header(header::RANGE, format!("bytes={have}-"));
        }
        let resp = req.send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            // What we have is not a prefix of the file: start again.
            std::fs::remove_file(part).ok();
            bail!("the server refused to resume at byte {have}");
        }
        let mut resp = match self.check(resp, repo, commit) {
            Ok(r) => r,
            Err(e) if status.is_client_error() => return Err(e.context(Final)),
            Err(e) => return Err(e),
        };
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(part).with_context(|| format!("opening {}", part.display()))?;
        if status != StatusCode::PARTIAL_CONTENT && have > 0 {
            // The server sent the whole file: drop the partial copy.
            file.set_len(0)?;
            bar.set_position(bar.position().saturating_sub(have));
            *shown = 0;
        }
        let mut written = if status == StatusCode::PARTIAL_CONTENT { have } else { 0 };
        while let Some(chunk) = resp.chunk().await.with_context(|| format!("reading {} at byte {written}", f.path))? {
            file.write_all(&chunk).with_context(|| format!("writing {}", part.display()))?;
            written += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
            *shown = (*shown).max(written);
        }
        file.flush()?;
        if let Some(s) = f.size {
            if written < s {
                bail!("the connection closed at byte {written} of {s}");
            }
        }
        Ok(())
    }
}

/// A download error that retrying cannot fix (a 4xx).
#[derive(Debug)]
struct Final;

impl std::fmt::Display for Final {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not retried")
    }
}

/// `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the token file
/// (`HF_TOKEN_PATH`, else `HF_HOME/token`, else ~/.cache/huggingface/token).
fn token_from_env() -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if let Some(t) = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t);
    }
    let path = env("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        env("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| dirs::home_dir().map(|h| h.join(".cache").join("huggingface")))
            .map(|h| h.join("token"))
    })?;
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Whether mlx-lm would download `path` (its allow patterns, matched on the
/// whole path as fnmatch does).
fn wanted(path: &str) -> bool {
    MLX_PATTERNS.iter().any(|p| match p.strip_prefix('*') {
        Some(suffix) => path.ends_with(suffix),
        None => path == *p,
    })
}

/// A relative path with no `..`, root or prefix.
fn safe_rel_path(p: &str) -> bool {
    !p.is_empty() && Path::new(p).components().all(|c| matches!(c, Component::Normal(_)))
}

/// Percent-encodes what a path segment may not hold (keeps `/`).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(h: &header::HeaderMap) -> Option<String> {
    let link = h.get(header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

/// `snapshot_file` -> a relative symlink to `blob` (huggingface_hub's way).
fn link(blob: &Path, snapshot_file: &Path) -> Result<()> {
    let parent = snapshot_file.parent().ok_or_else(|| anyhow!("{} has no parent", snapshot_file.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    if snapshot_file.symlink_metadata().is_ok() {
        std::fs::remove_file(snapshot_file).ok();
    }
    #[cfg(unix)]
    {
        // snapshots/<commit>/<a/b/file> -> ../../(../..)blobs/<etag>
        let repo_dir = blob.parent().and_then(Path::parent).ok_or_else(|| anyhow!("odd blob path {}", blob.display()))?;
        let depth = snapshot_file.strip_prefix(repo_dir).map(|r| r.components().count() - 1).unwrap_or(2);
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, snapshot_file)
            .with_context(|| format!("linking {} to {}", snapshot_file.display(), target.display()))
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, snapshot_file).map(|_| ()).with_context(|| format!("copying {} to {}", blob.display(), snapshot_file.display()))
    }
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_as_mlx_lm() {
        for p in ["config.json", "model-00001-of-00002.safetensors", "tokenizer.model", "chat_template.jinja", "sub/x.json"] {
            assert!(wanted(p), "{p}");
        }
        for p in ["pytorch_model.bin", "model.gguf", "README.md", ".gitattributes"] {
            assert!(!wanted(p), "{p}");
        }
    }

    #[test]
    fn paths() {
        assert!(safe_rel_path("a/b.json"));
        for bad in ["", "../x", "/etc/passwd", "a/../../x"] {
            assert!(!safe_rel_path(bad), "{bad}");
        }
        assert_eq!(encode_path("a b/c#d.json"), "a%20b/c%23d.json");
    }

    #[test]
    fn link_header() {
        let mut h = header::HeaderMap::new();
        h.insert(header::LINK, "<https://h/api/models/a/b/tree/main?cursor=x>; rel=\"next\"".parse().unwrap());
        assert_eq!(next_link(&h).as_deref(), Some("https://h/api/models/a/b/tree/main?cursor=x"));
    }
}
