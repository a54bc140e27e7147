//! Settings, layered with figment: built-in defaults < `rmlx.toml` (or
//! `--config FILE`) < `RMLX_*` environment (`__` separates sections, e.g.
//! `RMLX_SERVER__PORT=9000`) < command-line flags.
use anyhow::{bail, Result};
use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Where plugins are loaded from; default: `plugins/` beside the binary.
    pub plugins_dir: Option<PathBuf>,
    /// MLX memory limit in GB (host-wide; plugins see it too).
    pub memory_limit_gb: Option<f64>,
    /// Compute dtype models are loaded in: auto (the default: float32 on the
    /// CPU backend, the files' own elsewhere), model (the files' own),
    /// float32, float16, bfloat16.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Dequantize affine layers at load (dense weights in the compute
    /// dtype): auto (the default: on a CPU when the dense weights fit), on
    /// (also `true`), off (also `false`).
    #[serde(default = "default_dequantize", deserialize_with = "bool_or_string")]
    pub dequantize: String,
    /// KV-cache family of keys and values (`f16`, `q8`, `q4`, `turbo3`, ...,
    /// `rmlx plugins` lists them): unset (or `auto`) is the dense family of
    /// the model's activation dtype.
    #[serde(default)]
    pub kv_cache: Option<String>,
    /// The keys' family, over `kv_cache`.
    #[serde(default)]
    pub kv_cache_k: Option<String>,
    /// The values' family, over `kv_cache`.
    #[serde(default)]
    pub kv_cache_v: Option<String>,
    pub server: ServerSettings,
    pub generate: GenerateSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` or `x-api-key: KEY` (all routes but /health).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Models to serve: `[[server.models]]` with `path` and optional `id`
    /// (default: the folder's name).
    #[serde(default)]
    pub models: Vec<ServedModel>,
    /// Directories whose sub-directories are models.
    #[serde(default)]
    pub models_dirs: Vec<PathBuf>,
    /// Requests that may wait behind the running one; more get 429.
    #[serde(default = "default_queue")]
    pub max_queue_depth: usize,
    /// Models kept in memory at once (least recently used goes first).
    #[serde(default = "default_loaded")]
    pub max_loaded_models: usize,
    /// Seconds a model stays loaded after its last request (0: forever).
    #[serde(default)]
    pub idle_timeout: u64,
    /// More `Host` names accepted on a loopback bind (`--allowed-host`).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may call the API from a browser (`--cors-origin`).
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Largest request body, bytes (413 above).
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// max_tokens for chat / messages requests that give none (capped by the context).
    #[serde(default = "default_chat_max")]
    pub default_max_tokens: usize,
    /// The SQLite run log `rmlx metrics` reads (default: `metrics.sqlite` in
    /// the rmlx cache dir, `~/.cache/rmlx`).
    #[serde(default)]
    pub metrics_db: Option<PathBuf>,
    /// Record no run log.
    #[serde(default)]
    pub no_metrics_db: bool,
    /// The KV prefix cache's SSD tier: evicted blocks are kept in this
    /// directory (off when unset) ...
    #[serde(default)]
    pub kv_ssd_dir: Option<PathBuf>,
    /// ... up to this many GB per model (default 10).
    #[serde(default)]
    pub kv_ssd_gb: Option<f64>,
    /// Speculative decoding runs while a lane decodes at most this many
    /// sequences (`--spec-max-batch`, default 8).
    #[serde(default)]
    pub spec_max_batch: Option<usize>,
    /// Image inputs of the chat routes (`[server.images]`).
    #[serde(default)]
    pub images: ImageSettings,
}

/// `[server.images]`: limits and permissions for image parts (docs/SERVER.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageSettings {
    /// Largest encoded image (data URL payload, HTTP body or file), bytes.
    pub max_bytes: usize,
    /// Largest decoded image, width * height.
    pub max_pixels: u64,
    /// Seconds an `http(s)://` fetch may take in all.
    pub fetch_timeout_secs: u64,
    /// Redirects an `http(s)://` fetch follows.
    pub max_redirects: usize,
    /// Let image URLs reach loopback, private and link-local addresses.
    pub allow_private_urls: bool,
    /// Directories `file://` image URLs may read (none: file URLs refused).
    pub allowed_dirs: Vec<PathBuf>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        let m = crate::media::MediaOptions::default();
        Self {
            max_bytes: m.max_bytes,
            max_pixels: m.max_pixels,
            fetch_timeout_secs: m.fetch_timeout.as_secs(),
            max_redirects: m.max_redirects,
            allow_private_urls: m.allow_private,
            allowed_dirs: m.allowed_dirs,
        }
    }
}

