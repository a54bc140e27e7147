//! Mode-aware MLX quantization ops. mlx-rs 0.33 hard-codes `mode = "affine"`
//! in `quantize` / `dequantize` / `quantized_matmul`; these call mlx-c
//! directly with the mode (`affine`, `mxfp4`, `mxfp8`, `nvfp4`).
//!
//! Errors: mlx-c reports through its error handler. This image subscribes its
//! own thread-local slot to the process's error bus (see kernels/mlx-sys), so a
//! failing call returns MLX's own message.
use mlx_rs::{Array, Dtype, Stream};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Once;

thread_local! {
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

unsafe extern "C" fn on_error(msg: *const c_char, _data: *mut c_void) {
    let text = if msg.is_null() { "unknown MLX error".to_string() } else { CStr::from_ptr(msg).to_string_lossy().into_owned() };
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(text));
}

static SUBSCRIBE: Once = Once::new();

fn subscribe() {
    SUBSCRIBE.call_once(|| unsafe { mlx_sys::mlx_set_error_handler(Some(on_error), std::ptr::null_mut(), None) });
}

/// An MLX error with MLX's message.
#[derive(Debug, Clone)]
pub struct MlxError(pub String);

impl std::fmt::Display for MlxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for MlxError {}

pub type Result<T> = std::result::Result<T, MlxError>;

fn check(status: i32, op: &str) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    let msg = LAST_ERROR.with(|e| e.borrow_mut().take());
    Err(MlxError(format!("{op}: {}", msg.unwrap_or_else(|| format!("MLX returned status {status}")))))
}

fn opt_int(v: i32) -> mlx_sys::mlx_optional_int {
    mlx_sys::mlx_optional_int { value: v, has_value: true }
}

fn mode_c(mode: &str) -> Result<CString> {
    CString::new(mode).map_err(|_| MlxError(format!("bad mode {mode:?}")))
}

/// An empty (null) mlx array, for optional arguments.
struct Null(mlx_sys::mlx_array);
impl Null {
    fn new() -> Self {
        Null(unsafe { mlx_sys::mlx_array_new() })
    }
}
impl Drop for Null {
    fn drop(&mut self) {
        unsafe { mlx_sys::mlx_array_free(self.0) };
    }
}

fn opt(a: Option<&Array>, null: &Null) -> mlx_sys::mlx_array {
    a.map(|a| a.as_ptr()).unwrap_or(null.0)
}

/// Runs an mlx-c op that writes one array.
fn array_op(op: &str, f: impl FnOnce(*mut mlx_sys::mlx_array) -> i32) -> Result<Array> {
    subscribe();
    let mut res = unsafe { mlx_sys::mlx_array_new() };
    let status = f(&mut res);
    if let Err(e) = check(status, op) {
        unsafe { mlx_sys::mlx_array_free(res) };
        return Err(e);
    }
    Ok(unsafe { Array::from_ptr(res) })
}

/// `mx.quantize(w, group_size, bits, mode=mode)`: `[w_q, scales]` plus
/// `biases` for `affine`.
pub fn quantize(w: &Array, group_size: i32, bits: i32, mode: &str) -> Result<Vec<Array>> {
    subscribe();
    let m = mode_c(mode)?;
    let null = Null::new();
    let stream = Stream::thread_local_or_default();
    unsafe {
        let mut vec = mlx_sys::mlx_vector_array_new();
        let status = mlx_sys::mlx_quantize(&mut vec, w.as_ptr(), opt_int(group_size), opt_int(bits), m.as_ptr(), null.0, stream.as_ptr());
        if let Err(e) = check(status, "quantize") {
            mlx_sys::mlx_vector_array_free(vec);
            return Err(e);
        }
        let n = mlx_sys::mlx_vector_array_size(vec);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut a = mlx_sys::mlx_array_new();
            mlx_sys::mlx_vector_array_get(&mut a, vec, i);
            out.push(Array::from_ptr(a));
        }
        mlx_sys::mlx_vector_array_free(vec);
        Ok(out)
    }
}

/// `mx.dequantize(w, scales, biases, group_size, bits, mode, global_scale, dtype)`.
/// With `dtype` None MLX infers it from the scales (bfloat16 for the uint8
/// scales of the fp modes), exactly as mlx.nn does.
#[allow(clippy::too_many_arguments)]
pub fn dequantize(
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    group_size: i32,
    bits: i32,
    mode: &str,
    global_scale: Option<&Array>,
    dtype: Option<Dtype>,
) -> Result<Array> {
    let m = mode_c(mode)?;
    let null = Null::new();
    let stream = Stream::thread_local_or_default();
    let dt = mlx_sys::mlx_optional_dtype {
        value: dtype.map(|d| d as u32).unwrap_or(0) as _,
        has_value: dtype.is_some(),
    };
    array_op("dequantize", |res| unsafe {
        mlx_sys::mlx_dequantize(
            res,
            w.as_ptr(),
            scales.as_ptr(),
            opt(biases, &null),
            opt_int(group_size),
            opt_int(bits),
            m.as_ptr(),
            opt(global_scale, &null),
            dt,
            stream.as_ptr(),
        )
    })
}

/// `mx.quantized_matmul(x, w, scales, biases, transpose, group_size, bits, mode)`.
#[allow(clippy::too_many_arguments)]
pub fn quantized_matmul(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    transpose: bool,
    group_size: i32,
    bits: i32,
    mode: &str,
) -> Result<Array> {
    let m = mode_c(mode)?;
    let null = Null::new();
    let stream = Stream::thread_local_or_default();
    array_op("quantized_matmul", |res| unsafe {
        mlx_sys::mlx_quantized_matmul(
            res,
            x.as_ptr(),
            w.as_ptr(),
            scales.as_ptr(),
            opt(biases, &null),
            transpose,
            opt_int(group_size),
            opt_int(bits),
            m.as_ptr(),
            stream.as_ptr(),
        )
    })
}

/// `mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, transpose,
/// group_size, bits, mode, sorted_indices)`, no lhs indices and no global
/// scale (mlx-c 0.7 passes none; see scripts/patch-mlx-c.py).
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    rhs_indices: &Array,
    transpose: bool,
    group_size: i32,
    bits: i32,
    mode: &str,
    sorted_indices: bool,
) -> Result<Array> {
    let m = mode_c(mode)?;
    let null = Null::new();
    let stream = Stream::thread_local_or_default();
    array_op("gather_qmm", |res| unsafe {
        mlx_sys::mlx_gather_qmm(
            res,
            x.as_ptr(),
            w.as_ptr(),
            scales.as_ptr(),
            opt(biases, &null),
            null.0,
            rhs_indices.as_ptr(),
            transpose,
            opt_int(group_size),
            opt_int(bits),
            m.as_ptr(),
            sorted_indices,
            stream.as_ptr(),
        )
    })
}
