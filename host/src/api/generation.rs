//! What the routes share: request fields -> engine parameters (validated,
//! naming the field), submitting to the engine, collecting a result, and the
//! output splitter (thinking / answer / tool calls).
use super::errors::ApiError;
use super::tools::{ToolEvent, ToolParser};
use super::types::kv_cache::KvCacheSpec;
use super::types::openai::KeepAliveSpec;
use super::State;
use crate::engine::sampler::SamplingParams;
use crate::engine::speculative::{serve::kind_label, DraftKind};
use crate::engine::worker::{
    Finish, GenEvent, GenParams, GenRequest, KeepAlive, KvChoice, LogitsHook, ModelEntry, TokenLogprob, WorkerError,
};
use poem::http::StatusCode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn new_id(prefix: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("{prefix}{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// Sampling fields common to the APIs (None: the server's default).
#[derive(Debug, Default, Clone)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    /// Anthropic allows 0..1, OpenAI 0..2.
    pub max_temperature: f32,
}

pub fn sampling(state: &State, f: &SamplingFields, vocab: Option<usize>) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams { temperature: state.opts.temperature, top_p: state.opts.top_p, ..Default::default() };
    if let Some(t) = f.temperature {
        if !(0.0..=f.max_temperature).contains(&t) {
            return Err(ApiError::bad_request("temperature", format!("`temperature` must be between 0 and {}, got {t}", f.max_temperature)));
        }
        p.temperature = t;
    }
    if let Some(v) = f.top_p {
        if !(v > 0.0 && v <= 1.0) {
            return Err(ApiError::bad_request("top_p", format!("`top_p` must be in (0, 1], got {v}")));
        }
        p.top_p = v;
    }
    if let Some(k) = f.top_k {
        if k < 0 {
            return Err(ApiError::bad_request("top_k", format!("`top_k` must be >= 0, got {k}")));
        }
        p.top_k = k as usize;
    }
    if let Some(v) = f.min_p {
        if !(0.0..=1.0).contains(&v) {
            return Err(ApiError::bad_request("min_p", format!("`min_p` must be in [0, 1], got {v}")));
        }
        p.min_p = v;
    }
    if let Some(v) = f.repetition_penalty {
        if !(v > 0.0) {
            return Err(ApiError::bad_request("repetition_penalty", format!("`repetition_penalty` must be > 0, got {v}")));
        }
        p.repetition_penalty = v;
    }
    for (name, v, dst) in [
        ("presence_penalty", f.presence_penalty, &mut p.presence_penalty),
        ("frequency_penalty", f.frequency_penalty, &mut p.frequency_penalty),
    ] {
        if let Some(v) = v {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad_request(name, format!("`{name}` must be between -2 and 2, got {v}")));
            }
            *dst = v;
        }
    }
    if let Some(bias) = &f.logit_bias {
        if bias.len() > super::limits::MAX_LOGIT_BIAS {
            return Err(ApiError::bad_request(
                "logit_bias",
                format!("`logit_bias` has {} entries; at most {} are allowed", bias.len(), super::limits::MAX_LOGIT_BIAS),
            ));
        }
        for (k, &b) in bias {
            let id: u32 = k
                .parse()
                .map_err(|_| ApiError::bad_request("logit_bias", format!("`logit_bias` keys must be token ids, got {k:?}")))?;
            if vocab.is_some_and(|n| id as usize >= n) {
                return Err(ApiError::bad_request("logit_bias", format!("`logit_bias` token id {id} is out of range")));
            }
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::bad_request("logit_bias", format!("`logit_bias` values must be between -100 and 100, got {b}")));
            }
            p.logit_bias.push((id, b));
        }
        p.logit_bias.sort_by_key(|b| b.0);
    }
    p.seed = f.seed.map(|s| s as u64);
    Ok(p)
}

/// `keep_alive` of any API (see [`super::limits::keep_alive`]).
pub fn keep_alive(spec: &Option<KeepAliveSpec>) -> Result<Option<KeepAlive>, ApiError> {
    match spec {
        None => Ok(None),
        Some(KeepAliveSpec::Seconds(s)) => super::limits::keep_alive(Some(*s), None),
        Some(KeepAliveSpec::Duration(d)) => super::limits::keep_alive(None, Some(d)),
    }
}

