//! The engine thread: its state ([`Engine`]), its start, and its loop. Between
//! steps it takes jobs, reaps cancelled sequences and admits waiting ones
//! (each into the lane of its KV families); then each lane with running
//! sequences runs one step, a panic in it failing that lane's requests only.
use super::super::metrics::SeqTracker;
use super::super::scheduler::{Ended, EngineStats, Scheduler, SchedulerConfig};
use super::super::sequence::{panic_message, Sequence};
use super::models::Resident;
use super::{EngineHealth, EnginePanic, GenEvent, Job, LoadedInfo, OpenRequest, ThreadExit, Unloaded, WorkerConfig, WorkerError};
use crate::plugins::Registry;
use anyhow::Result;
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// What the engine thread shares with the handle.
pub(super) struct Shared {
    pub loaded: Arc<Mutex<Vec<LoadedInfo>>>,
    pub stats: Arc<Mutex<EngineStats>>,
    pub open_requests: Arc<AtomicUsize>,
    pub health: Arc<Mutex<EngineHealth>>,
}

/// The engine thread's body: loads the plugin registry, checks that every
/// catalog model (`types`: id, model_type) has an architecture plugin,
/// answers `ready` (with the KV families the plugins provide), then runs
/// the loop until a `Shutdown` or the last handle goes.
pub(super) fn thread_main(
    cfg: WorkerConfig,
    sched: SchedulerConfig,
    types: Vec<(String, String)>,
    shared: Shared,
    tracker: SeqTracker,
    rx: std_mpsc::Receiver<Job>,
    ready: std_mpsc::Sender<Result<Vec<String>>>,
) {
    // However the thread ends, /health says so.
    let _exit = ThreadExit(shared.health.clone());
    let reg = match Registry::load(&cfg.plugins_dir) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    for r in &reg.refused {
        eprintln!("warning: skipped {}: {}", r.path.display(), r.reason);
    }
    for (id, t) in &types {
        if let Err(e) = reg.architecture_plugin(t) {
            let _ = ready.send(Err(e.context(format!("model `{id}`"))));
            return;
        }
    }
    let mut families = reg.kv_family_names();
    families.sort();
    let _ = ready.send(Ok(families));
    let health = shared.health.clone();
    let mut engine = Engine {
        reg,
        cfg,
        models: Vec::new(),
        loaded: shared.loaded,
        open_requests: shared.open_requests,
        sched: Scheduler::new(sched),
        stats: shared.stats,
        tracker,
        health: shared.health,
        embeds: Vec::new(),
    };
    // A panic that escapes the loop (outside a step, which catches its own)
    // fails the requests in the engine and the loop starts again; the
    // models stay loaded.
    loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(&rx))) {
            Ok(()) => break,
            Err(p) => {
                let msg = panic_message(&*p);
                tracing::error!("the engine loop panicked ({msg}); restarting it");
                engine.recover(&msg);
                let mut h = health.lock().unwrap();
                h.restarts += 1;
                h.last_panic = Some(msg);
            }
        }
    }
    health.lock().unwrap().down = Some("the engine has stopped".into());
}

/// After waking from idle, more jobs are taken while they come at most
/// `RMLX_ARRIVAL_GAP_MS` (default 4; 0: off) apart, for at most ARRIVAL_MAX.
fn arrival_gap() -> Duration {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    Duration::from_millis(*MS.get_or_init(|| std::env::var("RMLX_ARRIVAL_GAP_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)))
}
const ARRIVAL_MAX: Duration = Duration::from_millis(25);

pub(super) struct Engine {
    pub(super) reg: Registry,
    pub(super) cfg: WorkerConfig,
    pub(super) models: Vec<Resident>,
    pub(super) loaded: Arc<Mutex<Vec<LoadedInfo>>>,
    pub(super) open_requests: Arc<AtomicUsize>,
    pub(super) sched: Scheduler,
    pub(super) stats: Arc<Mutex<EngineStats>>,
    pub(super) tracker: SeqTracker,
    pub(super) health: Arc<Mutex<EngineHealth>>,
    /// Embedding jobs taken and not run yet (worker/embeds.rs).
    pub(super) embeds: Vec<super::embeds::PendingEmbed>,
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
            // The embedding jobs taken so far, together.
            self.run_embeds();
            for e in self.sched.reap_cancelled() {
                self.end(e);
            }
            self.admit();
            // A model's step: each of its lanes (KV families) in turn.
            for lane in self.sched.busy_lanes() {
                let Some(i) = self.models.iter().position(|m| m.entry.id == lane.model) else {
                    continue;
                };
                // A panic in the step fails the lane's running sequences
                // (the step was serving them) and frees their blocks; the
                // other lanes, models and the loop go on.
                let model = &mut self.models[i].model;
                let sched = &mut self.sched;
                let ended = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.step(&lane, model))) {
                    Ok(e) => e,
                    Err(p) => {
                        let msg = panic_message(&*p);
                        tracing::error!("a step of {} (KV cache {}) panicked ({msg}); its requests fail", lane.model, lane.family);
                        self.note_panic(&msg);
                        self.sched.fail_lane(&lane, &format!("internal error in the engine: {msg}"))
                    }
                };
                self.models[i].last_used = Instant::now();
                let now = Instant::now();
                for s in self.sched.running.iter().filter(|s| s.lane == lane) {
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
            // Run with the others taken in this round (`run_embeds`).
            Job::Embed { model, rows, dims, task, images, keep_alive, reply } => {
                self.embeds.push(super::embeds::PendingEmbed { model, rows, dims, task, images, keep_alive, reply });
            }
            Job::Run(f) => f(&self.reg),
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
            if let Some(why) = self.models[i].model.paged_refusal() {
                self.end((s, Err(WorkerError::BadRequest(why))));
                continue;
            }
            // The lane: the request's KV families, else the model's own.
            let kv = match self.lane_kv(i, s.params.kv.as_ref()) {
                Ok(kv) => kv,
                Err(e) => {
                    self.end((s, Err(e)));
                    continue;
                }
            };
            let lane = super::super::scheduler::LaneId::new(&s.entry.id, &kv.0, &kv.1);
            let (model, sched) = (&mut self.models[i].model, &mut self.sched);
            let id = s.entry.id.clone();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.admit(s, model, kv))) {
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
                    self.sched.repair(&lane);
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
}
