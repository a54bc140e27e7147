//! The scheduler's batched decode forward: every running sequence feeds its
//! last token, one forward for all of them, op by op. With
//! `RMLX_COMPILE_ROWS=N`, batches of up to N rows go through the compiled step
//! (engine/compiled.rs) instead: off by default, because a compiled step that
//! is still alive in the engine thread when the process exits can race MLX's
//! own static destructors (a heap-corruption abort seen in 1 of 8 test runs),
//! and batches measured slower compiled (docs/PERF.md). Rows that decode greedily
//! with nothing to apply to the logits get the device's argmax (one int per
//! row crosses to the host); the others get their logits row.
use super::{
    cache::{BatchCaches, KvCache},
    compiled::{self, grow, CompiledStep},
    sequence::Sequence,
    LoadedModel,
};
use crate::plugins::registry::into_anyhow;
use anyhow::Result;
use mlx_rs::{ops::indexing::argmax_axis, transforms::eval, Array, Dtype};
use rmlx_plugin_api::MlxArray;

/// Batches up to this many rows use the compiled step (`RMLX_COMPILE_ROWS`;
/// 0, none, by default).
fn compiled_max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| std::env::var("RMLX_COMPILE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// What a row gets from one decode step.
pub enum RowOut {
    /// The greedy token, chosen on the device.
    Token(u32),
    /// The logits (f32, one row of the vocabulary).
    Logits(Vec<f32>),
}

/// One model's decode forward, with its compiled step when it has one.
pub struct Decoder {
    compiled: Option<CompiledStep>,
}

impl Decoder {
    pub fn new(model: &LoadedModel) -> Self {
        let compiled = if compiled_max_rows() > 0 && compiled::enabled(model) {
            CompiledStep::new().map_err(|e| tracing::warn!("decode steps not compiled: {e:#}")).ok()
        } else {
            None
        };
        Self { compiled }
    }

    /// One step over `seqs` (in row order). On an error the rows' KV state is
    /// undefined: the caller ends them.
    pub fn step(&mut self, model: &mut LoadedModel, seqs: &mut [&mut Sequence]) -> Result<Vec<RowOut>> {
        if let Some(c) = self.compiled.as_mut().filter(|_| seqs.len() <= compiled_max_rows()) {
            match compiled_step(c, model, seqs) {
                Ok(Some(out)) => return Ok(out),
                Ok(None) => {} // a row has no buffers yet: this step goes op by op
                Err(e) => {
                    tracing::warn!("compiled decode step failed, decoding op by op from now on: {e:#}");
                    self.compiled = None;
                    return Err(e);
                }
            }
        }
        eager_step(model, seqs)
    }
}

fn compiled_step(c: &mut CompiledStep, model: &mut LoadedModel, seqs: &mut [&mut Sequence]) -> Result<Option<Vec<RowOut>>> {
    let b = seqs.len();
    let mut rows = Vec::with_capacity(b);
    let mut offs = Vec::with_capacity(b);
    for i in 0..b {
        match seqs[i].kv.as_mut().and_then(KvCache::take_buffers) {
            Some(x) => {
                rows.push(x.0);
                offs.push(x.1);
            }
            None => {
                for (j, layers) in rows.into_iter().enumerate() {
                    seqs[j].kv.as_mut().unwrap().put_buffers(layers, offs[j]);
                }
                return Ok(None);
            }
        }
    }
    // Grow full buffers by one step (as KvCache::attend does; the block
    // manager reserved for it).
    for (i, layers) in rows.iter_mut().enumerate() {
        if offs[i] >= layers[0].0.dim(2) {
            let step = seqs[i].kv.as_ref().unwrap().step();
            *layers = grow(std::mem::take(layers), step)?;
        }
    }
    let ids: Vec<i32> = seqs.iter().map(|s| *s.tokens.last().unwrap() as i32).collect();
    let tokens = Array::from_slice(&ids, &[b as i32, 1]);
    let pos = Array::from_slice(&offs, &[b as i32]);
    let out = c.step(model, tokens, pos, rows)?;
    for (i, layers) in out.rows.into_iter().enumerate() {
        seqs[i].kv.as_mut().unwrap().put_buffers(layers, offs[i] + 1);
    }
    rows_out(seqs, &out.tokens, &out.logits).map(Some)
}

/// Op by op: one forward over the rows' caches; plain-greedy rows take the
/// device's argmax, the others their logits.
fn eager_step(model: &mut LoadedModel, seqs: &mut [&mut Sequence]) -> Result<Vec<RowOut>> {
    let b = seqs.len();
    let ids: Vec<i32> = seqs.iter().map(|s| *s.tokens.last().unwrap() as i32).collect();
    let input = Array::from_slice(&ids, &[b as i32, 1]);
    let caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| s.kv.as_mut().unwrap()).collect();
    let logits = forward(model, caches, input, 1)?;
    let tokens = argmax_axis(&logits, -1, None)?.as_dtype(Dtype::Int32)?; // [B, 1]
    rows_out(seqs, &tokens, &logits)
}

/// Evaluates what the rows need (tokens always; logits only when a row
/// samples on the host) and hands each row its share.
fn rows_out(seqs: &[&mut Sequence], tokens: &Array, logits: &Array) -> Result<Vec<RowOut>> {
    let b = seqs.len();
    let need_logits = seqs.iter().any(|s| !s.takes_device_token());
    let logits = if need_logits {
        let l = logits.as_dtype(Dtype::Float32)?;
        eval([tokens, &l])?;
        Some(l)
    } else {
        tokens.eval()?;
        None
    };
    let toks = tokens.try_as_slice::<i32>()?;
    let all = match &logits {
        Some(l) => Some(l.try_as_slice::<f32>()?),
        None => None,
    };
    let v = all.map(|a| a.len() / b).unwrap_or(0);
    Ok(seqs
        .iter()
        .enumerate()
        .map(|(i, s)| match all {
            Some(a) if !s.takes_device_token() => RowOut::Logits(a[i * v..(i + 1) * v].to_vec()),
            _ => RowOut::Token(toks[i] as u32),
        })
        .collect())
}

/// One forward of `input` [B, L] over the rows' caches; logits [B, 1, V], lazily.
pub fn forward(model: &mut LoadedModel, caches: Vec<&mut KvCache>, input: Array, len: i32) -> Result<Array> {
    let mut batch = BatchCaches { caches };
    let attention = batch.attention();
    let plugin = &model.architecture_plugin;
    let logits = into_anyhow(model.model.forward(MlxArray::from_array(input), attention, true), plugin)?;
    batch.advance(len);
    Ok(logits.into_array())
}
