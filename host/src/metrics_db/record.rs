//! Recording a run: the writer thread, fed by a channel, writes finished
//! requests and periodic engine samples.
use super::{now, SCHEMA};
use crate::engine::metrics::RequestRow;
use crate::engine::scheduler::EngineStats;
use crate::engine::worker::Worker;
use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the engine is sampled (a sample equal to the last one is
/// skipped, but one is written at least every [`SAMPLE_IDLE`]).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const SAMPLE_IDLE: Duration = Duration::from_secs(60);

/// What a run records about itself at start.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub version: String,
    pub device: String,
    /// (id, directory).
    pub models: Vec<(String, String)>,
    /// The settings the server runs with (no secrets).
    pub config: serde_json::Value,
}

enum Msg {
    Request(RequestRow),
    Flush(Sender<()>),
    Close,
}

/// A run being recorded: the writer thread's handle.
pub struct RunLog {
    pub run_id: i64,
    pub path: PathBuf,
    tx: Mutex<Sender<Msg>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl RunLog {
    /// Opens (creating) the database, records the run, and starts the
    /// writer thread, which samples `stats` every [`SAMPLE_EVERY`].
    pub fn start(
        path: &Path,
        info: &RunInfo,
        stats: impl Fn() -> EngineStats + Send + 'static,
    ) -> Result<Arc<Self>> {
        let conn = open_rw(path)?;
        conn.execute(
            "INSERT INTO runs (started_at, version, device, models, config, pid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now(), info.version, info.device, serde_json::to_string(&info.models)?, info.config.to_string(), std::process::id()],
        )
        .with_context(|| format!("metrics database {}: recording the run", path.display()))?;
        let run_id = conn.last_insert_rowid();
        let (tx, rx) = channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("rmlx-metrics-db".into())
            .spawn(move || {
                let mut w = Writer {
                    conn,
                    run_id,
                    failures: 0,
                    last: None,
                    last_at: Instant::now(),
                };
                w.sample(&stats);
                let mut next = Instant::now() + SAMPLE_EVERY;
                loop {
                    match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        Ok(Msg::Request(row)) => w.request(&row),
                        Ok(Msg::Flush(done)) => {
                            // A flush also records the engine as it is now, so
                            // a report read right after it is current.
                            w.sample(&stats);
                            let _ = done.send(());
                        }
                        Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => {
                            w.last = None;
                            w.sample(&stats);
                            w.end();
                            return;
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            w.sample(&stats);
                            next = Instant::now() + SAMPLE_EVERY;
                        }
                    }
                }
            })?;
        Ok(Arc::new(Self {
            run_id,
            path: path.to_path_buf(),
            tx: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn send(&self, m: Msg) -> bool {
        self.tx.lock().unwrap().send(m).is_ok()
    }

    /// Queues a finished request (never waits on the disk).
    pub fn record(&self, row: RequestRow) {
        self.send(Msg::Request(row));
    }

    /// Waits until everything queued before has been written, and writes a
    /// sample of the engine as it is now (skipped when unchanged).
    pub fn flush(&self) {
        let (tx, rx) = channel();
        if self.send(Msg::Flush(tx)) {
            let _ = rx.recv();
        }
    }

    /// Writes the last sample and the run's end, and stops the writer.
    pub fn close(&self) {
        self.send(Msg::Close);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

/// Starts a run log at `path` for `worker`'s engine and routes its finished
/// requests there.
pub fn attach(worker: &Worker, path: &Path, info: &RunInfo) -> Result<Arc<RunLog>> {
    let log = RunLog::start(path, info, worker.stats_source())?;
    let sink = log.clone();
    worker
        .metrics()
        .set_row_sink(Box::new(move |row| sink.record(row)));
    Ok(log)
}

fn open_rw(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("metrics database: creating {}", dir.display()))?;
    }
    let conn =
        Connection::open(path).with_context(|| format!("metrics database {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let setup = || -> rusqlite::Result<()> {
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
        conn.execute_batch(SCHEMA)
    };
    setup().with_context(|| {
        format!(
            "metrics database {} (not an SQLite file, or not writable)",
            path.display()
        )
    })?;
    Ok(conn)
}

struct Writer {
    conn: Connection,
    run_id: i64,
    failures: u64,
    last: Option<[u64; 8]>,
    last_at: Instant,
}

impl Writer {
    fn failed(&mut self, what: &str, e: rusqlite::Error) {
        self.failures += 1;
        if self.failures == 1 || self.failures.is_multiple_of(100) {
            tracing::error!(
                "metrics database: writing {what} failed ({} failures so far): {e}",
                self.failures
            );
        }
    }

    fn request(&mut self, r: &RequestRow) {
        let itl: Vec<u8> = r.itls.iter().flat_map(|x| x.to_le_bytes()).collect();
        let res = self.conn.execute(
            "INSERT INTO requests (run_id, at, model, endpoint, status, finish_reason, error, sequences, prompt_tokens, \
             completion_tokens, ttft_s, duration_s, decode_tps, itl_s) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                self.run_id,
                r.at,
                r.model,
                r.endpoint,
                r.status,
                r.finish_reason,
                r.error,
                r.sequences,
                r.prompt_tokens as i64,
                r.completion_tokens as i64,
                r.ttft_s,
                r.duration_s,
                r.decode_tps,
                (!itl.is_empty()).then_some(itl),
            ],
        );
        if let Err(e) = res {
            self.failed("a request", e);
        }
    }

    fn sample(&mut self, stats: &impl Fn() -> EngineStats) {
        let s = stats();
        let sum = |f: fn(&crate::engine::block_manager::BlockStats) -> usize| {
            s.blocks.iter().map(|(_, b)| f(b) as u64).sum::<u64>()
        };
        let used = sum(|b| b.seq_blocks);
        let cached = sum(|b| b.cached_blocks);
        let free = sum(|b| b.free_blocks);
        let v = [
            s.waiting as u64,
            s.running as u64,
            used,
            free,
            cached,
            s.memory_active_bytes,
            s.memory_peak_bytes,
            s.memory_cache_bytes,
        ];
        if self.last == Some(v) && self.last_at.elapsed() < SAMPLE_IDLE {
            return;
        }
        let i = |x: u64| x as i64;
        let res = self.conn.execute(
            "INSERT INTO samples (run_id, at, queue_depth, running, kv_used, kv_free, kv_cached, memory_active, memory_peak, memory_cache) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![self.run_id, now(), i(v[0]), i(v[1]), i(v[2]), i(v[3]), i(v[4]), i(v[5]), i(v[6]), i(v[7])],
        );
        match res {
            Ok(_) => {
                self.last = Some(v);
                self.last_at = Instant::now();
            }
            Err(e) => self.failed("a sample", e),
        }
    }

    fn end(&mut self) {
        if let Err(e) = self.conn.execute(
            "UPDATE runs SET ended_at = ?1 WHERE id = ?2",
            params![now(), self.run_id],
        ) {
            self.failed("the run's end", e);
        }
    }
}
