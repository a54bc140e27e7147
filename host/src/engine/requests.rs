//! What the engine's clients send and get back: a generation request and its
//! parameters, the events it streams, how it ends, and the answers of the
//! other jobs (unload, /health). The engine thread and its handle are in
//! worker.rs, which re-exports all of these.
use super::sampler::SamplingParams;
use super::catalog::ModelEntry;
pub use super::kv_family::KvChoice;
use anyhow::Result;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a model stays loaded after a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeepAlive {
    /// Unload right after the request.
    Unload,
    For(Duration),
    Forever,
}

/// Per-request hook on the processed logits, for constrained decoding: it
/// masks (sets to -inf) what may not come next, and is told what came.
pub trait LogitsHook: Send {
    fn apply(&mut self, logits: &mut [f32]) -> Result<()>;
    fn commit(&mut self, token: u32) -> Result<()>;
    /// True when nothing more may be generated (ends with finish "stop").
    fn is_finished(&self) -> bool {
        false
    }
    /// An independent copy of the hook's state, for speculative decoding
    /// (engine/scheduler/spec/): the copy masks the draft positions and is
    /// committed along the drafts, ahead of the sequence, then dropped; the
    /// hook itself only ever sees the tokens kept. None (the default): the
    /// hook cannot be copied, and its request does not speculate.
    fn fork(&self) -> Option<Box<dyn LogitsHook>> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct GenParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Strings that end generation; never part of the text.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (besides the model's EOS ids).
    pub stop_ids: Vec<u32>,
    /// Generate past EOS ids.
    pub ignore_eos: bool,
    /// Some(n): logprob of each token and the n most likely alternatives.
    pub logprobs: Option<usize>,
    pub prefill_chunk: usize,
    /// Leave special tokens out of the text (keep them for tool-call parsing).
    pub skip_special: bool,
    /// The KV-cache families of this request (the API's `kv_cache`); None,
    /// or a side left None, takes the model's own (`LoadedModel::kv`). Each
    /// family pair runs in its own lane of the model (scheduler.rs).
    pub kv: Option<KvChoice>,
    /// Speculative decoding (the API's `num_draft_tokens`): draft tokens per
    /// round at first for this request; Some(0) turns it off. None: the
    /// model's drafter's own (`--num-draft-tokens`), when it has one.
    pub num_draft_tokens: Option<usize>,
    /// The drafter it drafts with (the API's `draft_kind`): one of the
    /// model's drafters, by kind; None: the model's first (its default).
    pub draft_kind: Option<super::speculative::DraftKind>,
    /// The prompt's images (issue 15): pixels, MediaHash and placeholder
    /// span of each; prefill lends their features (engine/media.rs).
    pub media: Option<Arc<super::media::PromptMedia>>,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            stop_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prefill_chunk: 512,
            skip_special: true,
            kv: None,
            num_draft_tokens: None,
            draft_kind: None,
            media: None,
        }
    }
}

pub struct GenRequest {
    pub model: Arc<ModelEntry>,
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub hook: Option<Box<dyn LogitsHook>>,
    pub cancel: Arc<AtomicBool>,
    pub keep_alive: Option<KeepAlive>,
    pub events: mpsc::UnboundedSender<GenEvent>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The token as text (special tokens included; empty without a tokenizer).
    pub text: String,
    /// (id, text, logprob), most likely first.
    pub top: Vec<(u32, String, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS id (or the logits hook finished).
    Stop,
    /// A stop string.
    StopString,
    /// max_tokens, or the context is full.
    Length,
    /// The client went away or cancelled.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    /// The stop string that matched.
    pub stop: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_secs: f64,
    pub generation_secs: f64,
    /// With speculative decoding: (draft tokens proposed, draft tokens kept).
    pub speculation: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
pub enum GenEvent {
    /// The model is loaded and the prompt is being processed.
    Started,
    /// One generated token: `text` is the text now safe to show (it may lag
    /// behind the tokens while a stop string or a UTF-8 sequence is open).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Trailing text with no token of its own (flushed at the end).
    Text(String),
    Done(Finish),
    Error(WorkerError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    BadRequest(String),
    /// A request field the engine refuses (`field`, then why): the API
    /// answers 400 naming the field.
    #[error("{message}")]
    BadField { field: String, message: String },
    #[error("{0}")]
    Internal(String),
}

/// What /v1/models shows about a model's state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedInfo {
    pub id: String,
    pub loaded_at: u64,
    /// Seconds since the epoch when it will be unloaded (None: never).
    pub expires_at: Option<u64>,
}

/// What an unload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unloaded {
    Unloaded,
    /// It was not loaded.
    NotLoaded,
    /// Requests use it (running, or waiting for it): nothing was done.
    Busy { requests: usize },
}

/// Where `Worker::inject_panic` makes the engine thread panic (tests only).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub enum EnginePanic {
    /// In the loop, outside any step (the loop restarts).
    Loop,
    /// In this model's next step.
    Step(String),
}

/// The engine thread's state, as /health reports it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineHealth {
    /// Why the engine cannot serve (None while it can).
    pub down: Option<String>,
    /// Times the engine loop restarted after a panic.
    pub restarts: u64,
    /// The last panic's message (a step's or the loop's).
    pub last_panic: Option<String>,
}
