//! The server's batched decode step as one compiled MLX graph
//! (`mlx_compile`), over the paged KV pool (issue 16).
//!
//! Op by op (`decode::decode_forward`) the host builds every primitive of a
//! [B, 1] forward each step, which on a GPU costs more than a small model's
//! device work (docs/PERF.md). Here the step — embedding, every layer, the
//! KV families' encode and scatter into the pool, their paged attention, the
//! head and the argmax — is traced once per shape bucket through the
//! architecture and KV family plugins and replayed by MLX.
//!
//! - inputs: tokens int32 [B, 1] (the previous pipelined step's tokens
//!   picked on the device), positions int32 [B], block tables int32 [B, W],
//!   write slots int32 [B], then per layer the pool's key components and
//!   value components (`KvPool::take_all`);
//! - outputs: the greedy next tokens int32 [B, 1], the logits [B, 1, V],
//!   then per layer the updated components;
//! - in the trace, row b sees table positions 0..=pos[b]
//!   (`arange(W * block) <= pos`), so neither positions nor lengths are
//!   baked in (architectures take positions from `offsets()`, ABI 3).
//!
//! Shapes stay fixed inside a bucket: B is rounded up to a power of two up
//! to 8, then to a multiple of 8; W (table width in blocks) to a power of
//! two up to 64, then to a multiple of 64. Padding rows feed token 0 at
//! position 0 with a table of the pool's scratch block (`scratch_block`,
//! past every real block): each writes there and reads only that slot, so
//! it never touches a sequence's KV and its softmax never runs over nothing.
//! MLX traces once per (B, W, pool capacity) and replays after.
//!
//! Donation: the pool's arrays are moved out of the pool for the call and
//! the host's handles dropped once the graph is built, so MLX scatters into
//! them in place; on a failed call they go back as they were.
//!
//! Trace safety: nothing may evaluate inside a trace (MLX refuses it). A
//! KV family's fused kernels check themselves against the composed path on
//! their first call in the process (`rmlx_kernels::verified`), which
//! evaluates, so a lane's first decode step always runs op by op. A trace
//! that fails anyway (a plugin that evaluates, an attention the step does
//! not serve) turns the lane's compiled step off and the step runs op by op.
//!
//! Not served (op by op): speculative steps (spec.rs runs before), models
//! with recurrent state, sliding windows or layers of other shapes (SHARED,
//! per-layer heads), pools split in window groups, rows with multimodal
//! RoPE positions. On unless `RMLX_COMPILE=0`; on a GPU by default,
//! `RMLX_COMPILE_PAGED=1|0` forces it on or off.
use super::{
    decode::{decode_forward, with_bias, Step},
    kv_groups,
    kv_pool::{KvPool, LayerArrays},
    sequence::Sequence,
    LoadedModel,
};
use anyhow::{anyhow, bail, Result};
use mlx_rs::{
    ops::{
        indexing::{argmax_axis, take_axis, TryIndexOp},
        select,
    },
    Array, Dtype,
};
use super::compile_fn::CompiledFn;
use std::sync::atomic::{AtomicU64, Ordering};

#[path = "compiled_paged_store.rs"]
mod store;

/// Steps served compiled and traces made, in this process (tests, logs).
static STEPS: AtomicU64 = AtomicU64::new(0);
static TRACES: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// (compiled steps run, traces made) in this process.
pub fn counts() -> (u64, u64) {
    (STEPS.load(Ordering::Relaxed), TRACES.load(Ordering::Relaxed))
}

/// Compiled steps that failed (their lanes went op by op), in this process.
pub fn failures() -> u64 {
    FAILED.load(Ordering::Relaxed)
}

/// Whether the server's decode steps are compiled: off with
/// `RMLX_COMPILE=0`; `RMLX_COMPILE_PAGED=1` or `0` forces it; else on for
/// GPU backends.
pub fn enabled() -> bool {
    if std::env::var("RMLX_COMPILE").is_ok_and(|v| v == "0") {
        return false;
    }
    match std::env::var("RMLX_COMPILE_PAGED").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => !crate::model::policy::on_cpu(),
    }
}

/// Whether a lane of `model` over `pool` can be compiled at all.
fn servable(model: &LoadedModel, pool: &KvPool) -> bool {
    use super::kv_layout::LayerLayout;
    model.spec.sliding_window.iter().all(|&w| w == 0)
        && model.uniform_layers()
        && model.cache_layers.iter().all(|l| l.kind == rmlx_plugin_api::cache_kind::FULL)
        && !model.has_state()
        && pool.win.is_none()
        && pool.layouts().iter().all(|l| matches!(l, LayerLayout::Own { .. }))
}

/// Rows rounded up to their bucket: powers of two to 8, then multiples of 8.
pub fn row_bucket(b: usize) -> usize {
    if b <= 8 {
        b.max(1).next_power_of_two()
    } else {
        b.div_ceil(8) * 8
    }
}

