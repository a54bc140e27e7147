//! Prefill and decode for one sequence, the way mlx-lm's generate_step does it:
//! the prompt but its last token is prefilled in chunks, then every step
//! feeds one token and reads the last position's logits.
use super::{
    cache::KvCache,
    compiled::{self, grow, CompiledStep},
    sampler::Sampler,
    seq_pool::SeqPool,
    LoadedModel,
};
use anyhow::{bail, Result};
use mlx_rs::{ops::indexing::argmax_axis, transforms::async_eval, Array, Dtype};
use std::time::Instant;

pub struct Session<'m> {
    model: &'m mut LoadedModel,
    cache: KvCache,
    /// The paged pool, when the model's KV family is not its dense default
    /// (then `cache` stays empty and nothing is compiled).
    paged: Option<SeqPool>,
    pub prefill_chunk: usize,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m mut LoadedModel) -> Self {
        let paged = (!model.kv_is_dense_default()).then(|| SeqPool::new(model));
        Self { cache: model.kv_cache(), model, paged, prefill_chunk: 512 }
    }

    /// Runs `input` (int32 [1, L], possibly lazy) through the model; returns
    /// the last position's logits [1, 1, V], lazily.
    fn forward_lazy(&mut self, input: Array, len: i32) -> Result<Array> {
        if let Some(p) = self.paged.as_mut() {
            if let Some(why) = self.model.paged_refusal() {
                bail!("KV families other than the dense default run through the paged pool, which cannot serve this model: {why}");
            }
            return p.forward(self.model, input, true);
        }
        let logits = self.model.logits(&input, &mut self.cache, true)?;
        self.cache.advance(len);
        Ok(logits)
    }

    /// Bytes per cached token the KV store's arrays hold (every layer, keys
    /// and values, scales and norms included), measured from the arrays.
    pub fn kv_bytes_per_token(&self) -> f64 {
        match &self.paged {
            Some(p) => p.measured_bytes_per_token(),
            None => self.cache.measured_bytes_per_token(),
        }
    }

    fn forward_ids(&mut self, tokens: &[u32]) -> Result<Array> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let input = Array::from_slice(&ids, &[1, ids.len() as i32]);
        self.forward_lazy(input, ids.len() as i32)
    }

    /// Prefills all but the last prompt token in chunks (evaluated), then the
    /// last one; returns its logits lazily.
    fn prefill_lazy(&mut self, prompt: &[u32]) -> Result<Array> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let vocab = self.model.spec.vocab_size;
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            bail!("prompt token id {bad} is out of range for a vocabulary of {vocab}");
        }
        let (head, last) = prompt.split_at(prompt.len() - 1);
        for chunk in head.chunks(self.prefill_chunk.max(1)) {
            self.forward_ids(chunk)?.eval()?;
        }
        self.forward_ids(last)
    }

    /// Prefills `prompt` and returns the logits that choose the first new token.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>> {
        let logits = self.prefill_lazy(prompt)?;
        to_vec(&logits)
    }

    /// Feeds one token; returns the next logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let logits = self.forward_ids(&[token])?;
        to_vec(&logits)
    }

    /// Greedy decoding, pipelined like mlx-lm's generate_step: the next
    /// token is chosen on the device, and the graph for step t+1 is built and
    /// queued (async_eval) before the host waits for token t. Through the
    /// compiled step (engine/compiled.rs) when the model allows it.
    fn greedy(&mut self, prompt: &[u32], max_tokens: usize, stop: &[u32], mut on_token: impl FnMut(u32)) -> Result<(Vec<u32>, f64, Instant)> {
        let t0 = Instant::now();
        let y = device_argmax(&self.prefill_lazy(prompt)?)?;
        y.eval()?;
        let prompt_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if self.paged.is_none() && compiled::enabled(self.model) {
            match self.greedy_compiled(&y, max_tokens, stop, &mut on_token) {
                Err(e) if e.is::<NotCompiled>() => tracing::warn!("compiled decode unavailable, decoding op by op: {e:#}"),
                r => return Ok((r?, prompt_secs, t1)),
            }
        }
        let tokens = pipelined(&y, max_tokens, stop, &mut on_token, |y| {
            let ny = device_argmax(&self.forward_lazy(y.clone(), 1)?)?;
            Ok(ny.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?)
        })?;
        Ok((tokens, prompt_secs, t1))
    }

    /// `greedy` through the compiled step; `NotCompiled` (with the cache
    /// intact) when its first trace fails.
    fn greedy_compiled(&mut self, y: &Array, max_tokens: usize, stop: &[u32], on_token: &mut impl FnMut(u32)) -> Result<Vec<u32>> {
        let (kv, offset) = self.cache.take_buffers().ok_or(NotCompiled)?;
        let grow_by = self.cache.step();
        let mut compiled = CompiledStep::new().map_err(|e| {
            self.cache.put_buffers(kv.clone(), offset);
            e.context(NotCompiled)
        })?;
        // (per-layer buffers, position as an array, position on the host)
        let mut state = Some((kv, Array::from_slice(&[offset], &[1]), offset));
        let (model, cache) = (&mut *self.model, &mut self.cache);
        let tokens = pipelined(y, max_tokens, stop, on_token, |y| {
            let (mut kv, pos, host_pos) = state.take().expect("state is put back after every step");
            if host_pos >= kv[0].0.dim(2) {
                kv = grow(kv, grow_by)?;
            }
            // The first call traces; keep the buffers to fall back on.
            let backup = (host_pos == offset).then(|| kv.clone());
            let out = compiled.step(model, y.clone(), pos, vec![kv]).map_err(|e| match backup {
                Some(kv) => {
                    cache.put_buffers(kv, offset);
                    e.context(NotCompiled)
                }
                None => e,
            })?;
            state = Some((out.rows.into_iter().next().unwrap(), out.pos, host_pos + 1));
            Ok(out.tokens)
        })?;
        if let Some((kv, _, host_pos)) = state {
            self.cache.put_buffers(kv, host_pos);
        }
        Ok(tokens)
    }

    pub fn offset(&self) -> i32 {
        match &self.paged {
            Some(p) => p.len() as i32,
            None => self.cache.offset(),
        }
    }
}

