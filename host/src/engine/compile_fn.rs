//! One MLX-compiled function of arrays: `mlx_compile` over a trace
//! closure whose payload is the caller's state `C`. Shared by the compiled
//! decode steps (engine/compiled.rs for contiguous buffers,
//! engine/compiled_paged.rs for the paged pool).
//!
//! MLX runs the trace (`trace(&mut state, inputs)`) on the first call and
//! on every call with new input shapes, and replays the traced graph
//! otherwise, so the state may be read only during [`CompiledFn::apply`]:
//! callers point it at what the trace needs before the call and clear it
//! after. A trace that fails or panics makes that apply fail with its
//! message; nothing of it is kept. Dropping the function erases its entries
//! from MLX's compile cache: drop it on the thread that used it, before
//! the process exits.
use anyhow::{anyhow, bail, Result};
use mlx_rs::Array;
use mlx_sys::{mlx_array, mlx_closure, mlx_vector_array};
use std::ffi::c_void;

/// What a trace computes: outputs from the state and the traced inputs.
pub type TraceFn<C> = fn(&mut C, Vec<Array>) -> Result<Vec<Array>>;

struct Payload<C> {
    state: C,
    trace: TraceFn<C>,
    /// Why the last trace failed (mlx-c only sees a non-zero return).
    error: Option<String>,
}

/// A compiled function with state `C` for its trace.
pub struct CompiledFn<C> {
    closure: mlx_closure,
    payload: Box<Payload<C>>,
}

impl<C> CompiledFn<C> {
    pub fn new(state: C, trace: TraceFn<C>) -> Result<Self> {
        let mut payload = Box::new(Payload { state, trace, error: None });
        let ptr = &mut *payload as *mut Payload<C> as *mut c_void;
        unsafe {
            let fun = mlx_sys::mlx_closure_new_func_payload(Some(trampoline::<C>), ptr, None);
            let mut closure = mlx_sys::mlx_closure_new();
            let rc = mlx_sys::mlx_compile(&mut closure, fun, false);
            mlx_sys::mlx_closure_free(fun);
            if rc != 0 {
                mlx_sys::mlx_closure_free(closure);
                bail!("mlx_compile failed");
            }
            Ok(Self { closure, payload })
        }
    }

    /// The trace's state (set what the trace reads before `apply`).
    pub fn state(&mut self) -> &mut C {
        &mut self.payload.state
    }

    /// The outputs of one call, lazy. The caller keeps `inputs` alive until
    /// this returns and may drop them after (the graph then holds the only
    /// references, so MLX can write donated buffers in place).
    pub fn apply(&mut self, inputs: &[Array]) -> Result<Vec<Array>> {
        let raw: Vec<mlx_array> = inputs.iter().map(|a| a.as_ptr()).collect();
        self.payload.error = None;
        let mut outs = Vec::new();
        unsafe {
            let vin = mlx_sys::mlx_vector_array_new_data(raw.as_ptr(), raw.len());
            let mut vout = mlx_sys::mlx_vector_array_new();
            let rc = mlx_sys::mlx_closure_apply(&mut vout, self.closure, vin);
            mlx_sys::mlx_vector_array_free(vin);
            if rc != 0 {
                mlx_sys::mlx_vector_array_free(vout);
                bail!("{}", self.payload.error.take().unwrap_or_else(|| "the compiled function failed".into()));
            }
            for i in 0..mlx_sys::mlx_vector_array_size(vout) {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, vout, i);
                outs.push(Array::from_ptr(a));
            }
            mlx_sys::mlx_vector_array_free(vout);
        }
        Ok(outs)
    }
}

impl<C> Drop for CompiledFn<C> {
    fn drop(&mut self) {
        // Erases this function's entries from MLX's compile cache.
        unsafe {
            mlx_sys::mlx_closure_free(self.closure);
        }
    }
}

/// What mlx-c calls to trace: the inputs as arrays, the caller's trace,
/// its outputs back (or its error kept for `apply`; a panic never crosses).
unsafe extern "C" fn trampoline<C>(res: *mut mlx_vector_array, input: mlx_vector_array, payload: *mut c_void) -> i32 {
    let p = unsafe { &mut *(payload as *mut Payload<C>) };
    let mut arrays = Vec::new();
    unsafe {
        for i in 0..mlx_sys::mlx_vector_array_size(input) {
            let mut a = mlx_sys::mlx_array_new();
            mlx_sys::mlx_vector_array_get(&mut a, input, i);
            arrays.push(Array::from_ptr(a));
        }
    }
    let trace = p.trace;
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| trace(&mut p.state, arrays)));
    match run.unwrap_or_else(|_| Err(anyhow!("panic while tracing a compiled step"))) {
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
            p.error = Some(format!("{e:#}"));
            1
        }
    }
}
