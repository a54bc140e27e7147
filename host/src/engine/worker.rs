//! The engine thread: the one thread that touches MLX. It owns the plugin
//! registry and the loaded models; requests arrive over a channel and their
//! tokens go back over a tokio channel. Requests run together under the
//! continuous-batching scheduler (scheduler.rs): between steps the thread
//! takes new jobs, drops cancelled sequences, admits waiting ones within the
//! KV budget, then runs one step (a prefill chunk and one batched decode
//! forward) per model with running sequences.
//!
//! What a request owns (sequence.rs): sampling (with an optional logits hook
//! for constrained decoding), incremental detokenizing, stop strings (matched
//! across token boundaries, never emitted), max tokens, cancellation (a flag,
//! or the receiver going away).
//!
//! Models: a catalog fixed at start ([`ModelCatalog`]); a model is loaded on
//! the first request that names it, unloaded after its keep-alive expires, and
//! the least recently used one goes first when `max_loaded` are loaded
//! (worker/models.rs). A request's `kv_cache` picks the lane its model runs
//! it in (scheduler/lanes.rs); the families' sides are resolved once per
//! model and choice (worker/models.rs).
//!
//! This file is the handle and the jobs it sends; the engine thread's loop
//! is worker/run.rs.
mod embeds;
mod models;
mod run;

use super::metrics::{Metrics, RequestRecord, SeqTracker};
use super::scheduler::{EngineStats, SchedulerConfig};
use super::score::TokenScore;
pub use super::catalog::{ModelCatalog, ModelEntry};
pub use super::requests::*;
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

enum Job {
    /// With the HTTP request's record when an API handler submitted it.
    Generate(GenRequest, Option<Arc<RequestRecord>>),
    Load {
        model: Arc<ModelEntry>,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<(), WorkerError>>,
    },
    Unload {
        id: String,
        force: bool,
        reply: oneshot::Sender<Unloaded>,
    },
    /// One teacher-forced forward over a prompt (`Worker::score`).
    Score {
        model: Arc<ModelEntry>,
        prompt: Vec<u32>,
        top_n: usize,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<Vec<Option<TokenScore>>, WorkerError>>,
    },
    /// Embeddings of token-id rows (`Worker::embed`).
    Embed {
        model: Arc<ModelEntry>,
        rows: Vec<Vec<u32>>,
        dims: Option<usize>,
        /// A multi-task embedder's task (an index into its adapters' tasks).
        task: Option<usize>,
        /// Rows that are image documents (engine/embed_image.rs): (row, image).
        images: Vec<(usize, crate::engine::media::PromptImage)>,
        keep_alive: Option<KeepAlive>,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>, WorkerError>>,
    },
    /// A closure run on the engine thread with its plugin registry
    /// (`Worker::on_engine`: MLX work outside the scheduler, e.g. Whisper).
    Run(Box<dyn FnOnce(&crate::plugins::Registry) + Send>),
    /// Test hook: a panic where `EnginePanic` says.
    Panic(EnginePanic),
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub plugins_dir: PathBuf,
    /// Requests waiting behind the running one; more get QueueFull (429).
    pub max_queue_depth: usize,
    pub max_loaded_models: usize,
    /// Default keep-alive (None: forever).
    pub idle_timeout: Option<Duration>,
    pub prefill_chunk: usize,
}

/// Handle to the engine thread (cheap to clone).
#[derive(Clone)]
pub struct Worker {
    tx: std_mpsc::Sender<Job>,
    open_requests: Arc<AtomicUsize>,
    max_queue_depth: usize,
    loaded: Arc<Mutex<Vec<LoadedInfo>>>,
    stats: Arc<Mutex<EngineStats>>,
    metrics: Arc<Metrics>,
    health: Arc<Mutex<EngineHealth>>,
    /// The KV-cache families the plugins provide (what `kv_cache` may name).
    kv_families: Arc<Vec<String>>,
    /// The engine thread: stopped and joined by `shutdown`, or when the last
    /// handle goes.
    thread: Arc<EngineThread>,
}

