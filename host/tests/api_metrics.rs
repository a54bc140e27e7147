//! `GET /metrics` and the SQLite run log, in process on port 0 with the
//! default model (SmolLM2-135M-Instruct, `make default-model`): after a plain
//! and a streamed chat request (same prompt, so the second hits the prefix
//! cache) and one for an unknown model, the exposition parses (every sample
//! belongs to a `# TYPE`d family), counters moved by the requests' token
//! counts, histogram buckets are cumulative with `+Inf` = count; the run log
//! holds the run and the requests, and `rmlx metrics --db F --json` reports
//! them. Bad `--db` paths are clear errors; /metrics follows --api-key.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use rmlx::metrics_db::{self, RunInfo};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const SMOL: &str = "SmolLM2-135M-Instruct";

fn state(model: (Option<String>, std::path::PathBuf), opts: ServerOptions) -> Arc<AppState> {
    let catalog = ModelCatalog::discover(&[model], &[]).unwrap();
    let worker = Worker::start(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
        &catalog,
    )
    .unwrap();
    Arc::new(AppState { catalog: Arc::new(catalog), worker, opts })
}

/// One parsed exposition: family name -> type, and samples (name, labels, value).
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&ty), "{line}");
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP "), "unexpected comment: {line}");
                continue;
            }
            let (head, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match head.split_once('{') {
                None => (head.to_string(), BTreeMap::new()),
                Some((n, l)) => {
                    let l = l.strip_suffix('}').unwrap();
                    let labels = l
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap();
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        let e = Self { types, samples };
        for (name, _, _) in &e.samples {
            let family = e.family_of(name);
            assert!(family.is_some(), "sample {name} belongs to no # TYPE'd family");
        }
        e
    }

    fn family_of<'a>(&self, sample: &'a str) -> Option<&'a str> {
        if self.types.contains_key(sample) {
            return Some(sample);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return Some(base);
                }
            }
        }
        None
    }

    /// The value of `name` with exactly these labels (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.iter().find(|(n, l, _)| n == name && *l == want).map(|s| s.2).unwrap_or(0.0)
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// Checks every histogram series: buckets cumulative in `le` order, +Inf = count.
    fn check_histograms(&self) {
        for (family, _) in self.types.iter().filter(|(_, t)| *t == "histogram") {
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for (n, l, v) in &self.samples {
                if *n == format!("{family}_bucket") {
                    let mut key = l.clone();
                    let le = key.remove("le").expect("bucket without le");
                    let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
                    series.entry(key).or_default().push((le, *v));
                }
            }
            for (labels, mut buckets) in series {
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family} {labels:?}: buckets not cumulative: {buckets:?}");
                let inf = buckets.last().unwrap();
                assert!(inf.0.is_infinite(), "{family} {labels:?}: no +Inf bucket");
                let lv: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                assert_eq!(inf.1, self.get(&format!("{family}_count"), &lv), "{family} {labels:?}: +Inf != count");
            }
        }
    }
}