/// The compiled step could not be used; the caller decodes op by op.
#[derive(Debug)]
struct NotCompiled;

impl std::fmt::Display for NotCompiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the decode step could not be compiled")
    }
}

impl std::error::Error for NotCompiled {}

/// The pipelined greedy loop: `next(y)` builds and queues (async_eval) the
/// step after token `y` (int32 [1, 1]) before the host reads `y`.
fn pipelined(
    first: &Array,
    max_tokens: usize,
    stop: &[u32],
    on_token: &mut impl FnMut(u32),
    mut next: impl FnMut(&Array) -> Result<Array>,
) -> Result<Vec<u32>> {
    let mut y = first.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?;
    let mut tokens = Vec::new();
    let (mut build, mut wait) = (0f64, 0f64);
    while tokens.len() < max_tokens {
        let ny = if tokens.len() + 1 < max_tokens {
            let tb = Instant::now();
            let ny = next(&y)?;
            if tokens.is_empty() && super::op_count::enabled() {
                eprintln!("decode step (B = 1): {}", super::op_count::count(&[&ny])?);
            }
            async_eval([&ny])?;
            build += tb.elapsed().as_secs_f64();
            Some(ny)
        } else {
            None
        };
        let tw = Instant::now();
        let token = y.item_exact::<i32>() as u32;
        wait += tw.elapsed().as_secs_f64();
        if stop.contains(&token) {
            break;
        }
        tokens.push(token);
        on_token(token);
        match ny {
            Some(ny) => y = ny,
            None => break,
        }
    }
    if std::env::var_os("RMLX_PROFILE_DECODE").is_some() {
        let n = tokens.len().max(1) as f64 * 1e-3;
        eprintln!("decode per token: build + queue {:.3} ms, wait {:.3} ms", build / n, wait / n);
    }
    Ok(tokens)
}

/// Logits [1, 1, V] -> f32 host vector.
fn to_vec(logits: &Array) -> Result<Vec<f32>> {
    let logits = logits.as_dtype(Dtype::Float32)?;
    logits.eval()?;
    Ok(logits.try_as_slice::<f32>()?.to_vec())
}

/// Logits [1, 1, V] -> the greedy token [1] (uint32), lazily.
fn device_argmax(logits: &Array) -> Result<Array> {
    Ok(argmax_axis(logits.reshape(&[1, -1])?, -1, None)?)
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop_ids: Vec<u32>,
    pub prefill_chunk: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    /// "stop" (an EOS token) or "length".
    pub finish_reason: &'static str,
    pub prompt_tps: f64,
    pub generation_tps: f64,
    /// Bytes per cached token, measured from the KV store's arrays.
    pub kv_bytes_per_token: f64,
}

/// Generates after `prompt`, calling `on_token` for each new token (EOS excluded).
pub fn generate(
    model: &mut LoadedModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput> {
    let mut session = Session::new(model);
    session.prefill_chunk = opts.prefill_chunk;
    if opts.temperature <= 0.0 {
        let (tokens, prompt_secs, t1) = session.greedy(prompt, opts.max_tokens, &opts.stop_ids, on_token)?;
        let gen_secs = t1.elapsed().as_secs_f64();
        return Ok(GenerateOutput {
            finish_reason: if tokens.len() < opts.max_tokens { "stop" } else { "length" },
            prompt_tps: prompt.len() as f64 / prompt_secs.max(1e-9),
            generation_tps: tokens.len() as f64 / gen_secs.max(1e-9),
            kv_bytes_per_token: session.kv_bytes_per_token(),
            tokens,
        });
    }
    let mut sampler = Sampler::new(opts.temperature, opts.top_p, opts.seed);
    let t0 = Instant::now();
    let mut logits = session.prefill(prompt)?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut tokens = Vec::new();
    let mut finish_reason = "length";
    while tokens.len() < opts.max_tokens {
        let next = sampler.sample(&logits);
        if opts.stop_ids.contains(&next) {
            finish_reason = "stop";
            break;
        }
        tokens.push(next);
        on_token(next);
        if tokens.len() == opts.max_tokens {
            break;
        }
        logits = session.step(next)?;
    }
    let gen_secs = t1.elapsed().as_secs_f64();
    Ok(GenerateOutput {
        finish_reason,
        prompt_tps: prompt.len() as f64 / prompt_secs.max(1e-9),
        generation_tps: tokens.len() as f64 / gen_secs.max(1e-9),
        kv_bytes_per_token: session.kv_bytes_per_token(),
        tokens,
    })
}