/// Stops and joins the engine thread when the last `Worker` handle is
/// dropped, so the engine's MLX state (models, KV pools, the SSD spill) is
/// torn down on its own thread before the process exits, never during.
struct EngineThread {
    tx: std_mpsc::Sender<Job>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EngineThread {
    /// True once the thread has ended (or there never was one).
    fn finished(&self) -> bool {
        self.handle.lock().unwrap().as_ref().is_none_or(|t| t.is_finished())
    }

    fn stop(&self) {
        let _ = self.tx.send(Job::Shutdown);
        if let Some(t) = self.handle.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Worker {
    /// Starts the engine thread; it loads the plugin registry and checks that
    /// every catalog model has an architecture plugin.
    pub fn start(cfg: WorkerConfig, catalog: &ModelCatalog) -> Result<Self> {
        Self::start_with(cfg, SchedulerConfig::default(), catalog)
    }

    /// [`Worker::start`] with scheduler settings (KV budget, block size, batch size).
    pub fn start_with(
        cfg: WorkerConfig,
        sched: SchedulerConfig,
        catalog: &ModelCatalog,
    ) -> Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let types: Vec<(String, String)> = catalog
            .entries
            .iter()
            .map(|e| (e.id.clone(), e.model_type.clone()))
            .collect();
        let thread_cfg = cfg.clone();
        let open_requests = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::new());
        let tracker = SeqTracker::new(metrics.clone());
        let health = Arc::new(Mutex::new(EngineHealth::default()));
        let shared = run::Shared { loaded: loaded.clone(), stats: stats.clone(), open_requests: open_requests.clone(), health: health.clone() };
        let thread = std::thread::Builder::new()
            .name("rmlx-engine".into())
            .spawn(move || run::thread_main(thread_cfg, sched, types, shared, tracker, rx, ready_tx))?;
        let kv_families = Arc::new(
            ready_rx
                .recv()
                .map_err(|_| anyhow!("the engine thread died at start"))??,
        );
        let thread = Arc::new(EngineThread {
            tx: tx.clone(),
            handle: Mutex::new(Some(thread)),
        });
        Ok(Self {
            tx,
            open_requests,
            max_queue_depth: cfg.max_queue_depth,
            loaded,
            stats,
            metrics,
            health,
            kv_families,
            thread,
        })
    }

    /// The KV-cache families the loaded plugins provide, sorted (the names a
    /// request's `kv_cache` may use).
    pub fn kv_families(&self) -> &[String] {
        &self.kv_families
    }

    /// Queues a generation. Events arrive on `req.events`; the last is `Done`
    /// or `Error`.
    pub fn submit(&self, req: GenRequest) -> Result<(), WorkerError> {
        let n = self.open_requests.fetch_add(1, Ordering::SeqCst);
        if n > self.max_queue_depth {
            self.open_requests.fetch_sub(1, Ordering::SeqCst);
            return Err(WorkerError::QueueFull(n - 1));
        }
        // The engine decrements when the request ends, however it ends.
        let guard = OpenRequest(self.open_requests.clone());
        self.tx
            .send(Job::Generate(req, super::metrics::current_request()))
            .map_err(|_| WorkerError::Stopped)?;
        std::mem::forget(guard);
        Ok(())
    }

    /// Requests submitted and not ended yet (waiting or running): the
    /// counter `--max-queue-depth` bounds, shown as /health's `in_flight`.
    pub fn open_requests(&self) -> Arc<AtomicUsize> {
        self.open_requests.clone()
    }

    pub async fn load(
        &self,
        model: Arc<ModelEntry>,
        keep_alive: Option<KeepAlive>,
    ) -> Result<(), WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Load {
                model,
                keep_alive,
                reply,
            })
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)?
    }

    /// Scores a prompt in one teacher-forced forward (engine/score.rs): for
    /// each token after the first, its log-probability and the `top_n` most
    /// likely tokens at its place; None for the first. Loads the model if needed.
    pub async fn score(
        &self,
        model: Arc<ModelEntry>,
        prompt: Vec<u32>,
        top_n: usize,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Vec<Option<TokenScore>>, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Score { model, prompt, top_n, keep_alive, reply })
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)?
    }

    /// Embeds token-id rows with an embedding model (engine/embed.rs): one
    /// vector per row, in order, `dims` long when given. Runs between
    /// scheduler steps on the engine thread, in padded batches shared with
    /// the other embedding requests waiting then (worker/embeds.rs); loads
    /// the model if needed.
    /// Open until answered, it counts in `open_requests` (/health's
    /// `in_flight`, `--max-queue-depth`).
    pub async fn embed(
        &self,
        model: Arc<ModelEntry>,
        rows: Vec<Vec<u32>>,
        dims: Option<usize>,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Vec<Vec<f32>>, WorkerError> {
        self.embed_task(model, rows, dims, None, keep_alive).await
    }

    /// [`Worker::embed`] under a multi-task embedder's task `task` (an
    /// index into its tasks; model/adapters.rs): the rows run with that
    /// task's adapters, in forwards of that task only.
    pub async fn embed_task(
        &self,
        model: Arc<ModelEntry>,
        rows: Vec<Vec<u32>>,
        dims: Option<usize>,
        task: Option<usize>,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Vec<Vec<f32>>, WorkerError> {
        self.embed_mixed(model, rows, Vec::new(), dims, task, keep_alive).await
    }

    /// [`Worker::embed_task`] where the rows at `images`' indices are image
    /// documents (engine/embed_image.rs: their ids with the image's
    /// placeholders at its span), each embedded in a forward of its own; a
    /// request with images runs by itself.
    pub async fn embed_mixed(
        &self,
        model: Arc<ModelEntry>,
        rows: Vec<Vec<u32>>,
        images: Vec<(usize, crate::engine::media::PromptImage)>,
        dims: Option<usize>,
        task: Option<usize>,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Vec<Vec<f32>>, WorkerError> {
        // Counted with the generations against `--max-queue-depth` (429 past it).
        let n = self.open_requests.fetch_add(1, Ordering::SeqCst);
        let _open = OpenRequest(self.open_requests.clone());
        if n > self.max_queue_depth {
            return Err(WorkerError::QueueFull(n - 1));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Embed { model, rows, dims, task, images, keep_alive, reply })
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)?
    }

    /// Runs `f` on the engine thread, between scheduler steps, with the
    /// plugin registry: for MLX work that the scheduler does not serve
    /// (Whisper transcription, api/audio.rs). It blocks the engine while it
    /// runs.
    pub async fn on_engine<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::plugins::Registry) -> T + Send + 'static,
    ) -> Result<T, WorkerError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Run(Box::new(move |reg| {
            let _ = reply.send(f(reg));
        }));
        self.tx.send(job).map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)
    }

    /// Unloads a model. While requests use it (running or waiting) it stays
    /// and the answer is `Busy`, unless `force`: then they end with an error.
    pub async fn unload(&self, id: &str, force: bool) -> Result<Unloaded, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Unload {
                id: id.to_string(),
                force,
                reply,
            })
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)
    }

    pub fn loaded(&self) -> Vec<LoadedInfo> {
        self.loaded.lock().unwrap().clone()
    }

    /// The scheduler's figures after its last step (queue, batch, KV blocks, prefix cache).
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().unwrap().clone()
    }

    /// The same figures from another thread (the run log's sampler), without
    /// holding the engine's job channel open.
    pub fn stats_source(&self) -> impl Fn() -> EngineStats + Send + 'static {
        let stats = self.stats.clone();
        move || stats.lock().unwrap().clone()
    }

    /// Whether the engine can serve (/health): the thread is alive and its
    /// loop runs; with how often it restarted after a panic.
    pub fn health(&self) -> EngineHealth {
        let mut h = self.health.lock().unwrap().clone();
        if h.down.is_none() && self.thread.finished() {
            h.down = Some("the engine thread has exited".into());
        }
        h
    }

    /// Test hook: makes the engine thread panic where `at` says.
    #[doc(hidden)]
    pub fn inject_panic(&self, at: EnginePanic) {
        let _ = self.tx.send(Job::Panic(at));
    }

    /// The server's Prometheus counters and histograms (engine/metrics.rs).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A handle with no engine behind it (requests fail with `Stopped`); for
    /// building the API description without models.
    pub fn detached() -> Self {
        let (tx, _) = std_mpsc::channel();
        let thread = Arc::new(EngineThread {
            tx: tx.clone(),
            handle: Mutex::new(None),
        });
        Self {
            thread,
            tx,
            open_requests: Arc::new(AtomicUsize::new(0)),
            max_queue_depth: 0,
            loaded: Arc::new(Mutex::new(Vec::new())),
            stats: Arc::new(Mutex::new(EngineStats::default())),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Mutex::new(EngineHealth {
                down: Some("no engine runs behind this handle".into()),
                ..EngineHealth::default()
            })),
            kv_families: Arc::new(Vec::new()),
        }
    }

    /// Stops the engine thread and waits for it: running sequences end, the
    /// models and their KV are freed there (the prefix cache spills to the
    /// SSD tier when there is one), before the process goes on to exit.
    pub fn shutdown(&self) {
        self.thread.stop();
    }
}

/// Marks the engine down when its thread ends, however it ends.
struct ThreadExit(Arc<Mutex<EngineHealth>>);
impl Drop for ThreadExit {
    fn drop(&mut self) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if h.down.is_none() {
            h.down = Some(if std::thread::panicking() {
                "the engine thread died after a panic".into()
            } else {
                "the engine has stopped".into()
            });
        }
    }
}

struct OpenRequest(Arc<AtomicUsize>);
impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

