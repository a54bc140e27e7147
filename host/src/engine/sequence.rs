//! One request while the scheduler runs it: its tokens, its KV cache, and
//! everything that turns logits into streamed text (sampling with an optional
//! logits hook, incremental detokenizing, stop strings held back across token
//! boundaries, EOS ids, max tokens, logprobs, cancellation).
use super::sampler::{Sampled, Sampler};
use super::scheduler::LaneId;
use super::stop::StopMatcher;
use super::worker::{
    Finish, FinishReason, GenEvent, GenParams, GenRequest, KeepAlive, LogitsHook, ModelEntry,
    TokenLogprob, WorkerError,
};
use crate::model::text::TextSide;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// What one set of logits did to a sequence.
pub enum Outcome {
    /// A token was accepted; feed it next.
    Continue,
    Done(Result<Finish, WorkerError>),
}

pub struct Sequence {
    pub id: u64,
    pub entry: Arc<ModelEntry>,
    pub keep_alive: Option<KeepAlive>,
    pub params: GenParams,
    /// The lane it runs in (its model and KV families), set at admission.
    pub lane: LaneId,
    /// Prompt then accepted generated tokens. While decoding, all but the
    /// last are in the KV cache; the last is the next input.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Block table: the pool blocks holding this sequence's KV, in order
    /// (shared prefix-cache blocks first when it had a hit).
    pub table: Vec<u32>,
    /// Tokens in the KV cache (written through `table`).
    pub kv_len: usize,
    /// Row of the scheduler's pending device tokens (`Scheduler::pending_tokens`)
    /// that holds this sequence's next token, not read by the host yet (pipelined greedy
    /// decode). Its KV then already holds every token in `tokens`.
    pub pending_row: Option<usize>,
    /// Block hashes this sequence already put in the prefix cache.
    pub cached_upto: usize,
    /// Its recurrent state after the `kv_len` tokens in its KV (models with
    /// state layers; recurrent.rs): dropped with its blocks.
    pub state: super::recurrent::RowState,
    /// Its state at the last block boundary it crossed (blocks in its KV
    /// then, state), for the prefix cache to keep with that block.
    pub snapshot: Option<(usize, super::recurrent::RowState)>,
    /// (tag, row) while `state` is row `row` of the lane's last batch state
    /// of that tag (`recurrent::BatchState`), unchanged since; else None.
    pub state_tag: Option<(u64, usize)>,
    /// Per prompt image, its media features [T, hidden] once encoded.
    pub media_features: Vec<Option<mlx_rs::Array>>,
    /// Its prompt's multimodal-RoPE positions (mrope.rs), once laid out;
    /// None for models without media positions and text-only prompts.
    pub mrope: Option<Arc<super::mrope::MropeLayout>>,
    /// Whether `mrope` was decided (laid out, or found not to apply).
    pub mrope_done: bool,
    /// Speculative decoding (scheduler/spec.rs): its draft KV and draft
    /// length while it speculates.
    pub spec: Option<Box<super::speculative::serve::SpecRow>>,
    /// Whether its model speculated for it (the usage then reports the counts).
    pub spec_on: bool,
    /// Draft tokens proposed for it, and kept.
    pub drafted: usize,
    pub accepted: usize,
    pub preempted: u32,
    pub started_sent: bool,
    hook: Option<Box<dyn LogitsHook>>,
    /// Its hook (if any) can be forked (`LogitsHook::fork`): it may speculate.
    hook_forks: bool,
    cancel: Arc<AtomicBool>,
    pub events: mpsc::UnboundedSender<GenEvent>,
    text: Option<Arc<TextSide>>,
    eos: Vec<u32>,
    decoder: Option<crate::model::tokenizer::StreamDecoder>,
    stops: StopMatcher,
    sampler: Sampler,
    /// Completion tokens so far.
    pub n: usize,
    max_ctx: usize,
    pub t_arrive: Instant,
    pub t_first: Option<Instant>,
    pub prompt_secs: f64,
    /// Keeps the worker's open-request count up while the sequence lives.
    pub _guard: Option<Box<dyn Send>>,
}

