//! `rmlx metrics`: the runs `rmlx serve` recorded in its SQLite run log
//! (crate::metrics_db) and one run's figures: requests by status, tokens,
//! TTFT and inter-token latency p50/p95, decode tok/s, peak memory, overall
//! and per model. Also starts the run log for `rmlx serve`.
use crate::api::AppState;
use crate::config::Settings;
use crate::metrics_db::{self, Figures, RunInfo, RunLog, RunReport, RunSummary};
use anyhow::Result;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run log (default: server.metrics_db, else metrics.sqlite in the
    /// rmlx cache dir, ~/.cache/rmlx).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Show this run (default: the latest).
    #[arg(long)]
    pub run: Option<i64>,
    /// Print JSON: {"db", "runs": [...], "report": {...} or null}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, settings: &Settings) -> Result<()> {
    let path = args.db.clone().or_else(|| settings.server.metrics_db.clone()).unwrap_or_else(metrics_db::default_path);
    let conn = metrics_db::open_read(&path)?;
    let runs = metrics_db::runs(&conn)?;
    let report = metrics_db::report(&conn, args.run)?;
    let out = if args.json {
        let v = serde_json::json!({ "db": path, "runs": runs, "report": report });
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        text(&path, &runs, report.as_ref())?
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn text(path: &std::path::Path, runs: &[RunSummary], report: Option<&RunReport>) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    writeln!(out, "{} ({} runs)", path.display(), runs.len())?;
    if runs.is_empty() {
        writeln!(out, "no runs recorded yet")?;
        return Ok(out);
    }
    writeln!(out, "{:>5}  {:<23}  {:>10}  {:>8}  {:<10}  MODELS", "RUN", "STARTED", "LASTED", "REQUESTS", "VERSION")?;
    for r in runs {
        let lasted = match r.ended_at {
            Some(e) => duration(e - r.started_at),
            None => "-".into(),
        };
        let models = r.models.join(", ");
        writeln!(out, "{:>5}  {:<23}  {:>10}  {:>8}  {:<10}  {models}", r.id, utc(r.started_at), lasted, r.requests, r.version)?;
    }
    let Some(r) = report else { return Ok(out) };
    let run = &r.run;
    let end = match run.ended_at {
        Some(e) => format!("ended {}", utc(e)),
        None => "no end recorded (still running, or killed)".into(),
    };
    writeln!(out)?;
    writeln!(out, "Run {}: rmlx {} on {}, started {}, {end}", run.id, run.version, run.device, utc(run.started_at))?;
    let peak = r.peak_memory_bytes.map(|b| format!("{:.3} GB", b as f64 / 1e9)).unwrap_or_else(|| "-".into());
    writeln!(out, "peak MLX memory: {peak} ({} samples)", r.samples)?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<32} {:>8} {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "MODEL", "REQUESTS", "STATUS", "PROMPT", "GEN", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "DEC TOK/S"
    )?;
    row(&mut out, "(all)", &r.overall)?;
    for (m, f) in &r.models {
        row(&mut out, m, f)?;
    }
    Ok(out)
}

fn row(out: &mut String, name: &str, f: &Figures) -> std::fmt::Result {
    let status: Vec<String> = f.by_status.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    let ms = |v: Option<f64>| v.map(|s| format!("{:.1}ms", s * 1e3)).unwrap_or_else(|| "-".into());
    let tps = f.decode_tps.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "{:<32} {:>8} {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        name,
        f.requests,
        status.join(" "),
        f.prompt_tokens,
        f.completion_tokens,
        ms(f.ttft_p50_s),
        ms(f.ttft_p95_s),
        ms(f.itl_p50_s),
        ms(f.itl_p95_s),
        tps
    )
}

fn duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: f64) -> String {
    let t = secs.max(0.0) as i64;
    let (days, rem) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The run log for `rmlx serve` (None with `--no-metrics-db`). A path set
/// by flag or config that cannot be opened is an error; the default path
/// failing only warns (the server runs without a run log).
pub fn start_run_log(settings: &Settings, args: &super::serve::Args, state: &AppState) -> Result<Option<Arc<RunLog>>> {
    let s = &settings.server;
    if s.no_metrics_db {
        return Ok(None);
    }
    let path = s.metrics_db.clone().unwrap_or_else(metrics_db::default_path);
    let mut config = serde_json::to_value(settings)?;
    if let Some(server) = config.get_mut("server").and_then(|v| v.as_object_mut()) {
        // Never store the key.
        server.insert("api_key".into(), serde_json::json!(s.api_key.as_ref().map(|_| "(set)")));
    }
    config["serve_flags"] = serde_json::json!({
        "kv_budget": args.kv_budget, "kv_block_size": args.kv_block_size, "max_running": args.max_running,
        "no_prefix_cache": args.no_prefix_cache, "prefill_chunk": args.prefill_chunk, "preload": args.preload,
    });
    let info = RunInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        device: crate::runtime::default_device(),
        models: state.catalog.entries.iter().map(|e| (e.id.clone(), e.path.display().to_string())).collect(),
        config,
    };
    match metrics_db::attach(&state.worker, &path, &info) {
        Ok(log) => Ok(Some(log)),
        Err(e) if s.metrics_db.is_some() => Err(e.context("--metrics-db (or server.metrics_db); --no-metrics-db turns the run log off")),
        Err(e) => {
            eprintln!("warning: no run log this time: {e:#}");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_795_660_800.0 + 3661.0), "2026-11-26 03:41:01 UTC");
    }
}
