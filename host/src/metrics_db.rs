//! The run log: a local SQLite file (default `~/.cache/rmlx/metrics.sqlite`)
//! where `rmlx serve` records each run (start and end, version, models,
//! device, settings), each finished request (model, endpoint, status, finish
//! reason, tokens, TTFT, duration, decode tok/s, inter-token gaps) and a
//! periodic sample of the engine (queue, running, KV blocks, MLX memory).
//! `rmlx metrics` reads it back ([`report`]).
//!
//! Writes happen on one writer thread fed by a channel: senders (the engine
//! thread, HTTP handlers) never wait on the disk. A failed write is logged and
//! the server goes on.
use crate::engine::metrics::RequestRow;
use crate::engine::scheduler::EngineStats;
use crate::engine::worker::Worker;
use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the engine is sampled (a sample equal to the last one is
/// skipped, but one is written at least every [`SAMPLE_IDLE`]).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const SAMPLE_IDLE: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL,
    version TEXT NOT NULL,
    device TEXT NOT NULL,
    models TEXT NOT NULL,
    config TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    at REAL NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    finish_reason TEXT,
    error TEXT,
    sequences INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    ttft_s REAL,
    duration_s REAL NOT NULL,
    decode_tps REAL,
    itl_s BLOB
);
CREATE INDEX IF NOT EXISTS requests_run ON requests(run_id);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    at REAL NOT NULL,
    queue_depth INTEGER NOT NULL,
    running INTEGER NOT NULL,
    kv_used INTEGER NOT NULL,
    kv_free INTEGER NOT NULL,
    kv_cached INTEGER NOT NULL,
    memory_active INTEGER NOT NULL,
    memory_peak INTEGER NOT NULL,
    memory_cache INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_run ON samples(run_id);
";

/// `$RMLX_CACHE_DIR`, else `$XDG_CACHE_HOME/rmlx`, else `~/.cache/rmlx`; then `metrics.sqlite`.
pub fn default_path() -> PathBuf {
    let cache = std::env::var_os("RMLX_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("rmlx")
        });
    cache.join("metrics.sqlite")
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

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

    /// Waits until everything queued before has been written.
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

// ---------------------------------------------------------------- reading

/// A run, as `rmlx metrics` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: i64,
    pub started_at: f64,
    /// None while the run goes on (or if it was killed).
    pub ended_at: Option<f64>,
    pub version: String,
    pub device: String,
    pub models: Vec<String>,
    pub requests: u64,
}

/// A run's figures, overall and per model.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run: RunSummary,
    pub config: serde_json::Value,
    pub overall: Figures,
    pub models: BTreeMap<String, Figures>,
    /// Most MLX memory in use during the run (from the samples).
    pub peak_memory_bytes: Option<u64>,
    pub samples: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub requests: u64,
    /// HTTP status code -> requests.
    pub by_status: BTreeMap<String, u64>,
    /// Finish reason -> requests (those that generated).
    pub by_finish: BTreeMap<String, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttft_p50_s: Option<f64>,
    pub ttft_p95_s: Option<f64>,
    pub itl_p50_s: Option<f64>,
    pub itl_p95_s: Option<f64>,
    /// All decode tokens over all decode time.
    pub decode_tps: Option<f64>,
    /// Median of the requests' own decode rates.
    pub decode_tps_p50: Option<f64>,
    pub duration_p50_s: Option<f64>,
    pub duration_p95_s: Option<f64>,
}

/// Opens an existing run log read-only; a clear error when it is missing or
/// not one.
pub fn open_read(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        bail!(
            "no metrics database at {} (rmlx serve writes one unless --no-metrics-db; see --db)",
            path.display()
        );
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening metrics database {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let tables: rusqlite::Result<i64> = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('runs', 'requests', 'samples')",
        [],
        |r| r.get(0),
    );
    match tables {
        Ok(3) => Ok(conn),
        Ok(_) => bail!("{} is an SQLite file but not an rmlx metrics database (no runs/requests/samples tables)", path.display()),
        Err(e) => bail!("{} is not a readable rmlx metrics database: {e}", path.display()),
    }
}

