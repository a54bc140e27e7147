//! POST /v1/completions (OpenAI, legacy text completions).
use super::chat::data;
use super::errors::{ApiError, OaiResult, OpenAIError};
use super::generation as g;
use super::types::openai::*;
use super::types::{ApiJson, JsonOrStream, Sse};
use super::{State, Tag};
use crate::engine::worker::{FinishReason, GenEvent, GenParams, KeepAlive, ModelEntry, TokenLogprob as EngineLogprob};
use poem::web::sse::Event;
use poem_openapi::OpenApi;
use std::collections::HashMap;
use std::sync::Arc;

pub struct CompletionsApi(pub State);

#[OpenApi]
impl CompletionsApi {
    /// Create a completion
    ///
    /// OpenAI's (legacy) completions. `prompt` is a string, an array of
    /// strings, an array of token ids, or an array of those (one choice per
    /// prompt, in order). Strings are tokenized with the model's special
    /// tokens (BOS); token ids are used exactly as given. `echo` puts the
    /// prompt before the completion; `logprobs: N` returns each token's
    /// log-probability and the N most likely alternatives.
    #[oai(path = "/v1/completions", method = "post", operation_id = "createCompletion", tag = "Tag::OpenAI")]
    async fn create(&self, body: ApiJson<CompletionRequest>) -> OaiResult<JsonOrStream<Completion, Completion>> {
        create(self.0.clone(), body.0).await.map_err(OpenAIError::from)
    }
}

struct Job {
    entry: Arc<ModelEntry>,
    prompts: Vec<Vec<u32>>,
    params: Vec<GenParams>,
    echo: bool,
    keep_alive: Option<KeepAlive>,
    logprobs: bool,
    top_n: usize,
    /// `response_format`: each prompt's generation gets its own constraint.
    format: Option<ResponseFormat>,
}

/// Starts prompt `i`'s generation, with its `response_format` constraint
/// (compiled once per model and format, cached).
async fn start(state: &State, job: &Job, i: usize) -> Result<g::Running, ApiError> {
    let spec = super::constraint_adapter::HookSpec { format: job.format.as_ref(), max_tokens: job.params[i].max_tokens, ..Default::default() };
    let hook = super::constraint_adapter::hook(&job.entry, spec).await?;
    g::start(state, job.entry.clone(), job.prompts[i].clone(), job.params[i].clone(), hook, job.keep_alive)
}

fn token_ids(v: &[i64], field: &str) -> Result<Vec<u32>, ApiError> {
    if v.is_empty() {
        return Err(ApiError::bad_request(field, format!("`{field}` is empty")));
    }
    v.iter()
        .map(|&t| u32::try_from(t).map_err(|_| ApiError::bad_request(field, format!("`{field}` holds an invalid token id {t}"))))
        .collect()
}

