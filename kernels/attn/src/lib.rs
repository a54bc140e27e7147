//! Fused GPU kernels that plugins call when the host's default device is a
//! GPU: CUDA sources through MLX's `cuda_kernel` (NVRTC-compiled at first
//! use, cached per template), Metal sources through `metal_kernel`. A kernel
//! never changes global MLX state; it runs on the default GPU stream.
//!
//! Every entry point returns `Ok(None)` where it has no kernel for the
//! backend in use (the CPU backend, say): the caller then takes its composed
//! path. [`rotated_decode`] is the first: decode attention straight over the
//! rotation KV families' codes (TurboQuant, PlanarQuant, IsoQuant, RotorQuant).
use mlx_rs::{Array, Dtype};
use std::sync::OnceLock;

mod ffi;
pub use ffi::Backend;

/// The GPU backend of the default device, if the default device is a GPU.
pub fn backend() -> Backend {
    ffi::backend()
}

/// Whether fused kernels are in use: on a GPU backend, unless
/// `RMLX_FUSED_KERNELS=0` (to measure against the composed path).
pub fn enabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("RMLX_FUSED_KERNELS").is_ok_and(|v| v == "0"));
    !off && backend() != Backend::None
}

/// The static shape of one rotated-family layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RotatedShape {
    /// Query heads and KV heads (H a multiple of K).
    pub heads: i32,
    pub kv_heads: i32,
    /// Head size (<= 256).
    pub head_dim: i32,
    /// Code bits of keys and values.
    pub k_bits: i32,
    pub v_bits: i32,
    /// Coordinates per norm of keys and values (dividing head_dim).
    pub k_group: i32,
    pub v_group: i32,
    pub block_size: i32,
}

/// Decode attention over compressed blocks, in the rotated domain.
///
/// - `q` float32 [B, H, D], already rotated;
/// - `k_codes`/`v_codes` uint32 [S, K, bits * ceil(D/32)] (bit-plane packed),
///   `k_norms`/`v_norms` [S, K, D / group] (the pools, whole);
/// - `tables` int32 [B, nblk]; `valid` bool [B, ctx];
/// - `k_levels`/`v_levels` float32 [2^bits]; `sinks` float32 [H] or None;
/// - `scale`, `softcap` (0: none).
///
/// Returns float32 [B, H, D] (rotated; the caller un-rotates), or None where
/// no kernel serves this backend or shape.
#[allow(clippy::too_many_arguments)]
pub fn rotated_decode(
    q: &Array,
    k_codes: &Array,
    k_norms: &Array,
    v_codes: &Array,
    v_norms: &Array,
    tables: &Array,
    valid: &Array,
    k_levels: &Array,
    v_levels: &Array,
    sinks: Option<&Array>,
    scale: f32,
    softcap: f32,
    s: RotatedShape,
) -> Result<Option<Array>, String> {
    let be = backend();
    if be == Backend::None
        || s.head_dim > 256
        || s.head_dim < 8
        || s.kv_heads <= 0
        || s.heads % s.kv_heads != 0
        || s.head_dim % s.k_group != 0
        || s.head_dim % s.v_group != 0
        || !(1..=8).contains(&s.k_bits)
        || !(1..=8).contains(&s.v_bits)
    {
        return Ok(None);
    }
    let (b, h) = (q.dim(0), q.dim(1));
    let params = Array::from_slice(&[scale, softcap], &[2]);
    let has_sinks = sinks.is_some();
    let sinks = match sinks {
        Some(x) => x.as_dtype(Dtype::Float32).map_err(|e| e.to_string())?,
        None => Array::from_slice(&vec![0f32; h as usize], &[h]),
    };
    let inputs = [
        q.clone(),
        k_codes.clone(),
        k_norms.clone(),
        v_codes.clone(),
        v_norms.clone(),
        tables.clone(),
        valid.clone(),
        k_levels.clone(),
        v_levels.clone(),
        params,
        sinks,
    ];
    let ints = [
        ("D", s.head_dim),
        ("H", s.heads),
        ("K", s.kv_heads),
        ("KB", s.k_bits),
        ("VB", s.v_bits),
        ("KG", s.k_group),
        ("VG", s.v_group),
        ("BS", s.block_size),
    ];
    let bools = [("HAS_SINKS", has_sinks), ("SOFTCAP", softcap > 0.0)];
    let launch = ffi::Launch {
        grid: (128, h, b),
        threads: (128, 1, 1),
        out_shape: vec![b, h, s.head_dim],
        out_dtype: Dtype::Float32,
        ints: &ints,
        bools: &bools,
    };
    let kernel = match be {
        Backend::Cuda => {
            static K: OnceLock<ffi::Kernel> = OnceLock::new();
            K.get_or_init(|| ffi::Kernel::cuda("rmlx_rotated_decode", &INPUTS, "out", include_str!("rotated_decode.cu")))
        }
        Backend::Metal => {
            static K: OnceLock<ffi::Kernel> = OnceLock::new();
            K.get_or_init(|| ffi::Kernel::metal("rmlx_rotated_decode", &INPUTS, "out", include_str!("rotated_decode.metal")))
        }
        Backend::None => return Ok(None),
    };
    kernel.apply(&inputs, &launch).map(Some)
}

const INPUTS: [&str; 11] = ["q", "kc", "kn", "vc", "vn", "tables", "valid", "klv", "vlv", "params", "sinks"];