/// `kv_cache` (rmlx extension) -> the engine's choice of KV families,
/// every name checked against the families the plugins provide (400 naming
/// the field and listing them). None: the model's own. Whether a family
/// fits the model (head_dim) the engine finds out when it admits the
/// request (a 400 naming `kv_cache` too).
pub fn kv_choice(state: &State, spec: &Option<KvCacheSpec>) -> Result<Option<KvChoice>, ApiError> {
    let known = state.worker.kv_families();
    let check = |field: &str, name: &Option<String>| -> Result<Option<String>, ApiError> {
        let Some(n) = name else { return Ok(None) };
        if n == "auto" {
            return Ok(None);
        }
        if known.iter().any(|k| k == n) {
            return Ok(Some(n.clone()));
        }
        Err(ApiError::bad_request(
            field,
            format!("unknown KV cache family {n:?} in `{field}` (known: {})", known.join(", ")),
        ))
    };
    let choice = match spec {
        None => return Ok(None),
        Some(KvCacheSpec::Both(n)) => {
            let n = check("kv_cache", &Some(n.clone()))?;
            KvChoice { k: n.clone(), v: n }
        }
        // `{}`: both sides left out, the model's own (as each side alone).
        Some(KvCacheSpec::Sides(s)) => {
            KvChoice { k: check("kv_cache.k", &s.k)?, v: check("kv_cache.v", &s.v)? }
        }
    };
    Ok((choice != KvChoice::default()).then_some(choice))
}

/// The generation budget (see [`super::limits::budget`]).
pub use super::limits::budget;

pub fn gen_params(state: &State, sampling: SamplingParams, max_tokens: usize, stop: Vec<String>) -> GenParams {
    GenParams { sampling, max_tokens, stop, prefill_chunk: state.opts.prefill_chunk, ..GenParams::default() }
}

/// A generation in flight; dropping it cancels the generation.
pub struct Running {
    pub rx: mpsc::UnboundedReceiver<GenEvent>,
    cancel: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

pub fn worker_error(e: WorkerError) -> ApiError {
    match e {
        WorkerError::QueueFull(n) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, format!("the server is busy: {n} requests are waiting (--max-queue-depth); retry later"))
            .with_code("queue_full"),
        WorkerError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"),
        WorkerError::BadRequest(m) => ApiError::bad_request("prompt", m),
        WorkerError::BadField { field, message } => ApiError::bad_request(field, message),
        WorkerError::Internal(m) => ApiError::internal(m),
    }
}

pub fn start(
    state: &State,
    model: Arc<ModelEntry>,
    prompt: Vec<u32>,
    params: GenParams,
    hook: Option<Box<dyn LogitsHook>>,
    keep_alive: Option<KeepAlive>,
) -> Result<Running, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    state
        .worker
        .submit(GenRequest { model, prompt, params, hook, cancel: cancel.clone(), keep_alive, events: tx })
        .map_err(worker_error)?;
    Ok(Running { rx, cancel })
}

/// A finished generation.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Per token, when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<Finish>,
}

impl Collected {
    pub fn finish(&self) -> &Finish {
        self.finish.as_ref().expect("finished")
    }
}

