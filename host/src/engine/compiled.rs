//! Decode steps as one compiled MLX graph (`mlx_compile`), for one sequence
//! (`rmlx generate`/`bench` greedy) or a batch of them (the scheduler).
//!
//! Building a decode step's graph op by op costs the host more than a small
//! model's GPU work (docs/PERF.md). Here the whole step — embedding, every
//! layer, the KV write, attention, the head and the argmax — is traced once
//! through the architecture plugin and replayed by MLX for the following
//! steps, with MLX fusing the elementwise work.
//!
//! Replay needs every input that changes between steps to be an input of the
//! compiled function, and every shape to stay fixed:
//! - inputs: the tokens int32 [B, 1], their positions int32 [B], and per row,
//!   per layer, keys and values [1, K, cap_b, hd] (each sequence's own
//!   preallocated buffers, `cap_b` a multiple of the cache step);
//! - outputs: the greedy next tokens int32 [B, 1], the logits [B, 1, V], the
//!   next positions [B], and the updated keys and values (written with a
//!   dynamic slice update at the row's position; each row attends over all
//!   its `cap_b` slots with a mask that hides the empty ones).
//!
//! Attention over the fixed capacity: on a GPU through rmlx's fused decode
//! kernel (`rmlx_kernels::contiguous_decode`, one kernel per layer that
//! takes the mask as data), because MLX's fused one-query `sdpa_vector`
//! serves no array mask and MLX falls back to composed matmul, mask,
//! softmax and matmul over the whole capacity; on the CPU (and with
//! `RMLX_FUSED_KERNELS=0`) MLX's sdpa with the mask.
//! When a row's position reaches its capacity its buffers grow by a step, and
//! MLX traces each new combination of shapes (batch size, capacities) once. Architectures take positions from
//! `Attention::offsets()` (plugin-api ABI 3), so a trace never bakes one in.
use super::LoadedModel;
use anyhow::{bail, Result};
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{arange, concatenate, indexing::{argmax_axis, TryIndexOp}, zeros_dtype},
    Array, Dtype,
};
use super::compile_fn::CompiledFn;
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts},
    PluginError,
};

/// What the trace reads: `model` is set for the duration of each `step`
/// call (the only time MLX may run the trace).
struct TraceCtx {
    model: *mut LoadedModel,
}

/// A compiled greedy decode step for one sequence of one model.
pub struct CompiledStep {
    func: CompiledFn<TraceCtx>,
}

impl CompiledStep {
    /// A compiled step for one model: pass the same model to every `step`.
    pub fn new() -> Result<Self> {
        Ok(Self { func: CompiledFn::new(TraceCtx { model: std::ptr::null_mut() }, trace)? })
    }

    /// One step: (tokens [B,1], positions [B], per row per-layer (keys,
    /// values)) -> (next tokens [B,1], logits [B,1,V], next positions [B],
    /// updated rows), all lazy.
    pub fn step(&mut self, model: &mut LoadedModel, tokens: Array, pos: Array, rows: Vec<Vec<(Array, Array)>>) -> Result<StepOut> {
        let b = rows.len();
        let n = rows.first().map(|r| r.len()).unwrap_or(0);
        let mut inputs: Vec<Array> = Vec::with_capacity(2 + 2 * n * b);
        inputs.push(tokens);
        inputs.push(pos);
        for row in rows {
            for (k, v) in row {
                inputs.push(k);
                inputs.push(v);
            }
        }
        self.func.state().model = model as *mut LoadedModel;
        let outs = self.func.apply(&inputs);
        self.func.state().model = std::ptr::null_mut();
        drop(inputs); // the graph holds them now; lets MLX donate the buffers
        let outs = outs?;
        if outs.len() != 3 + 2 * n * b {
            bail!("the compiled decode step returned {} arrays, expected {}", outs.len(), 3 + 2 * n * b);
        }
        let mut it = outs.into_iter();
        let (tokens, logits, pos) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let rows = (0..b)
            .map(|_| (0..n).map(|_| (it.next().unwrap(), it.next().unwrap())).collect())
            .collect();
        Ok(StepOut { tokens, logits, pos, rows })
    }
}

/// What one compiled step returns (lazy arrays).
pub struct StepOut {
    /// int32 [B, 1]: each row's greedy next token.
    pub tokens: Array,
    /// [B, 1, V] in the model's dtype.
    pub logits: Array,
    /// int32 [B]: positions + 1.
    pub pos: Array,
    /// Per row, per layer: the updated (keys, values).
    pub rows: Vec<Vec<(Array, Array)>>,
}

/// Whether greedy/batched decode steps are compiled: on unless
/// `RMLX_COMPILE=0`, and only for models without sliding-window layers.
pub fn enabled(model: &LoadedModel) -> bool {
    let on = std::env::var("RMLX_COMPILE").map(|v| v != "0").unwrap_or(true);
    // Uniform full-attention layers only: no windows, no recurrent state,
    // no shared K/V or per-layer head sizes (ABI 3.3 `Model::layers`).
    on && model.spec.sliding_window.iter().all(|&w| w == 0) && model.uniform_layers() && !model.has_state()
}

/// Grows every layer's buffers [1, K, cap, hd] by `add` zeroed slots.
pub fn grow(kv: Vec<(Array, Array)>, add: i32) -> Result<Vec<(Array, Array)>> {
    let pad = |x: &Array| -> Result<Array> {
        let z = zeros_dtype(&[x.dim(0), x.dim(1), add, x.dim(3)], x.dtype())?;
        Ok(concatenate(&[x.clone(), z], 2)?)
    };
    kv.iter().map(|(k, v)| Ok((pad(k)?, pad(v)?))).collect()
}

