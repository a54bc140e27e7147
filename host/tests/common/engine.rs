//! Driving the engine's worker from a test: start one over a catalog,
//! submit a request, collect its tokens.
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{Finish, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A worker over `catalog` with `sched`, the prefix cache off (so every
/// request computes its whole prompt), prefill chunks of 512.
pub fn worker(catalog: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    let cfg = WorkerConfig { plugins_dir: super::plugins_dir(), max_queue_depth: 4096, max_loaded_models: 4, idle_timeout: None, prefill_chunk: 512 };
    Worker::start_with(cfg, SchedulerConfig { prefix_cache: false, ..sched }, catalog).unwrap()
}

/// The catalog's entry `id`.
pub fn entry(cat: &ModelCatalog, id: &str) -> Arc<ModelEntry> {
    cat.entries.iter().find(|e| e.id == id).unwrap().clone()
}

/// Submits `prompt` to `e` with `params` (no hook); its events come on the receiver.
pub fn submit(w: &Worker, e: &Arc<ModelEntry>, prompt: &[u32], params: GenParams) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest { model: e.clone(), prompt: prompt.to_vec(), params, hook: None, cancel: Arc::new(AtomicBool::new(false)), keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

/// A request's tokens and finish; panics on a request error.
pub fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> (Vec<u32>, Finish) {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(f) => return (ids, f),
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// The engine's stats once `completed` requests have finished (they are
/// published after the step that ends them; waits at most 30 s).
#[allow(dead_code)]
pub fn stats_after(w: &Worker, completed: u64) -> rmlx::engine::scheduler::EngineStats {
    let t0 = std::time::Instant::now();
    loop {
        let s = w.stats();
        if s.completed >= completed || t0.elapsed().as_secs() > 30 {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
