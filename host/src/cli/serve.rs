//! `rmlx serve`: the HTTP API (see docs/SERVER.md). The engine runs on its own
//! thread; the API runs on tokio.
use crate::api::{self, AppState, ServerOptions};
use crate::config::Settings;
use crate::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use anyhow::{bail, Context, Result};
use poem::{listener::TcpListener, Server};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod drafters;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory or Hugging Face repo id (org/name: from the hub cache,
    /// downloaded when missing) to serve, or ID=DIR to name it (repeatable).
    /// The id is the folder's name (the repo id for a repo) otherwise.
    #[arg(long)]
    pub model: Vec<String>,
    /// Directory whose sub-directories are models, or a Hugging Face hub
    /// cache (~/.cache/huggingface/hub), served on demand (repeatable).
    #[arg(long)]
    pub models_dir: Vec<PathBuf>,
    /// Address to bind (default 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to bind (default 8080; 0 picks a free port, printed at start).
    #[arg(long)]
    pub port: Option<u16>,
    /// Require this key as `Authorization: Bearer KEY` or `x-api-key: KEY`
    /// on every route but /health (also RMLX_SERVER__API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait behind the running one; more get 429 (default 64).
    #[arg(long)]
    pub max_queue_depth: Option<usize>,
    /// Models kept in memory at once, least recently used unloaded first (default 2).
    #[arg(long)]
    pub max_loaded_models: Option<usize>,
    /// Unload a model after this long without requests: seconds or 30s/10m/1h (default: never).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// On a loopback bind, accept this `Host` too (repeatable; `*.example.com`
    /// patterns, `*` for any): only loopback names are accepted otherwise,
    /// against DNS rebinding (also server.allowed_hosts).
    #[arg(long)]
    pub allowed_host: Vec<String>,
    /// Let web pages of this origin call the API from a browser (CORS,
    /// repeatable; `*` wildcards, `*` alone for any): other origins than the
    /// server's own and loopback ones get 403 (also server.cors_origins).
    #[arg(long)]
    pub cors_origin: Vec<String>,
    /// Largest request body in bytes; larger gets 413 (default 16 MiB).
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Load these models (ids) at start instead of on the first request.
    #[arg(long)]
    pub preload: Vec<String>,
    /// KV-cache memory budget, one for all loaded models: 4GB, 512MB, 0.5 or
    /// 50% of the device's memory (default 50%; docs/KV_CACHE.md).
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// Tokens per KV block (prefix-cache granularity, default 16).
    #[arg(long)]
    pub kv_block_size: Option<usize>,
    /// Most sequences decoding together (default 16 on a CPU, 256 on a GPU).
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Turn automatic prefix caching off (default: on).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Prompt tokens per prefill step across sequences, interleaved with
    /// decode steps (default 512).
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// Keep prefix-cache blocks evicted from memory in this directory (SSD
    /// tier, reused after a restart; created if missing).
    #[arg(long)]
    pub kv_ssd_dir: Option<PathBuf>,
    /// Size cap of the SSD tier per model in GB (default 10); least recently
    /// used blocks are deleted past it.
    #[arg(long, allow_hyphen_values = true)]
    pub kv_ssd_gb: Option<String>,
    /// Speculative decoding: a smaller model with the same tokenizer that
    /// drafts tokens for the served model to verify (the output stays the
    /// model's own): DIR when one model is served, else ID=DIR (repeatable;
    /// also `draft_model` in [[server.models]]). With --draft-kind, the
    /// model's first drafter (its default) [default: none]
    #[arg(long, value_name = "[ID=]DIR")]
    pub draft_model: Vec<String>,
    /// Draft tokens per round at first, adapted per sequence after
    /// (requests may set `num_draft_tokens`, 0 turns it off) [default: 3]
    #[arg(long, value_name = "K")]
    pub num_draft_tokens: Option<usize>,
    /// The drafter kind: `draft` (a separate draft model, --draft-model), `mtp` (the model's own multi-token-prediction head, from its checkpoint; without --draft-model it applies to the one served model), `eagle3` (an Eagle-3 head, --draft-model its own directory) or `dflash` (a DFlash block drafter, --draft-model its own directory) [default: draft]
    #[arg(long, value_name = "KIND")]
    pub draft_kind: Option<String>,
    /// One more drafter of the one served model, after the first
    /// (repeatable; each kind once): `mtp` (the model's own head), or
    /// `draft=DIR`, `eagle3=DIR`, `dflash=DIR`. Requests pick one with
    /// `draft_kind`; the first drafter stays the default. Several served
    /// models list theirs in rmlx.toml ([[server.models]] drafters)
    #[arg(long, value_name = "KIND[=DIR]")]
    pub drafter: Vec<String>,
    /// Speculative decoding runs while a model's lane decodes at most this
    /// many sequences; larger batches take the plain step [default: 8 on a
    /// GPU, 1 on a CPU]
    #[arg(long, value_name = "N")]
    pub spec_max_batch: Option<usize>,
    /// SQLite run log that `rmlx metrics` reads (default: metrics.sqlite in
    /// the rmlx cache dir, ~/.cache/rmlx).
    #[arg(long)]
    pub metrics_db: Option<PathBuf>,
    /// Record no run log (default: recorded).
    #[arg(long)]
    pub no_metrics_db: bool,
    /// Log level: info logs one line per request, each model load and
    /// unload, and the shutdown; debug adds /health and /metrics requests
    /// [default: info, or the RMLX_LOG filter when set]
    #[arg(long, value_enum)]
    pub log_level: Option<crate::logging::LogLevel>,
    /// Log line format on stderr: text (colour only on a terminal) or json
    /// (one object per line).
    #[arg(long, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
    /// On SIGTERM or SIGINT, stop accepting connections and give running
    /// requests this many seconds to finish before stopping.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// How `rmlx serve` logs (installed before anything else runs).
pub fn log_options(a: &Args) -> crate::logging::LogOptions {
    crate::logging::LogOptions { level: a.log_level, format: a.log_format, default_level: crate::logging::LogLevel::Info }
}

/// Scheduler settings from the flags.
pub fn scheduler_config(a: &Args) -> Result<crate::engine::scheduler::SchedulerConfig> {
    let mut c = crate::engine::scheduler::SchedulerConfig::default();
    if let Some(b) = &a.kv_budget {
        c.kv_budget = crate::engine::scheduler::KvBudget::parse(b)?;
    }
    if let Some(n) = a.kv_block_size {
        c.block_size = n.max(1);
    }
    if let Some(n) = a.max_running {
        c.max_running = n.max(1);
    }
    c.prefix_cache = !a.no_prefix_cache;
    Ok(c)
}

/// The SSD tier from settings (`--kv-ssd-dir`/`--kv-ssd-gb` or
/// `server.kv_ssd_dir`/`server.kv_ssd_gb`): None when no directory is set.
pub fn ssd_config(settings: &Settings) -> Result<Option<crate::engine::ssd::SsdConfig>> {
    let s = &settings.server;
    match (&s.kv_ssd_dir, s.kv_ssd_gb) {
        (None, None) => Ok(None),
        (None, Some(_)) => bail!("--kv-ssd-gb (server.kv_ssd_gb) needs --kv-ssd-dir (server.kv_ssd_dir)"),
        (Some(dir), gb) => Ok(Some(crate::engine::ssd::SsdConfig::new(dir, gb.unwrap_or(10.0))?)),
    }
}

/// `30`, `30s`, `10m`, `1h`, `1h30m` -> seconds (at most ten years).
pub fn parse_duration_secs(s: &str) -> Result<u64> {
    crate::api::limits::idle_timeout_secs(s).map_err(|e| anyhow::anyhow!("--idle-timeout: expected seconds or 30s/10m/1h, got {s:?}: {e}"))
}

/// The flags as a settings layer (nulls are ignored).
pub fn flags(a: &Args) -> Result<serde_json::Value> {
    let idle = a.idle_timeout.as_deref().map(parse_duration_secs).transpose()?;
    let ssd_gb = a.kv_ssd_gb.as_deref().map(crate::engine::ssd::parse_gb).transpose()?;
    Ok(serde_json::json!({
        "host": a.host, "port": a.port, "api_key": a.api_key,
        "max_queue_depth": a.max_queue_depth, "max_loaded_models": a.max_loaded_models,
        "idle_timeout": idle, "max_body_bytes": a.max_body_bytes,
        "allowed_hosts": (!a.allowed_host.is_empty()).then_some(&a.allowed_host),
        "cors_origins": (!a.cors_origin.is_empty()).then_some(&a.cors_origin),
        "kv_ssd_dir": a.kv_ssd_dir, "kv_ssd_gb": ssd_gb, "spec_max_batch": a.spec_max_batch,
        "metrics_db": a.metrics_db, "no_metrics_db": a.no_metrics_db.then_some(true),
    }))
}

/// The models to serve: (id, directory), a Hugging Face repo id resolved in
/// the hub cache (downloaded on a miss) and named by the repo id.
fn model_list(args: &Args, settings: &Settings) -> Result<(Vec<(Option<String>, PathBuf)>, Vec<PathBuf>)> {
    let mut specs: Vec<(Option<String>, PathBuf)> =
        settings.server.models.iter().map(|m| (m.id.clone(), m.path.clone())).collect();
    for m in &args.model {
        match m.split_once('=') {
            Some((id, dir)) if !id.is_empty() && !id.contains('/') => specs.push((Some(id.to_string()), PathBuf::from(dir))),
            _ => specs.push((None, PathBuf::from(m))),
        }
    }
    let mut models = Vec::with_capacity(specs.len());
    for (id, spec) in specs {
        let r = match spec.to_str() {
            Some(s) => crate::hub::resolve(s)?,
            None => crate::hub::ResolvedModel { path: spec, repo: None },
        };
        models.push((id.or(r.repo), r.path));
    }
    let mut dirs = settings.server.models_dirs.clone();
    dirs.extend(args.models_dir.iter().cloned());
    Ok((models, dirs))
}

/// Builds the engine and the app state from settings.
pub fn state(args: &Args, settings: &Settings) -> Result<Arc<AppState>> {
    let (models, dirs) = model_list(args, settings)?;
    let mut catalog = ModelCatalog::discover(&models, &dirs)?;
    // Models no plugin serves are listed as unavailable, never fatal.
    let reg = crate::plugins::Registry::load(&settings.plugins_dir())?;
    catalog.check(&reg);
    for u in &catalog.unavailable {
        tracing::warn!("model {} ({}) is unavailable: {}", u.id, u.path.display(), u.reason);
    }
    if catalog.entries.is_empty() && catalog.unavailable.is_empty() {
        bail!("no models to serve: give --model DIR or --models-dir DIR (or [[server.models]] in rmlx.toml)");
    }
    let s = &settings.server;
    if s.idle_timeout > crate::api::limits::MAX_KEEP_ALIVE_SECS {
        bail!("idle timeout of {} seconds is more than the maximum of {} (ten years)", s.idle_timeout, crate::api::limits::MAX_KEEP_ALIVE_SECS);
    }
    drafters::attach(args, settings, &mut catalog, &reg)?;
    let prefill_chunk = args.prefill_chunk.unwrap_or(settings.generate.prefill_chunk).max(1);
    let mut sched = scheduler_config(args)?;
    sched.ssd = ssd_config(settings)?;
    sched.spec_max_batch = s.spec_max_batch.unwrap_or_else(crate::engine::speculative::serve::default_spec_max_batch);
    let worker = Worker::start_with(
        WorkerConfig {
            plugins_dir: settings.plugins_dir(),
            max_queue_depth: s.max_queue_depth,
            max_loaded_models: s.max_loaded_models,
            idle_timeout: (s.idle_timeout > 0).then(|| Duration::from_secs(s.idle_timeout)),
            prefill_chunk,
        },
        sched,
        &catalog,
    )?;
    let opts = ServerOptions {
        api_key: s.api_key.clone().filter(|k| !k.is_empty()),
        max_body_bytes: s.max_body_bytes,
        default_max_tokens: s.default_max_tokens,
        temperature: settings.generate.temperature,
        top_p: settings.generate.top_p,
        prefill_chunk,
        cross_site: crate::api::guard::CrossSite::for_bind(&s.host, s.allowed_hosts.clone(), s.cors_origins.clone()),
        media: s.images.options(),
    };
    Ok(Arc::new(AppState { catalog: Arc::new(catalog), worker, opts }))
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let state = state(&args, settings)?;
    let run_log = super::metrics::start_run_log(settings, &args, &state)?;
    let addr = format!("{}:{}", settings.server.host, settings.server.port);
    let rt = tokio::runtime::Runtime::new()?;
    let res = rt.block_on(async {
        // Listen for SIGTERM/SIGINT from the start (a signal while models
        // preload stops the server the same way).
        let signals = ShutdownSignals::install()?;
        for id in &args.preload {
            let e = state.catalog.get(id).with_context(|| format!("--preload: no model `{id}`"))?;
            state.worker.load(e, None).await.map_err(|e| anyhow::anyhow!("--preload {id}: {e}"))?;
        }
        let listener = TcpListener::bind(addr.clone());
        let acceptor = poem::listener::Listener::into_acceptor(listener).await.with_context(|| format!("binding {addr}"))?;
        let local = poem::listener::Acceptor::local_addr(&acceptor)
            
            .first()
            .and_then(|a| a.as_socket_addr().cloned())
            .map(|a| a.to_string())
            .unwrap_or(addr.clone());
        let ids: Vec<&str> = state.catalog.entries.iter().map(|e| e.id.as_str()).collect();
        if args.log_format == crate::logging::LogFormat::Json {
            tracing::info!(addr = %local, models = %ids.join(","), "rmlx serving {} on http://{local} (docs: http://{local}/docs)", ids.join(", "));
        } else {
            eprintln!("rmlx serving {} on http://{local} (docs: http://{local}/docs)", ids.join(", "));
        }
        // Which load policy each model gets, and why (flags override it).
        for e in &state.catalog.entries {
            if let Ok(r) = crate::model::ModelDir::open(&e.path).and_then(|d| crate::model::policy::resolve(&d)) {
                if args.log_format == crate::logging::LogFormat::Json {
                    tracing::info!(model = %e.id, "load policy for {}: {} ({})", e.id, r.summary(), r.why);
                } else {
                    eprintln!("load policy for {}: {} ({})", e.id, r.summary(), r.why);
                }
            }
        }
        let worker = state.worker.clone();
        let grace = Duration::from_secs(args.shutdown_timeout);
        // On the signal poem stops accepting (the listening socket closes),
        // lets each connection finish its response (a stream runs to its
        // end), and drops what is still open after `grace`.
        let r = Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(api::app(state), signals.wait(grace), Some(grace))
            .await
            .with_context(|| format!("serving on {addr}"));
        tracing::info!("shutdown: connections closed; stopping the engine");
        // Frees the models; the prefix cache spills to the SSD tier (--kv-ssd-dir).
        worker.shutdown();
        r
    });
    if let Some(log) = run_log {
        // Records the run's end time.
        log.close();
    }
    tracing::info!("shutdown complete");
    res
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere): the first drains, a second during
/// the drain stops the process at once.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }

    /// Resolves on the first signal (poem then drains); a second one exits.
    async fn wait(mut self, grace: Duration) {
        let sig = self.next().await;
        tracing::info!(
            signal = sig,
            grace_s = grace.as_secs(),
            "shutdown: {sig} received; no new connections, running requests get up to {}s to finish (send it again to stop now)",
            grace.as_secs()
        );
        tokio::spawn(async move {
            let sig = self.next().await;
            tracing::warn!(signal = sig, "shutdown: {sig} again; stopping now");
            std::process::exit(130);
        });
    }
}