/// The traced function: see the module docs for inputs and outputs.
fn trace(ctx: &mut TraceCtx, arrays: Vec<Array>) -> Result<Vec<Array>> {
    if arrays.len() < 2 {
        bail!("bad compiled decode inputs ({} arrays)", arrays.len());
    }
    let mut it = arrays.into_iter();
    let (tokens, pos) = (it.next().unwrap(), it.next().unwrap()); // [B, 1], [B]
    let b = tokens.dim(0) as usize;
    let rest: Vec<Array> = it.collect();
    if b == 0 || rest.len() % (2 * b) != 0 {
        bail!("bad compiled decode inputs ({} buffers for {b} rows)", rest.len());
    }
    let n = rest.len() / (2 * b);
    let mut rest = rest.into_iter();
    let rows: Vec<Vec<(Array, Array)>> =
        (0..b).map(|_| (0..n).map(|_| (rest.next().unwrap(), rest.next().unwrap())).collect()).collect();
    if ctx.model.is_null() {
        bail!("the compiled decode step was traced outside `step`");
    }
    let model = unsafe { &mut *ctx.model };
    let row_pos = if b == 1 {
        vec![pos.clone()]
    } else {
        (0..b as i32).map(|r| pos.try_index(r..r + 1)).collect::<Result<Vec<_>, _>>()?
    };
    let mut cache = TracedCache { pos: pos.clone(), row_pos, rows, masks: vec![None; b] };
    let logits = model.logits(&tokens, &mut cache, true)?; // [B, 1, V]
    let next = argmax_axis(&logits, -1, None)?.as_dtype(Dtype::Int32)?; // [B, 1]
    let mut outs = vec![next, logits, pos.add(Array::from_int(1))?];
    for row in cache.rows {
        for (k, v) in row {
            outs.push(k);
            outs.push(v);
        }
    }
    Ok(outs)
}

/// The KV buffers inside a trace: fixed capacities, dynamic positions.
struct TracedCache {
    /// int32 [B]
    pos: Array,
    /// Row b's position, int32 [1].
    row_pos: Vec<Array>,
    /// Per row, per layer: (keys, values) [1, K, cap_b, hd].
    rows: Vec<Vec<(Array, Array)>>,
    /// Per row, bool [1, cap_b]: slots 0..=pos are filled, and the same as
    /// sdpa's mask [1, 1, 1, cap_b] (shared by the layers).
    masks: Vec<Option<(Array, Array)>>,
}

impl super::attend::KvStore for TracedCache {
    fn batch(&self) -> u32 {
        self.rows.len() as u32
    }

    /// Unknown while tracing; architectures take positions from `offsets()`.
    fn offset(&self) -> i32 {
        0
    }

    fn offsets(&self) -> Array {
        self.pos.clone()
    }

    /// q: [B, H, 1, hd], k/v: [B, K, 1, hd] -> [B, H, 1, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
        super::attend::refuse_bidirectional(opts)?;
        if opts.window != 0 {
            return Err(PluginError::unsupported("sliding-window attention is not compiled yet"));
        }
        if q.dim(2) != 1 {
            return Err(PluginError::other("the compiled decode step takes one token per row"));
        }
        let b = self.rows.len();
        let mut outs = Vec::with_capacity(b);
        for r in 0..b {
            let (keys, values) = self.rows[r]
                .get(layer as usize)
                .cloned()
                .ok_or_else(|| PluginError::other(format!("attention layer {layer} out of range")))?;
            let row = |x: &Array| -> Result<Array, PluginError> {
                if b == 1 {
                    Ok(x.clone())
                } else {
                    Ok(x.try_index(r as i32..r as i32 + 1)?)
                }
            };
            let cap = keys.dim(2);
            let keys = slice_update_at(&keys, &row(&k)?, &self.row_pos[r])?;
            let values = slice_update_at(&values, &row(&v)?, &self.row_pos[r])?;
            if self.masks[r].is_none() {
                let slots = arange::<_, i32>(0, cap, None)?;
                let valid = slots.le(&self.row_pos[r])?.reshape(&[1, cap])?;
                let mask = valid.reshape(&[1, 1, 1, cap])?;
                self.masks[r] = Some((valid, mask));
            }
            let (valid, mask) = self.masks[r].as_ref().unwrap();
            let q = row(&q)?;
            let fused = if keys.dim(3) == values.dim(3) {
                rmlx_kernels::contiguous_decode(&q, &keys, &values, valid, opts.sinks, opts.scale, opts.softcap)
                    .map_err(|e| PluginError::other(format!("fused decode kernel: {e}")))?
            } else {
                None
            };
            outs.push(match fused {
                Some(o) => o,
                None if opts.is_plain() => {
                    scaled_dot_product_attention(&q, &keys, &values, opts.scale, ScaledDotProductAttentionMask::Array(mask), None)?
                }
                None => dense_attend(&q, &keys, &values, Some(mask), opts)?,
            });
            self.rows[r][layer as usize] = (keys, values);
        }
        if b == 1 {
            return Ok(outs.pop().unwrap());
        }
        Ok(concatenate(&outs, 0)?)
    }
}

/// `buf` [1, K, cap, hd] with `x` [1, K, 1, hd] written at slot `pos` (int32 [1]).
fn slice_update_at(buf: &Array, x: &Array, pos: &Array) -> Result<Array, PluginError> {
    let axes = [2i32];
    let x = x.as_dtype(buf.dtype())?;
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let stream = mlx_rs::Stream::thread_local_or_default();
        if mlx_sys::mlx_slice_update_dynamic(&mut res, buf.as_ptr(), x.as_ptr(), pos.as_ptr(), axes.as_ptr(), 1, stream.as_ptr()) != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(PluginError::other("slice_update_dynamic failed"));
        }
        Ok(Array::from_ptr(res))
    }
}

