//! Server metrics that the engine and the API share: the Prometheus counters
//! and histograms (rendered by `api::metrics` at `GET /metrics`), the
//! per-request record that becomes a row of the SQLite run log
//! (`crate::metrics_db`), and the engine thread's per-sequence timing.
//!
//! Where latencies are measured: on the engine thread, once per sequence.
//! TTFT is from the moment the engine takes the request (its queue wait
//! included) to the sampling of its first token; every later token is
//! stamped at the end of the engine step that emitted it, and the
//! inter-token latency is the gap between two consecutive stamps of one
//! sequence. Token counters are per model: prompt tokens when a sequence is
//! admitted, generated tokens as they are emitted.
//!
//! A request's record ([`RequestRecord`]) is shared by the HTTP layer (which
//! knows the endpoint and status) and the engine (tokens and timings of every
//! sequence the request submitted, found through the [`REQUEST`] task-local
//! while the handler runs). Whoever lets go of it last finishes it: it counts
//! `rmlx_requests_total`, observes the request duration and hands its row to
//! the run log (API routes, `/v1/...`, only). For a streamed response that is
//! the engine, when the last token has been sent.
use super::sequence::Sequence;
use super::worker::{Finish, FinishReason, WorkerError};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

tokio::task_local! {
    /// The record of the HTTP request whose handler is running (set by the API layer).
    pub static REQUEST: Arc<RequestRecord>;
}

/// The record of the request running on this task, if any.
pub fn current_request() -> Option<Arc<RequestRecord>> {
    REQUEST.try_with(|r| r.clone()).ok()
}

/// One finished HTTP request, as the run log stores it.
#[derive(Debug, Clone, Default)]
pub struct RequestRow {
    /// Seconds since the epoch when it arrived.
    pub at: f64,
    /// Empty when the request named no served model.
    pub model: String,
    pub endpoint: String,
    pub status: u16,
    /// stop, stop_string, length, cancelled, error; None when nothing was generated.
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub sequences: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttft_s: Option<f64>,
    pub duration_s: f64,
    /// Tokens after the first over the time between the first and the last.
    pub decode_tps: Option<f64>,
    /// Inter-token gaps of its sequences, seconds.
    pub itls: Vec<f32>,
}

/// Where finished request rows go (the run log's writer thread).
pub type RowSink = Box<dyn Fn(RequestRow) + Send + Sync>;

/// Called once when a request's record is finished, with its row (the
/// server's per-request log line, api/access_log.rs).
pub type FinishHook = Box<dyn FnOnce(&RequestRow) + Send>;

/// The Prometheus figures the server owns (those read from the engine's
/// published stats are added at scrape time by `api::metrics`).
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub duration: HistogramVec,
    /// Embedding requests served by one engine run (requests that waited
    /// together share padded forwards: engine/worker/embeds.rs).
    pub embed_requests: HistogramVec,
    /// Rows (inputs) in one embedding forward.
    pub embed_rows: HistogramVec,
    sink: OnceLock<RowSink>,
}

const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5];
const EMBED_REQUEST_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
const EMBED_ROW_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0];
const DURATION_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

