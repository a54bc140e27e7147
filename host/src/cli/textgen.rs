//! One turn of text generation for `rmlx generate` and `rmlx chat`: the
//! sampling flags they share, and a driver that runs one sequence through
//! the server's own per-request logic (engine/sequence.rs: sampling with
//! every processor, EOS ids, stop strings held back across tokens,
//! incremental detokenizing, max tokens), streaming text as it comes.
//!
//! Greedy turns without stop strings decode through `engine::generate`
//! (pipelined, the compiled step where it applies: the fast path mlx-lm
//! compares with); the others feed host logits step by step (`Session`).
//! With a draft model every turn runs through `engine::speculative`.
use crate::config::Settings;
use crate::engine::sampler::SamplingParams;
use crate::engine::sequence::{Outcome, Sequence};
use crate::engine::worker::{Finish, FinishReason, GenEvent, GenParams, GenRequest, ModelEntry};
use crate::engine::speculative::{self, SpecOptions};
use crate::engine::{generate::generate, GenerateOptions, LoadedModel, Session};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Sampling and stopping, as mlx-lm names them.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// Most tokens to generate [default: 256, setting generate.max_tokens]
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy [default: 0, setting generate.temperature]
    #[arg(long = "temp", visible_alias = "temperature", value_name = "T", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass [default: 1 (off), setting generate.top_p]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens [default: 0 (off)]
    #[arg(long, value_name = "K", default_value_t = 0, hide_default_value = true)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one [default: 0 (off)]
    #[arg(long, value_name = "P", default_value_t = 0.0, hide_default_value = true, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalize tokens seen in the last --repetition-context-size tokens (>1 discourages repeats) [default: 1 (off)]
    #[arg(long, value_name = "F", default_value_t = 1.0, hide_default_value = true, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Tokens the repetition penalty looks back over
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub repetition_context_size: usize,
    /// Stop when the text contains this string (not printed); repeatable [default: none]
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Random seed: the same seed gives the same text [default: random]
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The request's parameters, flags over settings; checks the ranges.
    pub fn params(&self, settings: &Settings) -> Result<GenParams> {
        let g = &settings.generate;
        let temperature = self.temperature.unwrap_or(g.temperature);
        let top_p = self.top_p.unwrap_or(g.top_p);
        if !(temperature >= 0.0) {
            bail!("--temp must be >= 0, got {temperature}");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {top_p}");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!("--min-p must be in [0, 1], got {}", self.min_p);
        }
        if !(self.repetition_penalty > 0.0) {
            bail!("--repetition-penalty must be > 0, got {}", self.repetition_penalty);
        }
        let max_tokens = self.max_tokens.unwrap_or(g.max_tokens);
        if max_tokens == 0 {
            bail!("--max-tokens must be positive");
        }
        Ok(GenParams {
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k: self.top_k,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                repetition_context: self.repetition_context_size,
                seed: self.seed,
                ..SamplingParams::default()
            },
            max_tokens,
            stop: self.stop.clone(),
            prefill_chunk: g.prefill_chunk,
            ..GenParams::default()
        })
    }
}

/// Speculative decoding, as mlx-lm names its flags (docs/SPECULATIVE.md).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Speculative decoding")]
pub struct SpecArgs {
    /// A smaller model with the same tokenizer that drafts tokens for the model to verify; the output stays the model's own [default: none (no speculation)]
    #[arg(long, value_name = "DIR|REPO")]
    pub draft_model: Option<std::path::PathBuf>,
    /// Draft tokens per verifier forward at the start; the length then follows the measured acceptance (1 to 2K) [default: 3]
    #[arg(long, value_name = "K")]
    pub num_draft_tokens: Option<usize>,
    /// The drafter kind: `draft` (a separate draft model, --draft-model), `mtp` (the model's own multi-token-prediction head, from its checkpoint; Qwen3.5/3.6), `eagle3` (an Eagle-3 head, --draft-model its own directory) or `dflash` (a DFlash block-diffusion drafter, --draft-model its own directory; K defaults to its block size less one) [default: draft]
    #[arg(long, value_name = "KIND")]
    pub draft_kind: Option<String>,
}

/// A loaded draft model (or drafter head) and how many tokens it drafts
/// per round at first.
pub struct Drafter {
    pub model: LoadedModel,
    pub num_draft_tokens: usize,
    pub kind: speculative::DraftKind,
}