fn summary(r: &rusqlite::Row) -> rusqlite::Result<RunSummary> {
    let models: String = r.get(5)?;
    let models: Vec<(String, String)> = serde_json::from_str(&models).unwrap_or_default();
    Ok(RunSummary {
        id: r.get(0)?,
        started_at: r.get(1)?,
        ended_at: r.get(2)?,
        version: r.get(3)?,
        device: r.get(4)?,
        models: models.into_iter().map(|m| m.0).collect(),
        requests: r.get::<_, i64>(6)? as u64,
    })
}

const SUMMARY_SQL: &str = "SELECT r.id, r.started_at, r.ended_at, r.version, r.device, r.models, \
     (SELECT count(*) FROM requests q WHERE q.run_id = r.id) FROM runs r";

/// Every run, oldest first.
pub fn runs(conn: &Connection) -> Result<Vec<RunSummary>> {
    let mut st = conn.prepare(&format!("{SUMMARY_SQL} ORDER BY r.id"))?;
    let v = st
        .query_map([], summary)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

#[derive(Default)]
struct Acc {
    f: Figures,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tps: Vec<f64>,
    dur: Vec<f64>,
}

impl Acc {
    fn finish(mut self) -> Figures {
        for v in [&mut self.ttft, &mut self.itl, &mut self.tps, &mut self.dur] {
            v.sort_by(|a, b| a.total_cmp(b));
        }
        let f = &mut self.f;
        f.ttft_p50_s = percentile(&self.ttft, 50.0);
        f.ttft_p95_s = percentile(&self.ttft, 95.0);
        f.itl_p50_s = percentile(&self.itl, 50.0);
        f.itl_p95_s = percentile(&self.itl, 95.0);
        let decode: f64 = self.itl.iter().sum();
        f.decode_tps = (decode > 0.0).then(|| self.itl.len() as f64 / decode);
        f.decode_tps_p50 = percentile(&self.tps, 50.0);
        f.duration_p50_s = percentile(&self.dur, 50.0);
        f.duration_p95_s = percentile(&self.dur, 95.0);
        self.f
    }
}

/// One run's figures (`None` run: the latest).
pub fn report(conn: &Connection, run: Option<i64>) -> Result<Option<RunReport>> {
    let row = match run {
        Some(id) => conn
            .query_row(&format!("{SUMMARY_SQL} WHERE r.id = ?1"), [id], summary)
            .optional()?,
        None => conn
            .query_row(
                &format!("{SUMMARY_SQL} ORDER BY r.id DESC LIMIT 1"),
                [],
                summary,
            )
            .optional()?,
    };
    let Some(summary) = row else {
        if let Some(id) = run {
            bail!("no run {id} in the metrics database (`rmlx metrics` lists them)");
        }
        return Ok(None);
    };
    let config: String =
        conn.query_row("SELECT config FROM runs WHERE id = ?1", [summary.id], |r| {
            r.get(0)
        })?;
    let mut overall = Acc::default();
    let mut models: BTreeMap<String, Acc> = BTreeMap::new();
    let mut st = conn.prepare(
        "SELECT model, status, finish_reason, prompt_tokens, completion_tokens, ttft_s, duration_s, decode_tps, itl_s, sequences \
         FROM requests WHERE run_id = ?1 ORDER BY id",
    )?;
    let mut rows = st.query([summary.id])?;
    while let Some(r) = rows.next()? {
        let model: String = r.get(0)?;
        let status: i64 = r.get(1)?;
        let finish: Option<String> = r.get(2)?;
        let pt: i64 = r.get(3)?;
        let ct: i64 = r.get(4)?;
        let ttft: Option<f64> = r.get(5)?;
        let dur: f64 = r.get(6)?;
        let tps: Option<f64> = r.get(7)?;
        let itl: Option<Vec<u8>> = r.get(8)?;
        let seqs: i64 = r.get(9)?;
        let itl: Vec<f64> = itl
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect();
        let key = if model.is_empty() {
            "(none)".to_string()
        } else {
            model
        };
        for acc in [&mut overall, models.entry(key).or_default()] {
            let f = &mut acc.f;
            f.requests += 1;
            *f.by_status.entry(status.to_string()).or_default() += 1;
            if let Some(fr) = &finish {
                *f.by_finish.entry(fr.clone()).or_default() += 1;
            }
            f.prompt_tokens += pt as u64;
            f.completion_tokens += ct as u64;
            acc.ttft.extend(ttft);
            acc.tps.extend(tps);
            acc.itl.extend_from_slice(&itl);
            if seqs > 0 {
                acc.dur.push(dur);
            }
        }
    }
    let (peak, samples): (Option<i64>, i64) = conn.query_row(
        "SELECT max(memory_peak), count(*) FROM samples WHERE run_id = ?1",
        [summary.id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(Some(RunReport {
        run: summary,
        config: serde_json::from_str(&config).unwrap_or(serde_json::Value::Null),
        overall: overall.finish(),
        models: models.into_iter().map(|(k, a)| (k, a.finish())).collect(),
        peak_memory_bytes: peak.map(|p| p as u64),
        samples: samples as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, status: u16, ttft: f64, itls: &[f32]) -> RequestRow {
        RequestRow {
            at: now(),
            model: model.into(),
            endpoint: "/v1/chat/completions".into(),
            status,
            finish_reason: Some("stop".into()),
            sequences: 1,
            prompt_tokens: 10,
            completion_tokens: itls.len() as u64 + 1,
            ttft_s: Some(ttft),
            duration_s: 1.0,
            decode_tps: Some(10.0),
            itls: itls.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn writes_and_reports_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/metrics.sqlite");
        let info = RunInfo {
            version: "9.9.9".into(),
            device: "cpu".into(),
            models: vec![("m".into(), "/x".into())],
            config: serde_json::json!({"a": 1}),
        };
        let stats = || EngineStats {
            waiting: 2,
            memory_peak_bytes: 1234,
            ..Default::default()
        };
        let log = RunLog::start(&path, &info, stats).unwrap();
        log.record(row("m", 200, 0.5, &[0.1, 0.2, 0.3]));
        log.record(row("m", 200, 0.25, &[0.1]));
        log.record(RequestRow {
            model: String::new(),
            status: 404,
            endpoint: "/v1/chat/completions".into(),
            ..Default::default()
        });
        log.flush();
        // Readable while the run goes on.
        let conn = open_read(&path).unwrap();
        let r = report(&conn, None).unwrap().unwrap();
        assert_eq!(r.run.ended_at, None);
        assert_eq!(
            (
                r.overall.requests,
                r.overall.prompt_tokens,
                r.overall.completion_tokens
            ),
            (3, 20, 6)
        );
        assert_eq!(r.overall.by_status.get("404"), Some(&1));
        let m = &r.models["m"];
        assert_eq!(
            (m.requests, m.ttft_p50_s, m.ttft_p95_s),
            (2, Some(0.25), Some(0.5))
        );
        assert!(
            (m.itl_p50_s.unwrap() - 0.1).abs() < 1e-6 && (m.itl_p95_s.unwrap() - 0.3).abs() < 1e-6
        );
        assert!((m.decode_tps.unwrap() - 4.0 / 0.7).abs() < 1e-3);
        assert_eq!(r.models["(none)"].by_status.get("404"), Some(&1));
        assert_eq!(r.peak_memory_bytes, Some(1234));
        log.close();
        let r = report(&conn, Some(log.run_id)).unwrap().unwrap();
        assert!(r.run.ended_at.is_some());
        assert_eq!(runs(&conn).unwrap().len(), 1);
        assert!(report(&conn, Some(99))
            .unwrap_err()
            .to_string()
            .contains("no run 99"));
    }

    #[test]
    fn missing_and_foreign_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_read(&dir.path().join("none.sqlite"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no metrics database"), "{e}");
        let junk = dir.path().join("junk.sqlite");
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        let e = open_read(&junk).unwrap_err().to_string();
        assert!(e.contains("not a readable rmlx metrics database"), "{e}");
        let other = dir.path().join("other.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = open_read(&other).unwrap_err().to_string();
        assert!(e.contains("not an rmlx metrics database"), "{e}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(
            (percentile(&v, 50.0), percentile(&v, 95.0)),
            (Some(50.0), Some(95.0))
        );
        assert_eq!(percentile(&[3.0], 95.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
