//! A run written and read back, clear errors on missing or foreign files,
//! nearest-rank percentiles.
use super::*;
use crate::engine::metrics::RequestRow;
use crate::engine::scheduler::EngineStats;
use rusqlite::Connection;

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