/// Table width in blocks rounded up: powers of two to 64, then multiples of 64.
pub fn width_bucket(n: usize) -> usize {
    if n <= 64 {
        n.max(1).next_power_of_two()
    } else {
        n.div_ceil(64) * 64
    }
}

/// One lane's compiled decode step: made on the lane's first compiled step,
/// freed (its MLX compile-cache entries erased) when the lane drops, on the
/// engine thread.
pub struct CompiledPaged {
    /// On for this lane (enabled, and the model and pool are servable).
    on: bool,
    /// An op-by-op decode step of this lane has run (fused kernels checked).
    warm: bool,
    func: Option<CompiledFn<TraceCtx>>,
    /// Traces made for this lane (the log's).
    traces: u64,
}

impl CompiledPaged {
    /// For a lane of `model` over `pool`.
    pub fn new(model: &LoadedModel, pool: &KvPool) -> Self {
        Self { on: enabled() && servable(model, pool), warm: false, func: None, traces: 0 }
    }

    /// Whether this step's rows can go through the compiled step.
    fn serves(&self, seqs: &[&mut Sequence]) -> bool {
        self.on && self.warm && !seqs.is_empty() && seqs.iter().all(|s| s.mrope.is_none())
    }
}

/// One batched decode step over `seqs` (as `decode_forward`): compiled when
/// the lane's compiled step serves it, else op by op.
pub fn decode_step(model: &mut LoadedModel, pool: &mut KvPool, comp: &mut CompiledPaged, seqs: &mut [&mut Sequence], prev: Option<&Array>) -> Result<Step> {
    if comp.serves(seqs) {
        match run(model, pool, comp, seqs, prev) {
            Ok(step) => return Ok(step),
            Err(e) => {
                // Nothing of the step was kept (the pool's arrays went back).
                FAILED.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("the compiled decode step failed ({e:#}); this lane decodes op by op from now on");
                comp.on = false;
                comp.func = None;
            }
        }
    }
    let step = decode_forward(model, pool, seqs, prev)?;
    comp.warm = true;
    Ok(step)
}

/// The compiled step proper; on an error the pool and the rows are as they were.
fn run(model: &mut LoadedModel, pool: &mut KvPool, comp: &mut CompiledPaged, seqs: &mut [&mut Sequence], prev: Option<&Array>) -> Result<Step> {
    let (b, bs) = (seqs.len(), pool.block_size);
    let bp = row_bucket(b);
    let need = seqs.iter().map(|s| (s.kv_len + 1).div_ceil(bs)).max().unwrap_or(1);
    let w = width_bucket(need);
    let mut max_id = 0;
    for s in seqs.iter() {
        let own = (s.kv_len + 1).div_ceil(bs);
        if s.table.len() < own {
            bail!("a block table holds {} tokens, the step needs {}", s.table.len() * bs, s.kv_len + 1);
        }
        max_id = max_id.max(s.table[..own].iter().map(|&e| kv_groups::id(e)).max().unwrap_or(0) as usize);
    }
    pool.reserve(max_id);
    let scratch = pool.scratch_block() as i32;
    // Host inputs, padding rows last.
    let mut toks = vec![0i32; bp];
    let mut pos = vec![0i32; bp];
    let mut write = vec![scratch * bs as i32; bp];
    let mut tables = vec![scratch; bp * w];
    for (r, s) in seqs.iter().enumerate() {
        toks[r] = *s.tokens.last().ok_or_else(|| anyhow!("a decoding row has no tokens"))? as i32;
        pos[r] = s.kv_len as i32;
        let own = (s.kv_len + 1).div_ceil(bs);
        for (j, &e) in s.table[..own].iter().enumerate() {
            tables[r * w + j] = kv_groups::id(e) as i32;
        }
        write[r] = tables[r * w + s.kv_len / bs] * bs as i32 + (s.kv_len % bs) as i32;
    }
    let (bpi, wi) = (bp as i32, w as i32);
    let mut tokens = Array::from_slice(&toks, &[bpi, 1]);
    if let Some(prev) = prev.filter(|_| seqs.iter().any(|s| s.pending_row.is_some())) {
        let mut idx = vec![0i32; bp];
        let mut use_prev = vec![false; bp];
        for (r, s) in seqs.iter().enumerate() {
            if let Some(p) = s.pending_row {
                (idx[r], use_prev[r]) = (p as i32, true);
            }
        }
        let from_prev = take_axis(prev, Array::from_slice(&idx, &[bpi]), 0)?; // [Bp, 1]
        tokens = select(Array::from_slice(&use_prev, &[bpi, 1]), &from_prev, &tokens)?;
    }
    let fixed = [tokens, Array::from_slice(&pos, &[bpi]), Array::from_slice(&tables, &[bpi, wi]), Array::from_slice(&write, &[bpi])];
    let func = match comp.func.as_mut() {
        Some(f) => f,
        None => comp.func.insert(CompiledFn::new(TraceCtx { model: std::ptr::null_mut(), pool: std::ptr::null(), traces: 0 }, trace)?),
    };
    let layers = pool.take_all().map_err(|e| anyhow!("{}", e.message))?;
    let outs = apply(func, model, pool, &fixed, &layers);
    drop(fixed);
    let outs = match outs {
        Ok(o) => o,
        Err(e) => {
            pool.put_all(layers);
            return Err(e);
        }
    };
    drop(layers); // the graph holds them now: MLX writes them in place
    // Into the pool at once: whatever fails below leaves it whole (this
    // step's rows only wrote their next slots, which a retry writes again).
    let mut it = outs.into_iter();
    let (next, logits) = (it.next().unwrap(), it.next().unwrap());
    let new: Vec<LayerArrays> = pool
        .layouts()
        .iter()
        .map(|l| match l {
            super::kv_layout::LayerLayout::Own { k, v } => {
                ((&mut it).take(k.comps.len()).collect(), (&mut it).take(v.comps.len()).collect())
            }
            _ => (Vec::new(), Vec::new()),
        })
        .collect();
    pool.put_all(new);
    let cut = |x: Array| -> Result<Array> { Ok(if bp > b { x.try_index(0..b as i32)? } else { x }) };
    let logits = cut(logits)?;
    let biased = seqs.iter().any(|s| s.takes_device_token() && !s.device_bias().is_empty());
    let tokens = if biased { argmax_axis(&with_bias(seqs, &logits)?, -1, None)?.as_dtype(Dtype::Int32)? } else { cut(next)? };
    for s in seqs.iter_mut() {
        s.kv_len += 1;
    }
    STEPS.fetch_add(1, Ordering::Relaxed);
    let traces = func.state().traces;
    if traces > comp.traces {
        let what = format!("the decode step of {} (KV {}) compiled for {bp} rows x {w} blocks", model.dir.model_type, pool.family_key());
        if comp.traces == 0 {
            tracing::info!("{what} (RMLX_COMPILE_PAGED=0: op by op)");
        } else {
            tracing::debug!("{what} ({traces} traces)");
        }
        comp.traces = traces;
    }
    Ok(Step { tokens, logits })
}

