//! Reading a run log back: the runs, and one run's figures overall and per
//! model (`rmlx metrics`).
use anyhow::{bail, Context, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

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
