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
//! the least recently used one goes first when `max_loaded` are loaded.
use super::metrics::{Metrics, RequestRecord, SeqTracker};
use super::scheduler::{Ended, EngineStats, Scheduler, SchedulerConfig};
use super::score::TokenScore;
use super::sequence::{panic_message, Sequence};
use super::LoadedModel;
pub use super::catalog::{ModelCatalog, ModelEntry};
pub use super::requests::*;
use crate::plugins::Registry;
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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
        let thread_stats = stats.clone();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let types: Vec<(String, String)> = catalog
            .entries
            .iter()
            .map(|e| (e.id.clone(), e.model_type.clone()))
            .collect();
        let thread_loaded = loaded.clone();
        let thread_cfg = cfg.clone();
        let open_requests = Arc::new(AtomicUsize::new(0));
        let thread_open = open_requests.clone();
        let metrics = Arc::new(Metrics::new());
        let tracker = SeqTracker::new(metrics.clone());
        let health = Arc::new(Mutex::new(EngineHealth::default()));
        let thread_health = health.clone();
        let thread = std::thread::Builder::new()
            .name("rmlx-engine".into())
            .spawn(move || {
                // However the thread ends, /health says so.
                let _exit = ThreadExit(thread_health.clone());
                let reg = match Registry::load(&thread_cfg.plugins_dir) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for r in &reg.refused {
                    eprintln!("warning: skipped {}: {}", r.path.display(), r.reason);
                }
                for (id, t) in &types {
                    if let Err(e) = reg.architecture_plugin(t) {
                        let _ = ready_tx.send(Err(e.context(format!("model `{id}`"))));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let mut engine = Engine {
                    reg,
                    cfg: thread_cfg,
                    models: Vec::new(),
                    loaded: thread_loaded,
                    open_requests: thread_open,
                    sched: Scheduler::new(sched),
                    stats: thread_stats,
                    tracker,
                    health: thread_health.clone(),
                };
                // A panic that escapes the loop (outside a step, which
                // catches its own) fails the requests in the engine and the
                // loop starts again; the models stay loaded.
                loop {
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(&rx))) {
                        Ok(()) => break,
                        Err(p) => {
                            let msg = panic_message(&*p);
                            tracing::error!("the engine loop panicked ({msg}); restarting it");
                            engine.recover(&msg);
                            let mut h = thread_health.lock().unwrap();
                            h.restarts += 1;
                            h.last_panic = Some(msg);
                        }
                    }
                }
                thread_health.lock().unwrap().down = Some("the engine has stopped".into());
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the engine thread died at start"))??;
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
            thread,
        })
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

// ---------------------------------------------------------------- engine thread

struct Resident {
    entry: Arc<ModelEntry>,
    model: LoadedModel,
    last_used: Instant,
    loaded_at: u64,
    keep_alive: KeepAlive,
}

impl Resident {
    fn expires(&self) -> Option<Instant> {
        match self.keep_alive {
            KeepAlive::Unload => Some(self.last_used),
            // A client's duration past what an `Instant` can hold is forever.
            KeepAlive::For(d) => self.last_used.checked_add(d),
            KeepAlive::Forever => None,
        }
    }
}