impl SpecArgs {
    /// Loads the draft model, when one is given, and checks it against `model`.
    pub fn load(&self, model: &Model, settings: &Settings) -> Result<Option<Drafter>> {
        let kind = self.draft_kind.as_deref().map(speculative::DraftKind::parse).transpose()?;
        if kind.is_none() && self.draft_model.is_none() {
            if self.num_draft_tokens.is_some() {
                bail!("--num-draft-tokens needs a drafter: --draft-model DIR, --draft-kind mtp, or --draft-kind eagle3|dflash --draft-model DIR");
            }
            return Ok(None);
        }
        let kind = kind.unwrap_or(speculative::DraftKind::Draft);
        let k = self.num_draft_tokens.unwrap_or(speculative::DEFAULT_DRAFT_TOKENS);
        if k == 0 {
            bail!("--num-draft-tokens must be at least 1");
        }
        let reg = super::registry(settings)?;
        let draft = match kind {
            speculative::DraftKind::Mtp => {
                if self.draft_model.is_some() {
                    bail!("--draft-kind mtp reads the head from the model's own checkpoint: leave out --draft-model");
                }
                let path = model.loaded.dir.path.clone();
                let policy = crate::model::policy::resolve(&crate::model::ModelDir::open(&path)?)?.policy;
                LoadedModel::load_head(&path, "mtp", &reg, policy).context("loading the multi-token-prediction head")?
            }
            speculative::DraftKind::Eagle3 => {
                let Some(spec) = &self.draft_model else {
                    bail!("--draft-kind eagle3 needs --draft-model DIR: the Eagle-3 head's own directory");
                };
                let sidecar = crate::hub::resolve_dir(spec)?;
                let path = model.loaded.dir.path.clone();
                let policy = crate::model::policy::resolve(&crate::model::ModelDir::open(&path)?)?.policy;
                LoadedModel::load_head_from(&sidecar, &path, "eagle3", &reg, policy)
                    .with_context(|| format!("loading the Eagle-3 head {}", spec.display()))?
            }
            speculative::DraftKind::Dflash => {
                let Some(spec) = &self.draft_model else {
                    bail!("--draft-kind dflash needs --draft-model DIR: the DFlash drafter's own directory");
                };
                let sidecar = crate::hub::resolve_dir(spec)?;
                let path = model.loaded.dir.path.clone();
                let policy = crate::model::policy::resolve(&crate::model::ModelDir::open(&path)?)?.policy;
                let head = LoadedModel::load_head_from(&sidecar, &path, "dflash", &reg, policy)
                    .with_context(|| format!("loading the DFlash drafter {}", spec.display()))?;
                let k = self.num_draft_tokens.unwrap_or_else(|| speculative::dflash::default_draft_tokens(&head));
                return Ok(Some(Drafter { model: head, num_draft_tokens: k, kind }));
            }
            speculative::DraftKind::Draft => {
                let Some(spec) = &self.draft_model else {
                    bail!("--draft-kind draft needs --draft-model DIR");
                };
                let dir = crate::hub::resolve_dir(spec)?;
                let draft = LoadedModel::load(&dir, &reg).with_context(|| format!("loading the draft model {}", spec.display()))?;
                speculative::check_pair(&model.loaded, &draft)?;
                draft
            }
        };
        Ok(Some(Drafter { model: draft, num_draft_tokens: k, kind }))
    }
}

/// A loaded model with its catalog entry (tokenizer, template, EOS ids).
pub struct Model {
    pub entry: Arc<ModelEntry>,
    pub loaded: LoadedModel,
}

impl Model {
    /// `spec`: a directory or a Hugging Face repo id.
    pub fn load(spec: &std::path::Path, settings: &Settings) -> Result<Self> {
        let reg = super::registry(settings)?;
        let dir = crate::hub::resolve_dir(spec)?;
        let loaded = LoadedModel::load(&dir, &reg)?;
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let entry = Arc::new(ModelEntry::open(id, &dir)?);
        Ok(Self { entry, loaded })
    }
}

/// What one turn produced.
pub struct Turn {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Finish,
    pub prompt_tps: f64,
    pub generation_tps: f64,
    /// Bytes per cached token, measured from the KV store's arrays.
    pub kv_bytes_per_token: f64,
    /// With a draft model: (draft tokens proposed, draft tokens kept).
    pub speculation: Option<(usize, usize)>,
}

impl Turn {
    /// "stop" (EOS or a stop string) or "length".
    pub fn finish_reason(&self) -> &'static str {
        match self.finish.reason {
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Stop | FinishReason::StopString => "stop",
        }
    }
}

/// Generates after `prompt`, calling `on_text` with each piece of text as it
/// becomes safe to show.
pub fn run_turn(model: &mut Model, prompt: &[u32], params: GenParams, on_text: impl FnMut(&str)) -> Result<Turn> {
    run_turn_with(model, None, prompt, params, on_text)
}