async fn prepare(state: &State, req: &CompletionRequest) -> Result<Job, ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n", "only `n: 1` is supported"));
    }
    if req.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("best_of", "only `best_of: 1` is supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix", "`suffix` is not supported"));
    }
    if req.logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::bad_request("logprobs", "`logprobs` must be between 0 and 20"));
    }
    if req.max_tokens == Some(0) && req.echo != Some(true) {
        return Err(ApiError::bad_request("max_tokens", "`max_tokens` must be at least 1"));
    }
    let stop = super::limits::stops(req.stop.clone().map(StopSpec::into_vec).unwrap_or_default(), super::limits::MAX_STOP, "stop")?;
    let entry = state.generator(&req.model)?;
    // Every field is checked before the prompt is tokenized.
    let sampling = g::sampling(
        state,
        &g::SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            logit_bias: req.logit_bias.clone(),
            seed: req.seed,
            max_temperature: 2.0,
        },
        entry.vocab_size,
    )?;
    let keep_alive = g::keep_alive(&req.keep_alive)?;
    let kv = g::kv_choice(state, &req.kv_cache)?;
    let num_draft_tokens = g::num_draft_tokens(req.num_draft_tokens)?;
    let draft_kind = g::draft_kind(&entry, req.draft_kind.as_deref())?;
    let count = match &req.prompt {
        PromptSpec::Texts(v) => v.len(),
        PromptSpec::TokenLists(v) => v.len(),
        _ => 1,
    };
    if count > super::limits::MAX_PROMPTS {
        return Err(ApiError::bad_request("prompt", format!("`prompt` holds {count} prompts; at most {} are allowed", super::limits::MAX_PROMPTS)));
    }
    let longest = match &req.prompt {
        PromptSpec::Text(s) => s.len(),
        PromptSpec::Texts(v) => v.iter().map(String::len).max().unwrap_or(0),
        _ => 0,
    };
    super::limits::check_prompt_bytes(&entry, longest, "prompt")?;
    let prompt = req.prompt.clone();
    let e2 = entry.clone();
    let prompts: Vec<Vec<u32>> = g::blocking(move || {
        // The tokenizer is read on first use: here, off the async threads,
        // also for token-id prompts (the answer's text needs it).
        let _ = e2.text();
        let encode = |s: &str| -> Result<Vec<u32>, ApiError> {
            let text = e2.text().map_err(|e| ApiError::internal(format!("{e:#}")))?;
            let tok = text.tokenizer.as_ref().ok_or_else(|| {
                ApiError::bad_request("prompt", format!("model `{}` has no tokenizer: give the prompt as token ids", e2.id))
            })?;
            let ids = tok.encode(s, true).map_err(|e| ApiError::internal(format!("{e:#}")))?;
            if ids.is_empty() {
                return Err(ApiError::bad_request("prompt", "the prompt is empty"));
            }
            Ok(ids)
        };
        match &prompt {
            PromptSpec::Text(s) => Ok(vec![encode(s)?]),
            PromptSpec::Texts(v) if v.is_empty() => Err(ApiError::bad_request("prompt", "`prompt` is empty")),
            PromptSpec::Texts(v) => v.iter().map(|s| encode(s)).collect(),
            PromptSpec::Tokens(v) => Ok(vec![token_ids(v, "prompt")?]),
            PromptSpec::TokenLists(v) if v.is_empty() => Err(ApiError::bad_request("prompt", "`prompt` is empty")),
            PromptSpec::TokenLists(v) => v.iter().enumerate().map(|(i, p)| token_ids(p, &format!("prompt[{i}]"))).collect(),
        }
    })
    .await?;
    if let Some(vocab) = entry.vocab_size {
        for (i, p) in prompts.iter().enumerate() {
            if let Some(bad) = p.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::bad_request("prompt", format!("prompt {i}: token id {bad} is out of range for a vocabulary of {vocab}")));
            }
        }
    }
    let mut params = Vec::new();
    for p in &prompts {
        let max = g::budget(&entry, p.len(), req.max_tokens.map(|v| v as usize), 16, "prompt", "max_tokens")?;
        let mut gp = g::gen_params(state, sampling.clone(), max, stop.clone());
        gp.logprobs = req.logprobs.map(|n| n as usize);
        gp.kv = kv.clone();
        gp.num_draft_tokens = num_draft_tokens;
        gp.draft_kind = draft_kind;
        params.push(gp);
    }
    Ok(Job {
        entry,
        prompts,
        params,
        echo: req.echo == Some(true),
        keep_alive,
        logprobs: req.logprobs.is_some(),
        top_n: req.logprobs.unwrap_or(0) as usize,
        format: req.response_format.clone(),
    })
}

/// One prompt token's score: its log-probability given the tokens before it
/// and the `top` most likely tokens there, (id, log-probability).
type Score = crate::engine::score::TokenScore;

/// Each prompt token's score (None for the first, which has no context):
/// one teacher-forced forward over the prompt in the engine
/// (engine/score.rs), under the model's own distribution (the request's
/// sampling settings do not apply to the prompt).
async fn score_prompt(state: &State, job: &Job, prompt: &[u32], top_n: usize) -> Result<Vec<Option<Score>>, ApiError> {
    state.worker.score(job.entry.clone(), prompt.to_vec(), top_n, job.keep_alive).await.map_err(g::worker_error)
}