/// After waking from idle, more jobs are taken while they come at most
/// `RMLX_ARRIVAL_GAP_MS` (default 4; 0: off) apart, for at most ARRIVAL_MAX.
fn arrival_gap() -> Duration {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    Duration::from_millis(*MS.get_or_init(|| std::env::var("RMLX_ARRIVAL_GAP_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)))
}
const ARRIVAL_MAX: Duration = Duration::from_millis(25);

struct Engine {
    reg: Registry,
    cfg: WorkerConfig,
    models: Vec<Resident>,
    loaded: Arc<Mutex<Vec<LoadedInfo>>>,
    open_requests: Arc<AtomicUsize>,
    sched: Scheduler,
    stats: Arc<Mutex<EngineStats>>,
    tracker: SeqTracker,
    health: Arc<Mutex<EngineHealth>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Engine {
    fn run(&mut self, rx: &std_mpsc::Receiver<Job>) {
        loop {
            // Idle models past their keep-alive go (never one with running sequences).
            self.expire();
            if self.sched.is_idle() {
                // Nothing to run: sleep until a job comes or a model expires.
                let next = self.models.iter().filter_map(|m| m.expires()).min();
                let job = match next {
                    Some(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                        Ok(j) => j,
                        Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    },
                    None => match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    },
                };
                if !self.handle(job) {
                    return;
                }
                // Waking from idle: requests sent together (a client's
                // concurrent streams) reach here a few ms apart; gathering
                // them lets them prefill in the same step and start decoding
                // together. A lone request waits one gap.
                let until = Instant::now() + ARRIVAL_MAX;
                let gap = arrival_gap();
                while let Ok(job) = rx.recv_timeout(gap.min(until.saturating_duration_since(Instant::now()))) {
                    if !self.handle(job) {
                        return;
                    }
                }
            }
            // Everything else that came meanwhile (between steps).
            loop {
                match rx.try_recv() {
                    Ok(job) => {
                        if !self.handle(job) {
                            return;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            }
            for e in self.sched.reap_cancelled() {
                self.end(e);
            }
            self.admit();
            for id in self.sched.busy_models() {
                let Some(i) = self.models.iter().position(|m| m.entry.id == id) else {
                    continue;
                };
                // A panic in the step fails the model's running sequences
                // (the step was serving them) and frees their blocks; the
                // other models and the loop go on.
                let model = &mut self.models[i].model;
                let sched = &mut self.sched;
                let ended = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.step(&id, model))) {
                    Ok(e) => e,
                    Err(p) => {
                        let msg = panic_message(&*p);
                        tracing::error!("a step of {id} panicked ({msg}); its requests fail");
                        self.note_panic(&msg);
                        self.sched.fail_model(&id, &format!("internal error in the engine: {msg}"))
                    }
                };
                self.models[i].last_used = Instant::now();
                let now = Instant::now();
                for s in self.sched.running.iter().filter(|s| s.entry.id == id) {
                    self.tracker.observe(s, now);
                }
                for e in ended {
                    self.end(e);
                }
            }
            *self.stats.lock().unwrap() = self.sched.publish();
        }
    }

    /// Takes one job; false to stop.
    fn handle(&mut self, job: Job) -> bool {
        match job {
            Job::Shutdown => return false,
            Job::Score { model, prompt, top_n, keep_alive, reply } => {
                let _ = reply.send(self.score(&model, &prompt, top_n, keep_alive));
            }
            Job::Panic(EnginePanic::Loop) => panic!("injected panic in the engine loop (test hook)"),
            Job::Panic(EnginePanic::Step(id)) => self.sched.panic_next_step = Some(id),
            Job::Load {
                model,
                keep_alive,
                reply,
            } => {
                let busy = self.sched.busy_models();
                let r = match self.ensure(&model, keep_alive, &busy) {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(WorkerError::Internal(
                        "every loaded model is busy; try again later".into(),
                    )),
                    Err(e) => {
                        tracing::warn!("loading {} failed: {e:#}", model.id);
                        Err(WorkerError::Internal(format!("{e:#}")))
                    }
                };
                let _ = reply.send(r);
            }
            Job::Unload { id, force, reply } => {
                let users = self.sched.running.iter().filter(|s| s.entry.id == id).count()
                    + self.sched.waiting.iter().filter(|s| s.entry.id == id).count();
                if users > 0 && !force {
                    let _ = reply.send(Unloaded::Busy { requests: users });
                    return true;
                }
                // Forced: the requests on it end with an error.
                let gone = || WorkerError::Internal(format!("model `{id}` was unloaded (forced) while this request ran"));
                for s in std::mem::take(&mut self.sched.running).into_iter() {
                    if s.entry.id == id {
                        self.end((s, Err(gone())));
                    } else {
                        self.sched.running.push(s);
                    }
                }
                for s in std::mem::take(&mut self.sched.waiting).into_iter() {
                    if s.entry.id == id {
                        self.end((s, Err(gone())));
                    } else {
                        self.sched.waiting.push_back(s);
                    }
                }
                self.sched.drop_model(&id);
                let before = self.models.len();
                self.models.retain(|m| m.entry.id != id);
                if self.models.len() != before {
                    tracing::info!("unloaded {id} (requested)");
                }
                // Publish first: the API describes the model right after the reply.
                self.publish();
                let _ = reply.send(if self.models.len() != before { Unloaded::Unloaded } else { Unloaded::NotLoaded });
            }
            Job::Generate(req, record) => {
                let guard: Box<dyn Send> = Box::new(OpenRequest(self.open_requests.clone()));
                let id = self.sched.next_id();
                self.tracker.submitted(id, record);
                self.sched
                    .waiting
                    .push_back(Sequence::new(id, req, Some(guard)));
            }
        }
        true
    }

    /// Admits waiting sequences in order while models and KV room allow.
    fn admit(&mut self) {
        while let Some(s) = self.sched.waiting.pop_front() {
            let busy = self.sched.busy_models();
            let i = match self.ensure(&s.entry, s.keep_alive, &busy) {
                Ok(Some(i)) => i,
                Ok(None) => {
                    // Its model cannot be loaded while others run: wait.
                    self.sched.waiting.push_front(s);
                    break;
                }
                Err(e) => {
                    let msg = format!("loading model `{}`: {e:#}", s.entry.id);
                    tracing::warn!("{msg}");
                    self.end((s, Err(WorkerError::Internal(msg))));
                    continue;
                }
            };
            let (model, sched) = (&mut self.models[i].model, &mut self.sched);
            let id = s.entry.id.clone();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.admit(s, model))) {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(e))) => self.end(e),
                Ok(Err(s)) => {
                    self.sched.waiting.push_front(s);
                    break;
                }
                Err(p) => {
                    // The sequence went with the panic (its client sees the
                    // request fail); blocks it held are given back.
                    let msg = panic_message(&*p);
                    tracing::error!("admitting a request for {id} panicked ({msg}); it fails");
                    self.note_panic(&msg);
                    self.sched.repair(&id);
                }
            }
        }
    }

    /// Tells the client how a sequence ended (its open-request guard drops with it).
    fn end(&mut self, (s, r): Ended) {
        if let Some(m) = self.models.iter_mut().find(|m| m.entry.id == s.entry.id) {
            m.last_used = Instant::now();
        }
        // Metrics first: a request's figures (and the engine's stats without
        // it) are published before its client hears the end.
        self.tracker.ended(&s, &r);
        *self.stats.lock().unwrap() = self.sched.publish();
        let _ = s.events.send(match r {
            Ok(f) => GenEvent::Done(f),
            Err(e) => GenEvent::Error(e),
        });
        drop(s);
        self.publish();
    }

    /// Index of the resident model, loading it (and evicting LRU) if needed.
    /// None when it is not loaded and loading it would unload a model in
    /// `busy` (with running sequences).
    fn ensure(
        &mut self,
        entry: &Arc<ModelEntry>,
        keep_alive: Option<KeepAlive>,
        busy: &[String],
    ) -> Result<Option<usize>> {
        let ka = keep_alive.unwrap_or(match self.cfg.idle_timeout {
            Some(d) => KeepAlive::For(d),
            None => KeepAlive::Forever,
        });
        if let Some(i) = self.models.iter().position(|m| m.entry.id == entry.id) {
            let m = &mut self.models[i];
            m.last_used = Instant::now();
            if keep_alive.is_some() {
                m.keep_alive = ka;
            }
            self.publish();
            return Ok(Some(i));
        }
        while self.models.len() >= self.cfg.max_loaded_models.max(1) {
            let Some(lru) = (0..self.models.len())
                .filter(|&i| !busy.contains(&self.models[i].entry.id))
                .min_by_key(|&i| self.models[i].last_used)
            else {
                return Ok(None);
            };
            let gone = self.models.remove(lru);
            self.sched.drop_model(&gone.entry.id);
            tracing::info!("unloading {} (least recently used)", gone.entry.id);
        }
        let t0 = Instant::now();
        let reg = &self.reg;
        let model = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| LoadedModel::load(&entry.path, reg)))
            .map_err(|p| anyhow!("loading panicked: {}", panic_message(&*p)))??;
        tracing::info!("loaded {} in {:.2}s", entry.id, t0.elapsed().as_secs_f64());
        self.models.push(Resident {
            entry: entry.clone(),
            model,
            last_used: Instant::now(),
            loaded_at: now_secs(),
            keep_alive: ka,
        });
        self.publish();
        Ok(Some(self.models.len() - 1))
    }

    /// Runs a scoring job between steps (a panic in it fails only it).
    fn score(&mut self, entry: &Arc<ModelEntry>, prompt: &[u32], top_n: usize, keep_alive: Option<KeepAlive>) -> Result<Vec<Option<TokenScore>>, WorkerError> {
        let busy = self.sched.busy_models();
        let i = match self.ensure(entry, keep_alive, &busy) {
            Ok(Some(i)) => i,
            Ok(None) => return Err(WorkerError::Internal("every loaded model is busy; try again later".into())),
            Err(e) => return Err(WorkerError::Internal(format!("loading model `{}`: {e:#}", entry.id))),
        };
        let (model, chunk) = (&mut self.models[i].model, self.cfg.prefill_chunk);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| super::score::score_prompt(model, prompt, top_n, chunk)));
        self.models[i].last_used = Instant::now();
        match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(WorkerError::Internal(format!("{e:#}"))),
            Err(p) => Err(WorkerError::Internal(format!("internal error while scoring the prompt: {}", panic_message(&*p)))),
        }
    }

    /// After a panic escaped the loop: every request in the engine fails
    /// (its state is unknown), the block managers start afresh; the loaded
    /// models stay.
    fn recover(&mut self, msg: &str) {
        self.sched.reset();
        let err = || WorkerError::Internal(format!("internal error in the engine: {msg}"));
        for mut s in std::mem::take(&mut self.sched.running) {
            s.table.clear();
            self.end((s, Err(err())));
        }
        for s in std::mem::take(&mut self.sched.waiting) {
            self.end((s, Err(err())));
        }
        *self.stats.lock().unwrap() = self.sched.publish();
        self.publish();
    }

    /// Counts a caught panic for /health.
    fn note_panic(&self, msg: &str) {
        self.health.lock().unwrap().last_panic = Some(msg.to_string());
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let before = self.models.len();
        let busy = self.sched.busy_models();
        let mut gone = Vec::new();
        self.models.retain(|m| match m.expires() {
            Some(t) if t <= now && !busy.contains(&m.entry.id) => {
                tracing::info!("unloading {} (idle)", m.entry.id);
                gone.push(m.entry.id.clone());
                false
            }
            _ => true,
        });
        for id in gone {
            self.sched.drop_model(&id);
        }
        if before != self.models.len() {
            self.publish();
        }
    }

    fn publish(&self) {
        let now_i = Instant::now();
        let now_s = now_secs();
        let list = self
            .models
            .iter()
            .map(|m| LoadedInfo {
                id: m.entry.id.clone(),
                loaded_at: m.loaded_at,
                expires_at: m
                    .expires()
                    .map(|t| now_s.saturating_add(t.saturating_duration_since(now_i).as_secs())),
            })
            .collect();
        *self.loaded.lock().unwrap() = list;
    }
}