/// What the trace function reads; `model` and `pool` are set for the
/// duration of each apply (the only time MLX may run the trace).
struct TraceCtx {
    model: *mut LoadedModel,
    pool: *const KvPool,
    /// Traces made.
    traces: u64,
}

/// The outputs of one call (lazy): next tokens, logits, then every layer's
/// new components in the inputs' order.
fn apply(func: &mut CompiledFn<TraceCtx>, model: &mut LoadedModel, pool: &KvPool, fixed: &[Array], layers: &[LayerArrays]) -> Result<Vec<Array>> {
    let inputs: Vec<Array> = fixed.iter().chain(layers.iter().flat_map(|(k, v)| k.iter().chain(v))).cloned().collect();
    let want = 2 + inputs.len() - fixed.len();
    (func.state().model, func.state().pool) = (model as *mut LoadedModel, pool as *const KvPool);
    let outs = func.apply(&inputs);
    (func.state().model, func.state().pool) = (std::ptr::null_mut(), std::ptr::null());
    let outs = outs?;
    if outs.len() != want {
        bail!("the compiled decode step returned {} arrays, expected {want}", outs.len());
    }
    Ok(outs)
}

/// The traced function (see the module docs for inputs and outputs).
fn trace(ctx: &mut TraceCtx, arrays: Vec<Array>) -> Result<Vec<Array>> {
    let outs = trace_step(ctx, arrays)?;
    TRACES.fetch_add(1, Ordering::Relaxed);
    ctx.traces += 1;
    Ok(outs)
}

fn trace_step(ctx: &mut TraceCtx, arrays: Vec<Array>) -> Result<Vec<Array>> {
    if ctx.model.is_null() || ctx.pool.is_null() {
        bail!("the paged decode step was traced outside its call");
    }
    let (model, pool) = unsafe { (&mut *ctx.model, &*ctx.pool) };
    if arrays.len() < 4 {
        bail!("bad compiled decode inputs ({} arrays)", arrays.len());
    }
    let mut it = arrays.into_iter();
    let (tokens, pos, tables, write) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let mut store = store::TracedPool::new(pool, pos, tables, write, it.collect())?;
    let logits = model.logits(&tokens, &mut store, true)?; // [B, 1, V]
    let next = argmax_axis(&logits, -1, None)?.as_dtype(Dtype::Int32)?; // [B, 1]
    let mut outs = vec![next, logits];
    outs.extend(store.into_layers());
    Ok(outs)
}