impl ImageSettings {
    pub fn options(&self) -> crate::media::MediaOptions {
        crate::media::MediaOptions {
            max_bytes: self.max_bytes,
            max_pixels: self.max_pixels,
            fetch_timeout: std::time::Duration::from_secs(self.fetch_timeout_secs),
            max_redirects: self.max_redirects,
            allow_private: self.allow_private_urls,
            allowed_dirs: self.allowed_dirs.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedModel {
    #[serde(default)]
    pub id: Option<String>,
    pub path: PathBuf,
    /// Its draft model for speculative decoding (docs/SPECULATIVE.md): with
    /// `num_draft_tokens` and `draft_kind`, its first drafter (the default).
    #[serde(default)]
    pub draft_model: Option<PathBuf>,
    /// Draft tokens per round at first (default 3).
    #[serde(default)]
    pub num_draft_tokens: Option<usize>,
    /// The drafter kind (default `draft`).
    #[serde(default)]
    pub draft_kind: Option<String>,
    /// More drafters, after the one the keys above give (the first of all
    /// is the model's default; a request names another by kind with
    /// `draft_kind`): `drafters = [{ kind = "mtp" }, { kind = "draft",
    /// model = "DIR", num_draft_tokens = 4 }]`. Each kind once per model.
    #[serde(default)]
    pub drafters: Vec<DrafterSettings>,
}

/// One drafter of a served model, in `[[server.models]] drafters`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrafterSettings {
    /// `draft`, `mtp`, `eagle3` or `dflash`.
    pub kind: String,
    /// Its directory: the draft model (`draft`), the head's own (`eagle3`,
    /// `dflash`); `mtp` reads the model's own checkpoint when absent.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Draft tokens per round at first (default 3; `dflash`: its block
    /// size less one).
    #[serde(default)]
    pub num_draft_tokens: Option<usize>,
}

fn default_queue() -> usize {
    64
}
fn default_loaded() -> usize {
    2
}
fn default_body() -> usize {
    16 << 20
}
fn default_chat_max() -> usize {
    4096
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateSettings {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Prompt tokens per prefill forward.
    pub prefill_chunk: usize,
}

fn default_dtype() -> String {
    "auto".into()
}

fn default_dequantize() -> String {
    "auto".into()
}

/// `dequantize = true` (TOML, or RMLX_DEQUANTIZE=true) or a word.
fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        B(bool),
        S(String),
    }
    Ok(match V::deserialize(d)? {
        V::B(true) => "on".into(),
        V::B(false) => "off".into(),
        V::S(s) => s,
    })
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            plugins_dir: None,
            memory_limit_gb: None,
            dtype: default_dtype(),
            dequantize: default_dequantize(),
            kv_cache: None,
            kv_cache_k: None,
            kv_cache_v: None,
            server: ServerSettings {
                host: "127.0.0.1".into(),
                port: 8080,
                api_key: None,
                models: Vec::new(),
                models_dirs: Vec::new(),
                max_queue_depth: default_queue(),
                max_loaded_models: default_loaded(),
                idle_timeout: 0,
                allowed_hosts: Vec::new(),
                cors_origins: Vec::new(),
                max_body_bytes: default_body(),
                default_max_tokens: default_chat_max(),
                metrics_db: None,
                no_metrics_db: false,
                kv_ssd_dir: None,
                kv_ssd_gb: None,
                spec_max_batch: None,
                images: ImageSettings::default(),
            },
            generate: GenerateSettings { max_tokens: 256, temperature: 0.0, top_p: 1.0, prefill_chunk: 512 },
        }
    }
}