async fn scrape(base: &str, key: Option<&str>) -> (u16, String, String) {
    let mut r = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

fn chat(stream: bool) -> Value {
    json!({
        "model": SMOL,
        "messages": [{"role": "user", "content": "Name three colours of the rainbow, one per line, nothing else."}],
        "max_tokens": 12,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

#[tokio::test]
async fn metrics_and_run_log() {
    let _g = common::mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("metrics.sqlite");
    let st = state((Some(SMOL.into()), common::default_model()), ServerOptions::default());
    let info = RunInfo { version: "test".into(), device: "cpu".into(), models: vec![(SMOL.into(), "x".into())], config: json!({"test": true}) };
    let log = metrics_db::attach(&st.worker, &db, &info).unwrap();
    let base = common::serve(st);
    let client = reqwest::Client::new();

    // Before any request: it parses, gauges are there.
    let (status, ct, text) = scrape(&base, None).await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let before = Exposition::parse(&text);
    assert!(before.has("rmlx_queue_depth") && before.has("rmlx_memory_peak_bytes"), "{text}");

    // A plain request, then the same prompt streamed (prefix-cache hit), then an unknown model.
    let v: Value = client.post(format!("{base}/v1/chat/completions")).json(&chat(false)).send().await.unwrap().json().await.unwrap();
    let u1 = v["usage"].clone();
    assert!(u1["completion_tokens"].as_u64().unwrap() >= 2, "{v}");
    let r = client.post(format!("{base}/v1/chat/completions")).json(&chat(true)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let events = common::parse_sse(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let last: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    let u2 = last["usage"].clone();
    assert!(u2["completion_tokens"].as_u64().unwrap() >= 2, "{last}");
    let mut bad = chat(false);
    bad["model"] = json!("no-such-model");
    let r = client.post(format!("{base}/v1/chat/completions")).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let (_, _, text) = scrape(&base, None).await;
    let m = Exposition::parse(&text);
    m.check_histograms();
    let model = [("model", SMOL)];
    let tokens = |k: &str| u1[k].as_u64().unwrap() as f64 + u2[k].as_u64().unwrap() as f64;
    assert_eq!(m.get("rmlx_prompt_tokens_total", &model), tokens("prompt_tokens"), "{text}");
    assert_eq!(m.get("rmlx_generation_tokens_total", &model), tokens("completion_tokens"), "{text}");
    let chat_ok = [("model", SMOL), ("endpoint", "/v1/chat/completions"), ("status", "200")];
    assert_eq!(m.get("rmlx_requests_total", &chat_ok), 2.0, "{text}");
    let unknown = [("model", ""), ("endpoint", "/v1/chat/completions"), ("status", "404")];
    assert_eq!(m.get("rmlx_requests_total", &unknown), 1.0, "{text}");
    // One TTFT and one duration per request; n-1 gaps per sequence.
    assert_eq!(m.get("rmlx_time_to_first_token_seconds_count", &model), 2.0);
    assert_eq!(m.get("rmlx_request_duration_seconds_count", &model), 2.0);
    assert_eq!(m.get("rmlx_inter_token_latency_seconds_count", &model), tokens("completion_tokens") - 2.0);
    assert!(m.get("rmlx_time_to_first_token_seconds_sum", &model) > 0.0);
    // The second prompt reused the first one's blocks.
    assert!(m.get("rmlx_prefix_cache_hits_total", &model) >= 1.0, "{text}");
    assert!(m.get("rmlx_prefix_cache_hit_tokens_total", &model) >= 16.0, "{text}");
    assert!(m.get("rmlx_prefix_cache_misses_total", &model) >= 1.0, "{text}");
    assert!(m.get("rmlx_kv_blocks_free", &model) > 0.0, "{text}");
    assert!(m.get("rmlx_kv_blocks_cached", &model) > 0.0, "{text}");
    for name in ["rmlx_kv_blocks_used", "rmlx_kv_ssd_reads_total", "rmlx_kv_ssd_writes_total", "rmlx_kv_ssd_state_reads_total", "rmlx_kv_ssd_state_writes_total", "rmlx_kv_preemptions_total"] {
        assert!(m.has(name), "{name} missing:\n{text}");
    }
    // Per layer group: this model has full layers only, so one group; its
    // blocks, all idle in the prefix cache now, are what the budget holds.
    let full = [("model", SMOL), ("group", "full")];
    assert_eq!(m.get("rmlx_kv_group_blocks_used", &full), 0.0, "{text}");
    assert_eq!(m.get("rmlx_kv_group_blocks_cached", &full), m.get("rmlx_kv_blocks_cached", &model), "{text}");
    assert!(m.get("rmlx_kv_group_block_bytes", &full) > 0.0, "{text}");
    assert!(!text.contains("group=\"window\""), "{text}");
    assert_eq!(
        m.get("rmlx_kv_used_bytes", &[]),
        m.get("rmlx_kv_group_blocks_cached", &full) * m.get("rmlx_kv_group_block_bytes", &full),
        "{text}"
    );
    assert_eq!(m.get("rmlx_running_sequences", &[]), 0.0);
    assert_eq!(m.get("rmlx_queue_depth", &[]), 0.0);
    assert!(m.get("rmlx_memory_peak_bytes", &[]) > 0.0, "{text}");
    assert!(m.get("rmlx_memory_peak_bytes", &[]) >= m.get("rmlx_memory_active_bytes", &[]));
    // Scrapes are not requests.
    assert!(!text.contains("endpoint=\"/metrics\""), "{text}");

    // The run log has the run and the three requests.
    log.flush();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let runs: i64 = conn.query_row("SELECT count(*) FROM runs WHERE id = ?1 AND version = 'test'", [log.run_id], |r| r.get(0)).unwrap();
    assert_eq!(runs, 1);
    let mut st = conn
        .prepare("SELECT model, status, prompt_tokens, completion_tokens, ttft_s, decode_tps, finish_reason FROM requests WHERE run_id = ?1 ORDER BY id")
        .unwrap();
    type Row = (String, i64, i64, i64, Option<f64>, Option<f64>, Option<String>);
    let rows: Vec<Row> = st
        .query_map([log.run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (row, u) in rows[..2].iter().zip([&u1, &u2]) {
        assert_eq!((row.0.as_str(), row.1), (SMOL, 200));
        assert_eq!((row.2 as u64, row.3 as u64), (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap()));
        assert!(row.4.unwrap() > 0.0 && row.5.unwrap() > 0.0, "{row:?}");
        assert!(["stop", "length"].contains(&row.6.as_deref().unwrap()), "{row:?}");
    }
    assert_eq!((rows[2].0.as_str(), rows[2].1, rows[2].6.as_deref()), ("", 404, None));
    let samples: i64 = conn.query_row("SELECT count(*) FROM samples WHERE run_id = ?1", [log.run_id], |r| r.get(0)).unwrap();
    assert!(samples >= 1);

    // rmlx metrics reads it back.
    let out = std::process::Command::new(common::rmlx_bin()).args(["metrics", "--json", "--db"]).arg(&db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 1, "{v}");
    let rep = &v["report"];
    assert_eq!(rep["run"]["id"], json!(log.run_id));
    assert_eq!(rep["overall"]["requests"], 3);
    assert_eq!(rep["overall"]["by_status"], json!({"200": 2, "404": 1}));
    let f = &rep["models"][SMOL];
    assert_eq!(f["prompt_tokens"].as_f64().unwrap(), tokens("prompt_tokens"));
    assert_eq!(f["completion_tokens"].as_f64().unwrap(), tokens("completion_tokens"));
    for k in ["ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s", "decode_tps"] {
        assert!(f[k].as_f64().unwrap() > 0.0, "{k}: {f}");
    }
    assert!(rep["peak_memory_bytes"].as_u64().unwrap() > 0, "{rep}");
    // The table form too.
    let out = std::process::Command::new(common::rmlx_bin()).args(["metrics", "--db"]).arg(&db).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(SMOL) && text.contains("TTFT p50"), "{text}");
    log.close();
    let ended: Option<f64> = conn.query_row("SELECT ended_at FROM runs WHERE id = ?1", [log.run_id], |r| r.get(0)).unwrap();
    assert!(ended.is_some());
}

#[test]
fn metrics_cli_bad_db_paths() {
    let dir = tempfile::tempdir().unwrap();
    let run = |db: &std::path::Path, extra: &[&str]| {
        let out = std::process::Command::new(common::rmlx_bin()).args(["metrics", "--db"]).arg(db).args(extra).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = run(&dir.path().join("missing/metrics.sqlite"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: no metrics database at "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let junk = dir.path().join("junk.sqlite");
    std::fs::write(&junk, "this is not a database, just text that is long enough to have a header").unwrap();
    let (code, err) = run(&junk, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a readable rmlx metrics database"), "{err}");
    assert!(!dir.path().join("missing").exists(), "reading must not create the database");
}

#[tokio::test]
async fn metrics_follow_the_api_key() {
    let st = state((None, common::fixture("models/llama-f32")), ServerOptions { api_key: Some("sekret".into()), ..Default::default() });
    let base = common::serve(st);
    let (status, _, _) = scrape(&base, None).await;
    assert_eq!(status, 401);
    let (status, ct, text) = scrape(&base, Some("sekret")).await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("text/plain; version=0.0.4"));
    let m = Exposition::parse(&text);
    // The refused scrape is not counted; nothing else ran.
    assert!(!m.has("rmlx_requests_total"), "{text}");
}