impl Sequence {
    pub fn new(id: u64, req: GenRequest, guard: Option<Box<dyn Send>>) -> Self {
        let GenRequest {
            model,
            prompt,
            params,
            hook,
            cancel,
            keep_alive,
            events,
        } = req;
        let mut sampler = Sampler::with_params(params.sampling.clone());
        sampler.set_prompt(&prompt);
        let stops = StopMatcher {
            stops: params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            held: String::new(),
        };
        let max_ctx = model.context_length.unwrap_or(usize::MAX);
        let hook_forks = hook.as_ref().is_none_or(|h| fork_of(&**h).is_some());
        Self {
            id,
            entry: model,
            keep_alive,
            lane: LaneId::default(),
            prompt_len: prompt.len(),
            tokens: prompt,
            table: Vec::new(),
            kv_len: 0,
            pending_row: None,
            cached_upto: 0,
            state: Default::default(),
            snapshot: None,
            state_tag: None,
            media_features: Vec::new(),
            mrope: None,
            mrope_done: false,
            spec: None,
            spec_on: false,
            drafted: 0,
            accepted: 0,
            preempted: 0,
            started_sent: false,
            hook,
            hook_forks,
            cancel,
            events,
            text: None,
            eos: Vec::new(),
            decoder: None,
            stops,
            sampler,
            n: 0,
            max_ctx,
            t_arrive: Instant::now(),
            t_first: None,
            prompt_secs: 0.0,
            _guard: guard,
            params,
        }
    }

