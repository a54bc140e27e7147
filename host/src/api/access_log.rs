//! One log line per HTTP request (target `rmlx::api::access_log`, level info;
//! `/health` and `/metrics` at debug, so probes and scrapes stay out of the
//! default log): method, path, model, status, prompt and completion tokens,
//! TTFT, duration, finish reason, and any warning the handler raised.
//!
//! The line is written when the request's record (engine/metrics.rs) is
//! finished: for a streamed response, when its last token has been sent, so
//! its tokens and duration are the whole stream's. [`layer`] runs inside
//! `metrics::track`, which opens the record.
//!
//! Handlers raise warnings with [`warn`]: each is logged (warn level and on
//! the request's line) and sent back as an `x-rmlx-warning` response header,
//! which SDKs ignore and clients can read.
use crate::engine::metrics::{current_request, RequestRow};
use poem::http::{HeaderValue, Method};
use poem::{Endpoint, IntoResponse, Request, Response};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The response header that carries a handler's warnings (one per warning).
pub const WARNING_HEADER: &str = "x-rmlx-warning";

tokio::task_local! {
    static WARNINGS: Arc<Mutex<Vec<String>>>;
}

/// Adds a warning to the response of the request being handled (logged at
/// warn now, on the request's line, and in an `x-rmlx-warning` header).
/// Outside a request it is only logged.
pub fn warn(msg: impl Into<String>) {
    let msg = msg.into();
    tracing::warn!("{msg}");
    let _ = WARNINGS.try_with(|w| w.lock().unwrap().push(msg));
}

/// What the line shows besides the record's figures.
struct Line {
    method: Method,
    path: String,
    warnings: Vec<String>,
}

fn quiet(path: &str) -> bool {
    path == "/health" || path == "/metrics"
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

impl Line {
    fn emit(&self, row: &RequestRow) {
        let ttft_ms = row.ttft_s.map(ms);
        let finish = row.finish_reason.as_deref();
        let warning = self.warnings.join("; ");
        macro_rules! line {
            ($lvl:expr) => {
                tracing::event!(
                    $lvl,
                    method = %self.method,
                    path = %self.path,
                    model = %if row.model.is_empty() { "-" } else { row.model.as_str() },
                    status = row.status,
                    prompt_tokens = row.prompt_tokens,
                    completion_tokens = row.completion_tokens,
                    ttft_ms = ttft_ms,
                    duration_ms = ms(row.duration_s),
                    finish = finish.map(tracing::field::display),
                    warning = (!warning.is_empty()).then_some(warning.as_str()),
                    "request"
                )
            };
        }
        if quiet(&self.path) {
            line!(tracing::Level::DEBUG)
        } else {
            line!(tracing::Level::INFO)
        }
    }
}

/// Middleware body: scopes [`warn`], adds the warning headers, and hangs the
/// log line on the request's record (or writes it now when there is none).
pub async fn layer<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let t0 = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let r = WARNINGS.scope(warnings.clone(), ep.call(req)).await.map(IntoResponse::into_response);
    let warnings = std::mem::take(&mut *warnings.lock().unwrap());
    let status = match &r {
        Ok(resp) => resp.status(),
        Err(e) => e.status(),
    };
    let headers: Vec<HeaderValue> = warnings.iter().filter_map(|w| header_value(w)).collect();
    let line = Line { method, path, warnings };
    match current_request() {
        Some(rec) => rec.on_finish(Box::new(move |row| line.emit(row))),
        None => line.emit(&RequestRow { status: status.as_u16(), duration_s: t0.elapsed().as_secs_f64(), ..Default::default() }),
    }
    let mut resp = r?;
    for h in headers {
        resp.headers_mut().append(WARNING_HEADER, h);
    }
    Ok(resp)
}

/// A header value: visible ASCII and spaces only (anything else becomes `?`).
fn header_value(w: &str) -> Option<HeaderValue> {
    let s: String = w.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect();
    HeaderValue::from_str(&s).ok()
}