pub async fn collect(mut run: Running) -> Result<Collected, ApiError> {
    let mut c = Collected::default();
    while let Some(ev) = run.rx.recv().await {
        match ev {
            GenEvent::Started => {}
            GenEvent::Token { id, text, logprob } => {
                c.tokens.push(id);
                c.text.push_str(&text);
                if let Some(l) = logprob {
                    c.logprobs.push(l);
                }
            }
            GenEvent::Text(t) => c.text.push_str(&t),
            GenEvent::Done(f) => {
                c.finish = Some(f);
                return Ok(c);
            }
            GenEvent::Error(e) => return Err(worker_error(e)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// One piece of a chat answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    Reasoning(String),
    ToolStart { index: usize, id: String, name: String },
    ToolArgs { index: usize, delta: String },
    ToolEnd { index: usize },
}

/// Splits thinking from answer text, streaming: returns (thinking, answer)
/// newly known. Adapted from `api::reasoning`.
pub trait ReasoningSplit: Send {
    fn feed(&mut self, text: &str) -> (String, String);
    fn finish(&mut self) -> (String, String);
}

/// Splits generated text into thinking, answer and tool calls.
pub struct Splitter {
    reasoning: Option<Box<dyn ReasoningSplit>>,
    tools: Option<Box<dyn ToolParser + Send>>,
}

impl Splitter {
    pub fn new(reasoning: Option<Box<dyn ReasoningSplit>>, tools: Option<Box<dyn ToolParser + Send>>) -> Self {
        Self { reasoning, tools }
    }

    pub fn feed(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let answer = match &mut self.reasoning {
            Some(r) => {
                let (thinking, answer) = r.feed(text);
                if !thinking.is_empty() {
                    out.push(Piece::Reasoning(thinking));
                }
                answer
            }
            None => text.to_string(),
        };
        self.answer(&answer, false, &mut out);
        out
    }

    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let answer = match &mut self.reasoning {
            Some(r) => {
                let (thinking, answer) = r.finish();
                if !thinking.is_empty() {
                    out.push(Piece::Reasoning(thinking));
                }
                answer
            }
            None => String::new(),
        };
        self.answer(&answer, true, &mut out);
        out
    }

    fn answer(&mut self, text: &str, last: bool, out: &mut Vec<Piece>) {
        match &mut self.tools {
            Some(p) => {
                let mut evs = if text.is_empty() { Vec::new() } else { p.feed(text) };
                if last {
                    evs.extend(p.finish());
                }
                for e in evs {
                    out.push(match e {
                        ToolEvent::Text(t) => Piece::Content(t),
                        ToolEvent::CallStart { index, id, name } => Piece::ToolStart { index, id, name },
                        ToolEvent::CallArgs { index, delta } => Piece::ToolArgs { index, delta },
                        ToolEvent::CallEnd { index } => Piece::ToolEnd { index },
                    });
                }
            }
            None => {
                if !text.is_empty() {
                    out.push(Piece::Content(text.to_string()))
                }
            }
        }
    }
}

/// A finished tool call.
#[derive(Debug, Clone, Default)]
pub struct ToolCallOut {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Everything a non-streamed chat answer holds, from pieces.
#[derive(Debug, Default)]
pub struct Assembled {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCallOut>,
}

impl Assembled {
    pub fn push(&mut self, p: Piece) {
        match p {
            Piece::Content(t) => self.content.push_str(&t),
            Piece::Reasoning(t) => self.reasoning.push_str(&t),
            Piece::ToolStart { index, id, name } => {
                if self.tool_calls.len() <= index {
                    self.tool_calls.resize(index + 1, ToolCallOut::default());
                }
                self.tool_calls[index].id = id;
                self.tool_calls[index].name = name;
            }
            Piece::ToolArgs { index, delta } => {
                if let Some(c) = self.tool_calls.get_mut(index) {
                    c.arguments.push_str(&delta);
                }
            }
            Piece::ToolEnd { .. } => {}
        }
    }
}

/// The chat template's source text (to pick the tool-call format).
pub fn template_source(dir: &std::path::Path) -> String {
    if let Ok(s) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return s;
    }
    for f in ["chat_template.json", "tokenizer_config.json"] {
        if let Ok(t) = std::fs::read_to_string(dir.join(f)) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                match v.get("chat_template") {
                    Some(serde_json::Value::String(s)) => return s.clone(),
                    Some(serde_json::Value::Array(a)) => {
                        return a.iter().filter_map(|x| x.get("template").and_then(|t| t.as_str())).collect::<Vec<_>>().join("\n")
                    }
                    _ => {}
                }
            }
        }
    }
    String::new()
}

/// Runs blocking CPU work (tokenizing, templating) off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

/// The most draft tokens a request's `num_draft_tokens` (rmlx extension) may ask for.
pub const MAX_DRAFT_TOKENS: u32 = 32;

/// `draft_kind` (rmlx extension: the drafter a request drafts with) -> the
/// engine's; a 400 naming the field and the model's drafters when the kind
/// is unknown or not one the model was served with. Absent: the model's
/// default (its first drafter), named, so that a default the load left out
/// is not replaced by the next drafter.
pub fn draft_kind(entry: &ModelEntry, v: Option<&str>) -> Result<Option<DraftKind>, ApiError> {
    let Some(name) = v else { return Ok(entry.draft.as_ref().map(|d| d.kind)) };
    let served: Vec<String> = entry.drafters().map(|d| kind_label(d.kind)).collect();
    let has = match served.as_slice() {
        [] => format!("the model `{}` is served without a drafter", entry.id),
        s => format!("the model `{}` drafts with: {}", entry.id, s.join(", ")),
    };
    match DraftKind::parse(name) {
        Ok(k) if entry.drafters().any(|d| d.kind == k) => Ok(Some(k)),
        Ok(_) => Err(ApiError::bad_request("draft_kind", format!("`draft_kind` {name:?} is not a drafter of this model: {has}"))),
        Err(_) => Err(ApiError::bad_request(
            "draft_kind",
            format!("unknown `draft_kind` {name:?} (the kinds are {}); {has}", DraftKind::NAMES.join(", ")),
        )),
    }
}

/// `num_draft_tokens` (rmlx extension: speculative decoding's draft tokens
/// per round at first; 0 turns it off) -> the engine's; a 400 naming the
/// field past `MAX_DRAFT_TOKENS`.
pub fn num_draft_tokens(v: Option<u32>) -> Result<Option<usize>, ApiError> {
    match v {
        Some(k) if k > MAX_DRAFT_TOKENS => Err(ApiError::bad_request(
            "num_draft_tokens",
            format!("`num_draft_tokens` must be between 0 and {MAX_DRAFT_TOKENS} (0 turns speculative decoding off), got {k}"),
        )),
        v => Ok(v.map(|k| k as usize)),
    }
}
