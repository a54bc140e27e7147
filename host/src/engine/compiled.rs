//! Greedy decode steps as one compiled MLX graph (`mlx_compile`).
//!
//! Building a decode step's graph op by op costs the host more than a small
//! model's GPU work (docs/PERF.md). Here the whole step — embedding, every
//! layer, the KV write, attention, the head and the argmax — is traced once
//! through the architecture plugin and replayed by MLX for the following
//! steps, with MLX fusing the elementwise work.
//!
//! Replay needs every input that changes between steps to be an input of the
//! compiled function, and every shape to stay fixed:
//! - inputs: the token int32 [1, 1], its position int32 [1], and per layer
//!   keys and values [1, K, cap, hd] (preallocated, `cap` a multiple of the
//!   cache step);
//! - outputs: the next token int32 [1, 1], the next position int32 [1], and
//!   the updated keys and values (written with a dynamic slice update at the
//!   position; attention runs over all `cap` slots with a mask that hides the
//!   empty ones).
//! When the position reaches `cap` the buffers grow by a step and MLX traces
//! the new shape once. Architectures take positions from
//! `Attention::offsets()` (plugin-api ABI 3), so a trace never bakes one in.
use super::LoadedModel;
use anyhow::{anyhow, bail, Result};
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{arange, concatenate, indexing::argmax_axis, zeros_dtype},
    Array, Dtype,
};
use mlx_sys::{mlx_array, mlx_closure, mlx_vector_array};
use rmlx_plugin_api::{author::guard, AttendOptions, Attention, MlxArray, PResult, PluginError};
use std::ffi::c_void;

/// What the trace function needs; lives as long as the compiled closure.
struct TraceCtx {
    model: *mut LoadedModel,
    /// Why the last trace failed (mlx-c only sees a non-zero return).
    error: Option<String>,
}

/// A compiled greedy decode step for one sequence of one model.
pub struct CompiledStep {
    closure: mlx_closure,
    ctx: Box<TraceCtx>,
}

impl CompiledStep {
    /// # Safety
    /// `model` must outlive the returned value and not be used elsewhere
    /// while `step` runs.
    pub unsafe fn new(model: *mut LoadedModel) -> Result<Self> {
        let mut ctx = Box::new(TraceCtx { model, error: None });
        let payload = &mut *ctx as *mut TraceCtx as *mut c_void;
        unsafe {
            let fun = mlx_sys::mlx_closure_new_func_payload(Some(trace), payload, None);
            let mut closure = mlx_sys::mlx_closure_new();
            let rc = mlx_sys::mlx_compile(&mut closure, fun, false);
            mlx_sys::mlx_closure_free(fun);
            if rc != 0 {
                mlx_sys::mlx_closure_free(closure);
                bail!("mlx_compile failed");
            }
            Ok(Self { closure, ctx })
        }
    }

    /// One step: (token [1,1], position [1], per-layer (keys, values)) ->
    /// (next token [1,1], next position [1], updated layers), all lazy.
    pub fn step(&mut self, token: Array, pos: Array, kv: Vec<(Array, Array)>) -> Result<(Array, Array, Vec<(Array, Array)>)> {
        let n = kv.len();
        let mut inputs: Vec<Array> = Vec::with_capacity(2 + 2 * n);
        inputs.push(token);
        inputs.push(pos);
        for (k, v) in kv {
            inputs.push(k);
            inputs.push(v);
        }
        let raw: Vec<mlx_array> = inputs.iter().map(|a| a.as_ptr()).collect();
        self.ctx.error = None;
        let mut outs = Vec::with_capacity(2 + 2 * n);
        unsafe {
            let vin = mlx_sys::mlx_vector_array_new_data(raw.as_ptr(), raw.len());
            let mut vout = mlx_sys::mlx_vector_array_new();
            let rc = mlx_sys::mlx_closure_apply(&mut vout, self.closure, vin);
            mlx_sys::mlx_vector_array_free(vin);
            drop(inputs); // the graph holds them now; lets MLX donate the buffers
            if rc != 0 {
                mlx_sys::mlx_vector_array_free(vout);
                let why = self.ctx.error.take().unwrap_or_else(|| "the compiled decode step failed".into());
                bail!("{why}");
            }
            for i in 0..mlx_sys::mlx_vector_array_size(vout) {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, vout, i);
                outs.push(Array::from_ptr(a));
            }
            mlx_sys::mlx_vector_array_free(vout);
        }
        if outs.len() != 2 + 2 * n {
            bail!("the compiled decode step returned {} arrays, expected {}", outs.len(), 2 + 2 * n);
        }
        let mut it = outs.into_iter();
        let (tok, pos) = (it.next().unwrap(), it.next().unwrap());
        let mut layers = Vec::with_capacity(n);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            layers.push((k, v));
        }
        Ok((tok, pos, layers))
    }
}

