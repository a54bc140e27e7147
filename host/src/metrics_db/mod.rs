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
mod record;
mod report;
#[cfg(test)]
mod tests;

pub use record::{attach, RunInfo, RunLog, SAMPLE_EVERY};
pub use report::{open_read, percentile, report, runs, Figures, RunReport, RunSummary};

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// The tables of a run log (created when missing).
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