fn token_str(entry: &ModelEntry, id: u32, text: &str) -> String {
    let has_tok = entry.text().map(|t| t.tokenizer.is_some()).unwrap_or(false);
    if has_tok {
        text.to_string()
    } else {
        format!("token_id:{id}")
    }
}

/// Accumulates one choice's logprobs.
#[derive(Default)]
struct Lp {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top: Vec<Option<HashMap<String, f32>>>,
    offsets: Vec<u32>,
    chars: u32,
}

impl Lp {
    fn push_prompt(&mut self, entry: &ModelEntry, ids: &[u32], scores: &[Option<Score>]) {
        let text = entry.text().ok();
        let tok_str = |id: u32| match text.as_ref().and_then(|t| t.tokenizer.as_ref()) {
            Some(t) => t.decode(&[id], false).unwrap_or_default(),
            None => format!("token_id:{id}"),
        };
        for (i, &id) in ids.iter().enumerate() {
            let s = tok_str(id);
            self.offsets.push(self.chars);
            self.chars += s.chars().count() as u32;
            self.tokens.push(s);
            let score = scores.get(i).and_then(|x| x.as_ref());
            self.token_logprobs.push(score.map(|x| x.0));
            self.top.push(score.map(|(_, top)| top.iter().map(|&(tid, lp)| (tok_str(tid), lp)).collect()));
        }
    }
    fn push(&mut self, entry: &ModelEntry, id: u32, l: &EngineLogprob) {
        let s = token_str(entry, id, &l.text);
        self.offsets.push(self.chars);
        self.chars += s.chars().count() as u32;
        self.tokens.push(s);
        self.token_logprobs.push(Some(l.logprob));
        self.top.push(Some(l.top.iter().map(|(tid, t, lp)| (token_str(entry, *tid, t), *lp)).collect()));
    }
    fn take(&mut self) -> CompletionLogprobs {
        let out = CompletionLogprobs {
            tokens: std::mem::take(&mut self.tokens),
            token_logprobs: std::mem::take(&mut self.token_logprobs),
            top_logprobs: std::mem::take(&mut self.top),
            text_offset: std::mem::take(&mut self.offsets),
        };
        out
    }
}

fn reason(r: FinishReason) -> FinishReasonOai {
    match r {
        FinishReason::Length => FinishReasonOai::Length,
        _ => FinishReasonOai::Stop,
    }
}

fn echo_text(entry: &ModelEntry, ids: &[u32]) -> String {
    entry.text().ok().and_then(|t| t.tokenizer.as_ref().and_then(|tok| tok.decode(ids, false).ok())).unwrap_or_default()
}

async fn create(state: State, req: CompletionRequest) -> Result<JsonOrStream<Completion, Completion>, ApiError> {
    let job = prepare(&state, &req).await?;
    let id = g::new_id("cmpl-");
    let created = g::now();
    let model = job.entry.id.clone();
    let first = start(&state, &job, 0).await?;
    if req.stream == Some(true) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(JsonOrStream::Stream(stream(state, job, first, id, created, model, include_usage)));
    }
    let mut choices = Vec::new();
    let (mut pt, mut ct) = (0u32, 0u32);
    let mut spec = None;
    let mut run = Some(first);
    for (i, prompt) in job.prompts.iter().enumerate() {
        let r = match run.take() {
            Some(r) => r,
            None => start(&state, &job, i).await?,
        };
        let scores = if job.echo && job.logprobs { score_prompt(&state, &job, prompt, job.top_n).await? } else { Vec::new() };
        let c = g::collect(r).await?;
        let f = c.finish();
        pt += f.prompt_tokens as u32;
        ct += f.completion_tokens as u32;
        spec = add_speculation(spec, f.speculation);
        let mut lp = Lp::default();
        let mut text = String::new();
        if job.echo {
            text = echo_text(&job.entry, prompt);
            if job.logprobs {
                lp.push_prompt(&job.entry, prompt, &scores);
            }
        }
        text.push_str(&c.text);
        if job.logprobs {
            for (id, l) in c.tokens.iter().zip(&c.logprobs) {
                lp.push(&job.entry, *id, l);
            }
        }
        choices.push(CompletionChoice {
            text,
            index: i as u32,
            logprobs: job.logprobs.then(|| lp.take()),
            finish_reason: Some(reason(f.reason)),
            token_ids: Some(c.tokens.clone()),
        });
    }
    Ok(JsonOrStream::Json(Completion {
        id,
        object: TextCompletionObject::TextCompletion,
        created,
        model,
        choices,
        usage: Some(Usage::new(pt, ct, spec)),
        system_fingerprint: None,
    }))
}