    /// Checks the request against the model and loads its text side; an Err
    /// is the request's error.
    pub fn validate(&mut self, vocab: usize) -> Result<(), WorkerError> {
        let text = self
            .entry
            .text()
            .map_err(|e| WorkerError::Internal(format!("{e:#}")))?;
        if let Some(bad) = self.tokens[..self.prompt_len]
            .iter()
            .find(|&&t| t as usize >= vocab)
        {
            return Err(WorkerError::BadRequest(format!(
                "prompt token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        if self.prompt_len == 0 {
            return Err(WorkerError::BadRequest("the prompt is empty".into()));
        }
        let mut eos: Vec<u32> = if self.params.ignore_eos {
            Vec::new()
        } else {
            text.eos_ids.clone()
        };
        eos.extend(&self.params.stop_ids);
        self.eos = eos;
        self.decoder = text
            .tokenizer
            .as_ref()
            .map(|t| t.stream_decoder(self.params.skip_special));
        self.text = Some(text);
        Ok(())
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// Tokens in the KV cache.
    pub fn cached(&self) -> usize {
        self.kv_len
    }

    /// Tokens still to prefill before the sequence can join decode steps
    /// (everything but the last token, which the decode step feeds).
    pub fn to_prefill(&self) -> usize {
        (self.tokens.len() - 1).saturating_sub(self.cached())
    }

    pub fn finish(&self, reason: FinishReason, stop: Option<String>) -> Finish {
        Finish {
            reason,
            stop,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.n,
            prompt_secs: self.prompt_secs,
            generation_secs: self
                .t_first
                .map(|t| t.elapsed().as_secs_f64())
                .unwrap_or(0.0),
            speculation: self.spec_on.then_some((self.drafted, self.accepted)),
        }
    }

    /// Whether a drafter may propose tokens for it: the request did not
    /// turn speculation off, and its logits hook, if any (constrained
    /// decoding, thinking budgets), can be forked to mask draft positions
    /// ahead of the sequence (`LogitsHook::fork`; every hook the API makes
    /// can). Logprobs come from the verifier's logits at each position.
    pub fn may_speculate(&self) -> bool {
        // A prompt with images does not: the draft model has no vision tower
        // and would read the placeholder ids as text (outside its vocabulary).
        self.hook_forks && self.params.num_draft_tokens != Some(0) && self.params.media.is_none()
    }

    /// Whether a logits hook constrains its tokens.
    pub fn has_hook(&self) -> bool {
        self.hook.is_some()
    }

    /// A copy of its hook's state to run ahead on draft tokens (None: no
    /// hook, or one that cannot be forked).
    pub fn fork_hook(&self) -> Option<Box<dyn LogitsHook>> {
        self.hook.as_ref().and_then(|h| fork_of(&**h))
    }

    /// The ids that end it (EOS and the request's stop ids; none with `ignore_eos`).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Its sampler (speculative acceptance processes positions ahead on a copy).
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Tokens it may still generate (max tokens, context).
    pub fn left(&self) -> usize {
        self.params.max_tokens.saturating_sub(self.n).min(self.max_ctx.saturating_sub(self.prompt_len + self.n))
    }

    /// True when no more tokens may be generated (checked before sampling,
    /// as the one-at-a-time loop did).
    pub fn at_length(&self) -> bool {
        self.n >= self.params.max_tokens || self.prompt_len + self.n >= self.max_ctx
    }

    /// Ends at max tokens / context: flushes held text.
    pub fn finish_length(&mut self) -> Finish {
        let (t, s) = flush_text(&mut self.decoder, &mut self.stops);
        send_text(&self.events, t);
        match s {
            Some(s) => self.finish(FinishReason::StopString, Some(s)),
            None => self.finish(FinishReason::Length, None),
        }
    }

    /// The logits that choose the next token (f32, one row of the vocabulary).
    pub fn on_logits(&mut self, mut logits: Vec<f32>) -> Outcome {
        if self.t_first.is_none() {
            self.prompt_secs = self.t_arrive.elapsed().as_secs_f64();
            self.t_first = Some(Instant::now());
        }
        guarded(|| self.sample(&mut logits))
    }

    /// True when the device's argmax is this sequence's next token (greedy,
    /// no penalty, no constraint, no logprobs; a `logit_bias` is added on the
    /// device, see `device_bias`): the engine then hands it the token with
    /// `on_token` instead of the logits.
    pub fn takes_device_token(&self) -> bool {
        self.sampler.is_device_greedy() && self.hook.is_none() && self.params.logprobs.is_none()
    }

    /// The `logit_bias` the device adds before its argmax (token, bias).
    pub fn device_bias(&self) -> &[(u32, f32)] {
        &self.sampler.params().logit_bias
    }

    /// The next token, chosen on the device (see `takes_device_token`).
    pub fn on_token(&mut self, token: u32) -> Outcome {
        self.on_sampled(Sampled { token, logprob: 0.0, top: Vec::new() })
    }

    /// The next token, chosen outside the sequence with its logprobs
    /// (speculative decoding: `sampler::logprobs` of the verifier's
    /// processed and masked logits at its position). The sequence's hook
    /// and sampler then see it as if it had sampled it.
    pub fn on_sampled(&mut self, sampled: Sampled) -> Outcome {
        if self.t_first.is_none() {
            self.prompt_secs = self.t_arrive.elapsed().as_secs_f64();
            self.t_first = Some(Instant::now());
        }
        if let Some(o) = self.before_sampling() {
            return o;
        }
        guarded(|| {
            self.sampler.accept(sampled.token);
            self.emit(sampled)
        })
    }

    /// Ends the sequence before sampling when it is at length or cancelled.
    fn before_sampling(&mut self) -> Option<Outcome> {
        if self.at_length() {
            return Some(Outcome::Done(Ok(self.finish_length())));
        }
        if self.cancelled() {
            return Some(Outcome::Done(
                Ok(self.finish(FinishReason::Cancelled, None)),
            ));
        }
        None
    }

    fn sample(&mut self, logits: &mut [f32]) -> Result<Outcome, WorkerError> {
        let internal = |e: anyhow::Error| WorkerError::Internal(format!("{e:#}"));
        if let Some(o) = self.before_sampling() {
            return Ok(o);
        }
        self.sampler.process(logits);
        if let Some(h) = self.hook.as_mut() {
            h.apply(logits).map_err(internal)?;
        }
        let sampled = self.sampler.sample_processed(logits, self.params.logprobs);
        self.emit(sampled)
    }

    /// Everything after the token is chosen: EOS, constraint commit, text,
    /// stop strings, the event to the client, length.
    fn emit(&mut self, sampled: Sampled) -> Result<Outcome, WorkerError> {
        let internal = |e: anyhow::Error| WorkerError::Internal(format!("{e:#}"));
        let Sampled {
            token,
            logprob,
            top,
        } = sampled;
        if self.eos.contains(&token) {
            let (t, s) = flush_text(&mut self.decoder, &mut self.stops);
            send_text(&self.events, t);
            return Ok(Outcome::Done(Ok(match s {
                Some(s) => self.finish(FinishReason::StopString, Some(s)),
                None => self.finish(FinishReason::Stop, None),
            })));
        }
        if let Some(h) = self.hook.as_mut() {
            h.commit(token).map_err(internal)?;
        }
        self.n += 1;
        self.tokens.push(token);
        let piece = match self.decoder.as_mut() {
            Some(d) => d.step(token).map_err(internal)?,
            None => String::new(),
        };
        let (safe, hit) = self.stops.push(&piece);
        let text = self.text.clone();
        let tok_text = |id: u32| -> String {
            match text.as_ref().and_then(|t| t.tokenizer.as_ref()) {
                Some(t) => t.decode(&[id], false).unwrap_or_default(),
                None => String::new(),
            }
        };
        let lp = self.params.logprobs.map(|_| TokenLogprob {
            logprob,
            text: tok_text(token),
            top: top.iter().map(|&(id, l)| (id, tok_text(id), l)).collect(),
        });
        if self
            .events
            .send(GenEvent::Token {
                id: token,
                text: safe,
                logprob: lp,
            })
            .is_err()
        {
            return Ok(Outcome::Done(
                Ok(self.finish(FinishReason::Cancelled, None)),
            ));
        }
        if let Some(s) = hit {
            return Ok(Outcome::Done(Ok(
                self.finish(FinishReason::StopString, Some(s))
            )));
        }
        if self.hook.as_ref().is_some_and(|h| h.is_finished()) {
            let (t, s) = flush_text(&mut self.decoder, &mut self.stops);
            send_text(&self.events, t);
            return Ok(Outcome::Done(Ok(match s {
                Some(s) => self.finish(FinishReason::StopString, Some(s)),
                None => self.finish(FinishReason::Stop, None),
            })));
        }
        if self.at_length() {
            // No forward for a token that is never followed.
            return Ok(Outcome::Done(Ok(self.finish_length())));
        }
        Ok(Outcome::Continue)
    }
}

/// Runs a sequence's own work on a token (its sampler, its logits hook, its
/// detokenizer): an error or a panic there ends this request only, with an
/// internal error, and the engine goes on with the others.
fn guarded(f: impl FnOnce() -> Result<Outcome, WorkerError>) -> Outcome {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome::Done(Err(e)),
        Err(p) => Outcome::Done(Err(WorkerError::Internal(format!(
            "internal error while sampling: {}",
            panic_message(&*p)
        )))),
    }
}

/// `hook.fork()`; a panic is None (the request then does not speculate).
fn fork_of(hook: &dyn LogitsHook) -> Option<Box<dyn LogitsHook>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook.fork())).ok().flatten()
}

/// The text a panic carried.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

fn flush_text(
    decoder: &mut Option<crate::model::tokenizer::StreamDecoder>,
    stops: &mut StopMatcher,
) -> (String, Option<String>) {
    let rest = decoder
        .as_mut()
        .and_then(|d| d.flush().ok())
        .unwrap_or_default();
    let (mut out, hit) = stops.push(&rest);
    if hit.is_none() {
        out.push_str(&stops.flush());
    }
    (out, hit)
}

fn send_text(events: &mpsc::UnboundedSender<GenEvent>, t: String) {
    if !t.is_empty() {
        let _ = events.send(GenEvent::Text(t));
    }
}