/// `run_turn`, speculating with `drafter` when one is given (greedy or
/// sampled; the sequence still applies EOS, stop strings and max tokens to
/// every token the speculative loop emits).
pub fn run_turn_with(
    model: &mut Model,
    drafter: Option<&mut Drafter>,
    prompt: &[u32],
    params: GenParams,
    mut on_text: impl FnMut(&str),
) -> Result<Turn> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        model: model.entry.clone(),
        prompt: prompt.to_vec(),
        params: params.clone(),
        hook: None,
        cancel: Arc::new(AtomicBool::new(false)),
        keep_alive: None,
        events: tx,
    };
    let mut seq = Sequence::new(0, req, None);
    seq.validate(model.loaded.spec.vocab_size as usize).map_err(|e| anyhow!(e))?;
    let (mut tokens, mut text) = (Vec::new(), String::new());
    let mut drain = |rx: &mut mpsc::UnboundedReceiver<GenEvent>| -> Result<()> {
        while let Ok(ev) = rx.try_recv() {
            let piece = match ev {
                GenEvent::Token { id, text, .. } => {
                    tokens.push(id);
                    text
                }
                GenEvent::Text(t) => t,
                GenEvent::Error(e) => return Err(anyhow!(e)),
                GenEvent::Started | GenEvent::Done(_) => continue,
            };
            if !piece.is_empty() {
                on_text(&piece);
                text.push_str(&piece);
            }
        }
        Ok(())
    };
    let eos = model.entry.text()?.eos_ids.clone();
    let mut speculation = None;
    let (done, prompt_tps, generation_tps, kv_bytes_per_token) = if let Some(d) = drafter {
        let opts = SpecOptions {
            num_draft_tokens: d.num_draft_tokens,
            adaptive: true,
            max_tokens: params.max_tokens,
            prefill_chunk: params.prefill_chunk,
        };
        let mut done: Option<Result<Finish, _>> = None;
        let mut err = None;
        let on_token = |t| {
            if let Outcome::Done(r) = seq.on_token(t) {
                done = Some(r);
            }
            if let Err(e) = drain(&mut rx) {
                err.get_or_insert(e);
            }
            done.is_none() && err.is_none()
        };
        let out = match d.kind {
            speculative::DraftKind::Mtp | speculative::DraftKind::Eagle3 => speculative::mtp::generate(&mut model.loaded, &mut d.model, prompt, &params.sampling, &opts, on_token)?,
            speculative::DraftKind::Dflash => speculative::dflash::generate(&mut model.loaded, &mut d.model, prompt, &params.sampling, &opts, on_token)?,
            speculative::DraftKind::Draft => speculative::generate(&mut model.loaded, &mut d.model, prompt, &params.sampling, &opts, on_token)?,
        };
        if let Some(e) = err {
            return Err(e);
        }
        speculation = Some((out.drafted_tokens, out.accepted_tokens));
        let done = done.unwrap_or_else(|| Ok(seq.finish_length()));
        let n = out.tokens.len() as f64;
        (done, prompt.len() as f64 / out.prompt_secs.max(1e-9), n / out.generation_secs.max(1e-9), out.kv_bytes_per_token)
    } else if seq.takes_device_token() && params.stop.is_empty() {
        // Greedy: the engine's pipelined loop; the sequence turns tokens into text.
        let opts = GenerateOptions {
            max_tokens: params.max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: params.sampling.seed,
            stop_ids: eos.clone(),
            prefill_chunk: params.prefill_chunk,
        };
        let mut done: Option<Result<Finish, _>> = None;
        let mut err = None;
        let out = generate(&mut model.loaded, prompt, &opts, |t| {
            if done.is_none() {
                if let Outcome::Done(r) = seq.on_token(t) {
                    done = Some(r);
                }
                if let Err(e) = drain(&mut rx) {
                    err.get_or_insert(e);
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        if done.is_none() {
            // The engine stopped at an EOS id it does not hand over: the
            // sequence flushes its held text and finishes on one.
            if let Some(&e) = eos.first() {
                if let Outcome::Done(r) = seq.on_token(e) {
                    done = Some(r);
                }
            }
        }
        let done = done.unwrap_or_else(|| Ok(seq.finish(FinishReason::Stop, None)));
        (done, out.prompt_tps, out.generation_tps, out.kv_bytes_per_token)
    } else {
        let mut session = Session::new(&mut model.loaded);
        session.prefill_chunk = params.prefill_chunk;
        let t0 = Instant::now();
        let mut logits = session.prefill(prompt)?;
        let prompt_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let done = loop {
            match seq.on_logits(logits) {
                Outcome::Continue => {
                    drain(&mut rx)?;
                    let last = *seq.tokens.last().expect("a token was accepted");
                    logits = session.step(last)?;
                }
                Outcome::Done(r) => break r,
            }
        };
        let n = seq.n as f64;
        let gen_tps = n / t1.elapsed().as_secs_f64().max(1e-9);
        (done, prompt.len() as f64 / prompt_secs.max(1e-9), gen_tps, session.kv_bytes_per_token())
    };
    drain(&mut rx)?;
    let finish = done.map_err(|e| anyhow!(e))?;
    Ok(Turn { tokens, text, finish, prompt_tps, generation_tps, kv_bytes_per_token, speculation })
}

/// Peak MLX memory in GB since the last reset.
pub fn peak_memory_gb() -> f64 {
    mlx_rs::memory::peak_memory().map(|b| b as f64 / 1e9).unwrap_or(f64::NAN)
}

/// Resets the peak that `peak_memory_gb` reports.
pub fn reset_peak_memory() {
    let _ = mlx_rs::memory::reset_peak_memory();
}