fn stream(state: State, job: Job, first: g::Running, id: String, created: u64, model: String, include_usage: bool) -> Sse<Completion> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let obj = |choices: Vec<CompletionChoice>, usage: Option<Usage>| Completion {
            id: id.clone(),
            object: TextCompletionObject::TextCompletion,
            created,
            model: model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        };
        let (mut pt, mut ct) = (0u32, 0u32);
        let mut spec = None;
        let mut run = Some(first);
        for (i, prompt) in job.prompts.iter().enumerate() {
            let mut r = match run.take() {
                Some(r) => r,
                None => match start(&state, &job, i).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Event::message(e.json().to_string())).await;
                        break;
                    }
                },
            };
            if job.echo {
                let mut lp = Lp::default();
                if job.logprobs {
                    let scores = match score_prompt(&state, &job, prompt, job.top_n).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Event::message(e.json().to_string())).await;
                            let _ = tx.send(Event::message("[DONE]")).await;
                            return;
                        }
                    };
                    lp.push_prompt(&job.entry, prompt, &scores);
                }
                let c = CompletionChoice {
                    text: echo_text(&job.entry, prompt),
                    index: i as u32,
                    logprobs: job.logprobs.then(|| lp.take()),
                    finish_reason: None,
                    token_ids: None,
                };
                if tx.send(data(&obj(vec![c], None))).await.is_err() {
                    return;
                }
            }
            let mut lp = Lp::default();
            let finish = loop {
                let Some(ev) = r.rx.recv().await else { break Err(ApiError::internal("the engine dropped the request")) };
                let c = match ev {
                    GenEvent::Started => continue,
                    GenEvent::Token { id, text, logprob } => {
                        let logprobs = match (&logprob, job.logprobs) {
                            (Some(l), true) => {
                                lp.push(&job.entry, id, l);
                                Some(lp.take())
                            }
                            _ => None,
                        };
                        CompletionChoice { text, index: i as u32, logprobs, finish_reason: None, token_ids: Some(vec![id]) }
                    }
                    GenEvent::Text(text) => CompletionChoice { text, index: i as u32, logprobs: None, finish_reason: None, token_ids: None },
                    GenEvent::Done(f) => break Ok(f),
                    GenEvent::Error(e) => break Err(g::worker_error(e)),
                };
                if tx.send(data(&obj(vec![c], None))).await.is_err() {
                    return;
                }
            };
            match finish {
                Ok(f) => {
                    pt += f.prompt_tokens as u32;
                    ct += f.completion_tokens as u32;
                    spec = add_speculation(spec, f.speculation);
                    let c = CompletionChoice {
                        text: String::new(),
                        index: i as u32,
                        logprobs: None,
                        finish_reason: Some(reason(f.reason)),
                        token_ids: None,
                    };
                    if tx.send(data(&obj(vec![c], None))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Event::message(e.json().to_string())).await;
                    let _ = tx.send(Event::message("[DONE]")).await;
                    return;
                }
            }
        }
        if include_usage {
            let _ = tx.send(data(&obj(vec![], Some(Usage::new(pt, ct, spec))))).await;
        }
        let _ = tx.send(Event::message("[DONE]")).await;
    });
    Sse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