impl Metrics {
    pub fn new() -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model"]).expect("valid metric")
        };
        let m = Self {
            registry: Registry::new(),
            requests: counter("rmlx_requests_total", "HTTP requests finished, by model, endpoint and status code.", &["model", "endpoint", "status"]),
            prompt_tokens: counter("rmlx_prompt_tokens_total", "Prompt tokens of admitted sequences.", &["model"]),
            generation_tokens: counter("rmlx_generation_tokens_total", "Tokens generated (emitted to clients).", &["model"]),
            ttft: hist("rmlx_time_to_first_token_seconds", "From the engine taking a sequence to its first token.", TTFT_BUCKETS),
            itl: hist("rmlx_inter_token_latency_seconds", "Gap between two consecutive tokens of a sequence.", ITL_BUCKETS),
            duration: hist("rmlx_request_duration_seconds", "From a generation request's arrival to its end (last token sent).", DURATION_BUCKETS),
            embed_requests: hist("rmlx_embedding_batch_requests", "Embedding requests served together by one engine run.", EMBED_REQUEST_BUCKETS),
            embed_rows: hist("rmlx_embedding_forward_rows", "Inputs (rows) in one embedding forward.", EMBED_ROW_BUCKETS),
            sink: OnceLock::new(),
        };
        for c in [&m.requests, &m.prompt_tokens, &m.generation_tokens] {
            m.registry.register(Box::new(c.clone())).expect("unique metric");
        }
        for h in [&m.ttft, &m.itl, &m.duration, &m.embed_requests, &m.embed_rows] {
            m.registry.register(Box::new(h.clone())).expect("unique metric");
        }
        m
    }

    /// Sends every finished request's row to `sink` from now on (once).
    pub fn set_row_sink(&self, sink: RowSink) {
        let _ = self.sink.set(sink);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One HTTP request's figures while it runs (see the module doc).
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    endpoint: String,
    t0: Instant,
    at: f64,
    data: Mutex<RecordData>,
    on_finish: Mutex<Option<FinishHook>>,
}

#[derive(Default)]
struct RecordData {
    model: Option<String>,
    status: Option<u16>,
    finish: Option<String>,
    error: Option<String>,
    sequences: u32,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Option<f64>,
    itls: Vec<f32>,
}

impl RequestRecord {
    pub fn new(metrics: Arc<Metrics>, endpoint: &str) -> Arc<Self> {
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Arc::new(Self { metrics, endpoint: endpoint.to_string(), t0: Instant::now(), at, data: Mutex::new(RecordData::default()), on_finish: Mutex::new(None) })
    }

    /// Runs `hook` with the request's row when it finishes (for a stream:
    /// when its last token has been sent). One hook; a later one replaces it.
    pub fn on_finish(&self, hook: FinishHook) {
        *self.on_finish.lock().unwrap() = Some(hook);
    }

    /// The served model the request names (the engine's id wins when it ran).
    pub fn set_model(&self, model: &str) {
        let mut d = self.data.lock().unwrap();
        if d.model.is_none() {
            d.model = Some(model.to_string());
        }
    }

    pub fn set_status(&self, status: u16) {
        self.data.lock().unwrap().status = Some(status);
    }