impl Settings {
    /// `file`: `--config FILE` (must exist); otherwise `./rmlx.toml` if present.
    /// `flags`: command-line overrides as a nested JSON object (nulls ignored).
    pub fn load(file: Option<&Path>, flags: serde_json::Value) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            Some(f) if !f.is_file() => bail!("config file not found: {}", f.display()),
            Some(f) => fig = fig.merge(Toml::file_exact(f)),
            None => fig = fig.merge(Toml::file("rmlx.toml")),
        }
        fig = fig.merge(Env::prefixed("RMLX_").split("__"));
        fig = fig.merge(Serialized::defaults(strip_nulls(flags)));
        fig.extract().map_err(|e| anyhow::anyhow!("configuration: {e}"))
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.plugins_dir.clone().unwrap_or_else(default_plugins_dir)
    }
}

/// `plugins/` beside the running binary.
pub fn default_plugins_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("plugins")))
        .unwrap_or_else(|| PathBuf::from("plugins"))
}

fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_file_env_flags() {
        figment::Jail::expect_with(|jail| {
            // defaults alone
            let s = Settings::load(None, serde_json::json!({})).unwrap();
            assert_eq!(s.server.port, 8080);
            assert_eq!(s.generate.max_tokens, 256);
            // ./rmlx.toml beats defaults
            jail.create_file("rmlx.toml", "[server]\nport = 9001\nhost = \"0.0.0.0\"\n[generate]\nmax_tokens = 7")?;
            let s = Settings::load(None, serde_json::json!({})).unwrap();
            assert_eq!((s.server.port, s.server.host.as_str(), s.generate.max_tokens), (9001, "0.0.0.0", 7));
            // environment beats the file
            jail.set_env("RMLX_SERVER__PORT", "9002");
            let s = Settings::load(None, serde_json::json!({})).unwrap();
            assert_eq!((s.server.port, s.server.host.as_str()), (9002, "0.0.0.0"));
            // flags beat the environment; null flags are ignored
            let s = Settings::load(None, serde_json::json!({"server": {"port": 9003, "host": null}})).unwrap();
            assert_eq!((s.server.port, s.server.host.as_str()), (9003, "0.0.0.0"));
            // --config FILE replaces ./rmlx.toml
            jail.create_file("other.toml", "[generate]\nmax_tokens = 9")?;
            let s = Settings::load(Some(Path::new("other.toml")), serde_json::json!({})).unwrap();
            assert_eq!((s.generate.max_tokens, s.server.port), (9, 9002));
            // a missing --config is an error
            let e = Settings::load(Some(Path::new("nope.toml")), serde_json::json!({})).unwrap_err();
            assert!(e.to_string().contains("config file not found: nope.toml"));
            // a bad value names the key
            jail.set_env("RMLX_SERVER__PORT", "not-a-port");
            let e = Settings::load(None, serde_json::json!({})).unwrap_err();
            assert!(e.to_string().contains("port"), "{e}");
            Ok(())
        });
    }

    /// `[[server.models]]`: the single drafter keys and the `drafters`
    /// list side by side; a list entry with an unknown key is refused.
    #[test]
    fn a_served_model_lists_its_drafters() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rmlx.toml",
                r#"
[[server.models]]
id = "qwen"
path = "/models/qwen"
draft_model = "/models/small"
num_draft_tokens = 2
drafters = [{ kind = "mtp" }, { kind = "eagle3", model = "/models/eagle", num_draft_tokens = 4 }]

[[server.models]]
path = "/models/other"
"#,
            )?;
            let s = Settings::load(None, serde_json::json!({})).unwrap();
            let (q, o) = (&s.server.models[0], &s.server.models[1]);
            assert_eq!((q.draft_model.as_deref(), q.num_draft_tokens, q.draft_kind.as_deref()), (Some(Path::new("/models/small")), Some(2), None));
            let list: Vec<_> = q.drafters.iter().map(|d| (d.kind.as_str(), d.model.as_deref(), d.num_draft_tokens)).collect();
            assert_eq!(list, [("mtp", None, None), ("eagle3", Some(Path::new("/models/eagle")), Some(4))]);
            assert!(o.drafters.is_empty() && o.draft_model.is_none());
            jail.create_file("bad.toml", "[[server.models]]\npath = \"/m\"\ndrafters = [{ kind = \"draft\", path = \"/d\" }]\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")), serde_json::json!({})).unwrap_err();
            assert!(e.to_string().contains("path"), "{e}");
            Ok(())
        });
    }
}