impl Drop for CompiledStep {
    fn drop(&mut self) {
        unsafe {
            mlx_sys::mlx_closure_free(self.closure);
        }
    }
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
unsafe extern "C" fn trace(res: *mut mlx_vector_array, input: mlx_vector_array, payload: *mut c_void) -> i32 {
    let ctx = unsafe { &mut *(payload as *mut TraceCtx) };
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { trace_inner(ctx, input) }));
    let result = match run {
        Ok(r) => r,
        Err(_) => Err(anyhow!("panic while tracing the decode step")),
    };
    match result {
        Ok(outs) => {
            let raw: Vec<mlx_array> = outs.iter().map(|a| a.as_ptr()).collect();
            unsafe {
                let v = mlx_sys::mlx_vector_array_new_data(raw.as_ptr(), raw.len());
                mlx_sys::mlx_vector_array_set(res, v);
                mlx_sys::mlx_vector_array_free(v);
            }
            0
        }
        Err(e) => {
            ctx.error = Some(format!("{e:#}"));
            1
        }
    }
}

unsafe fn trace_inner(ctx: &mut TraceCtx, input: mlx_vector_array) -> Result<Vec<Array>> {
    let mut arrays = Vec::new();
    unsafe {
        for i in 0..mlx_sys::mlx_vector_array_size(input) {
            let mut a = mlx_sys::mlx_array_new();
            mlx_sys::mlx_vector_array_get(&mut a, input, i);
            arrays.push(Array::from_ptr(a));
        }
    }
    if arrays.len() < 2 || arrays.len() % 2 != 0 {
        bail!("bad compiled decode inputs ({} arrays)", arrays.len());
    }
    let mut it = arrays.into_iter();
    let (token, pos) = (it.next().unwrap(), it.next().unwrap());
    let mut layers = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        layers.push((k, v));
    }
    let model = unsafe { &mut *ctx.model };
    let mut cache = TracedCache { pos: pos.clone(), layers, mask: None };
    let attention = unsafe {
        Attention::new(&mut cache as *mut TracedCache as *mut c_void, offset_cb, attend_cb, offsets_cb, batch_cb)
    };
    let logits = model.model.forward(MlxArray::from_array(token), attention, true);
    let logits = crate::plugins::registry::into_anyhow(logits, &model.architecture_plugin)?.into_array(); // [1, 1, V]
    let next = argmax_axis(logits.reshape(&[1, -1])?, -1, None)?.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?;
    let mut outs = vec![next, pos.add(Array::from_int(1))?];
    for (k, v) in cache.layers {
        outs.push(k);
        outs.push(v);
    }
    Ok(outs)
}

/// The KV buffers inside a trace: fixed capacity, dynamic position.
struct TracedCache {
    pos: Array,
    layers: Vec<(Array, Array)>,
    /// bool [1, 1, 1, cap]: slots 0..=pos are filled (shared by the layers).
    mask: Option<Array>,
}

impl TracedCache {
    /// q: [1, H, 1, hd], k/v: [1, K, 1, hd] -> [1, H, 1, hd]
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: AttendOptions) -> Result<Array, PluginError> {
        if opts.window != 0 {
            return Err(PluginError::unsupported("sliding-window attention is not compiled yet"));
        }
        if q.dim(2) != 1 {
            return Err(PluginError::other("the compiled decode step takes one token"));
        }
        let (keys, values) = self
            .layers
            .get(layer as usize)
            .cloned()
            .ok_or_else(|| PluginError::other(format!("attention layer {layer} out of range")))?;
        let cap = keys.dim(2);
        let keys = slice_update_at(&keys, &k, &self.pos)?;
        let values = slice_update_at(&values, &v, &self.pos)?;
        if self.mask.is_none() {
            let slots = arange::<_, i32>(0, cap, None)?;
            self.mask = Some(slots.le(&self.pos)?.reshape(&[1, 1, 1, cap])?);
        }
        let mask = self.mask.as_ref().unwrap();
        let out = scaled_dot_product_attention(&q, &keys, &values, opts.scale, ScaledDotProductAttentionMask::Array(mask), None)?;
        self.layers[layer as usize] = (keys, values);
        Ok(out)
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

extern "C" fn offset_cb(_: *mut c_void) -> i32 {
    // Unknown while tracing; architectures take positions from `offsets()`.
    0
}

extern "C" fn offsets_cb(state: *mut c_void) -> MlxArray {
    MlxArray::from_array(unsafe { &*(state as *const TracedCache) }.pos.clone())
}

extern "C" fn batch_cb(_: *mut c_void) -> u32 {
    1
}

extern "C" fn attend_cb(state: *mut c_void, layer: u32, q: MlxArray, k: MlxArray, v: MlxArray, opts: AttendOptions) -> PResult<MlxArray> {
    let cache = unsafe { &mut *(state as *mut TracedCache) };
    guard(|| cache.attend(layer, q.into_array(), k.into_array(), v.into_array(), opts).map(MlxArray::from_array))
}