    /// A sequence of this request ended on the engine.
    fn add_sequence(&self, s: &Sequence, r: &Result<Finish, WorkerError>, ttft: Option<f64>, itls: &[f32]) {
        let mut d = self.data.lock().unwrap();
        d.model = Some(s.entry.id.clone());
        d.sequences += 1;
        if s.started_sent {
            d.prompt_tokens += s.prompt_len as u64;
        }
        d.completion_tokens += s.n as u64;
        if d.ttft.is_none() {
            d.ttft = ttft;
        }
        d.itls.extend_from_slice(itls);
        match r {
            Ok(f) => d.finish = Some(reason_name(f.reason).to_string()),
            Err(e) => {
                d.finish = Some("error".into());
                d.error = Some(e.to_string());
            }
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let d = std::mem::take(self.data.get_mut().unwrap_or_else(|e| e.into_inner()));
        let model = d.model.unwrap_or_default();
        let status = d.status.unwrap_or(500);
        let duration = self.t0.elapsed().as_secs_f64();
        self.metrics.requests.with_label_values(&[model.as_str(), self.endpoint.as_str(), &status.to_string()]).inc();
        if d.sequences > 0 {
            self.metrics.duration.with_label_values(&[model.as_str()]).observe(duration);
        }
        let hook = self.on_finish.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        // The run log keeps the API's requests (/v1/...), not health checks or docs.
        let sink = self.metrics.sink.get().filter(|_| self.endpoint.starts_with("/v1/"));
        if sink.is_some() || hook.is_some() {
            let decode: f64 = d.itls.iter().map(|&x| x as f64).sum();
            let row = RequestRow {
                at: self.at,
                model,
                endpoint: self.endpoint.clone(),
                status,
                finish_reason: d.finish,
                error: d.error,
                sequences: d.sequences,
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                ttft_s: d.ttft,
                duration_s: duration,
                decode_tps: (decode > 0.0).then(|| d.itls.len() as f64 / decode),
                itls: d.itls,
            };
            if let Some(hook) = hook {
                hook(&row);
            }
            if let Some(sink) = sink {
                sink(row);
            }
        }
    }
}

pub fn reason_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::StopString => "stop_string",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// Per-sequence timing on the engine thread.
pub struct SeqTracker {
    metrics: Arc<Metrics>,
    seqs: HashMap<u64, SeqState>,
}

#[derive(Default)]
struct SeqState {
    prompt_counted: bool,
    ttft: Option<f64>,
    last_n: usize,
    t_last: Option<Instant>,
    record: Option<Arc<RequestRecord>>,
    /// Kept only for sequences with a record.
    itls: Vec<f32>,
}

impl SeqTracker {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, seqs: HashMap::new() }
    }

    /// The server's metrics (for figures the engine counts outside sequences).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A sequence was queued, on behalf of `record` when an HTTP request sent it.
    pub fn submitted(&mut self, id: u64, record: Option<Arc<RequestRecord>>) {
        self.seqs.insert(id, SeqState { record, ..Default::default() });
    }

    /// Counts what a sequence did since it was last seen (call after each step).
    pub fn observe(&mut self, s: &Sequence, now: Instant) {
        let st = self.seqs.entry(s.id).or_default();
        let model = s.entry.id.as_str();
        if !st.prompt_counted && s.started_sent {
            st.prompt_counted = true;
            self.metrics.prompt_tokens.with_label_values(&[model]).inc_by(s.prompt_len as u64);
        }
        if st.ttft.is_none() {
            if let Some(t) = s.t_first {
                let v = t.saturating_duration_since(s.t_arrive).as_secs_f64();
                st.ttft = Some(v);
                self.metrics.ttft.with_label_values(&[model]).observe(v);
            }
        }
        let new = s.n.saturating_sub(st.last_n);
        if new == 0 {
            return;
        }
        st.last_n = s.n;
        self.metrics.generation_tokens.with_label_values(&[model]).inc_by(new as u64);
        let mut gaps = new;
        let prev = match st.t_last {
            Some(t) => t,
            None => {
                gaps -= 1; // the first token has no gap before it
                now
            }
        };
        if gaps > 0 {
            let gap = now.saturating_duration_since(prev).as_secs_f64() / gaps as f64;
            let h = self.metrics.itl.with_label_values(&[model]);
            for _ in 0..gaps {
                h.observe(gap);
                if st.record.is_some() {
                    st.itls.push(gap as f32);
                }
            }
        }
        st.t_last = Some(now);
    }

    /// A sequence ended: last counts, then its figures go to its request's record.
    pub fn ended(&mut self, s: &Sequence, r: &Result<Finish, WorkerError>) {
        self.observe(s, Instant::now());
        if let Some(st) = self.seqs.remove(&s.id) {
            if let Some(rec) = st.record {
                rec.add_sequence(s, r, st.ttft, &st.itls);
            }
        }
    }
}

/// MLX's memory figures (bytes): active, peak since start (or the last
/// reset), cache. Call on the engine thread.
pub fn mlx_memory() -> (u64, u64, u64) {
    let get = |r: Result<usize, mlx_rs::error::Exception>| r.map(|v| v as u64).unwrap_or(0);
    (get(mlx_rs::memory::active_memory()), get(mlx_rs::memory::peak_memory()), get(mlx_rs::memory::cache_memory()))
}
