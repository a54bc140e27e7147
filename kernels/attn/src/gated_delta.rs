//! The gated delta rule (the Qwen3-Next / Qwen3.5 gated DeltaNet
//! recurrence) as one kernel over all T tokens of a forward, prefill
//! (T tokens) and decode (T = 1) alike: `gated_delta.cu` / `.metal`, one
//! warp per row of the float32 state, the state kept in registers from the
//! first token to the last. The composed path (plugins/nn `gated_delta.rs`,
//! one step of ops per token) is the reference.
use crate::ffi::{self, Backend};
use mlx_rs::{Array, Dtype};
use std::sync::{Mutex, OnceLock};

/// Stores a float into an element of any float type (CUDA).
const CUDA_HEADER: &str = "
template <typename T>
__device__ __forceinline__ void gd_put(T* p, float x) { *p = static_cast<T>(x); }
";

/// The same for Metal.
const METAL_HEADER: &str = "
template <typename T>
inline void gd_put(device T* p, float x) { *p = static_cast<T>(x); }
";

/// Rows of the state (warps) per thread block.
const ROWS: i32 = 4;

fn dtypes_tag(xs: &[&Array]) -> i32 {
    // Each dtype's code (< 16) in 4 bits: q, k, v, g, beta (the state is
    // float32 always).
    xs.iter().enumerate().map(|(i, x)| (x.dtype() as i32 & 15) << (4 * i)).sum()
}

/// The gated delta recurrence over T tokens:
///
/// - `q`, `k` [B, T, Hk, Dk] (normalised, the readout scale folded into q);
/// - `v` [B, T, Hv, Dv], Hv a multiple of Hk (value head h reads key head
///   h / (Hv / Hk));
/// - `g` (the decay) and `beta` [B, T, Hv];
/// - `state` [B, Hv, Dv, Dk] (cast to float32 if it is not);
/// - `mask` bool [B, T] or None: a false token leaves the state as it is
///   and its y is 0.
///
/// Returns (y [B, T, Hv, Dv] in q's dtype, state [B, Hv, Dv, Dk] float32),
/// or None where no kernel serves this backend or shape (Dk > 256, say),
/// for the caller to compose.
pub fn gated_delta(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
    mask: Option<&Array>,
) -> Result<Option<(Array, Array)>, String> {
    let be = ffi::backend();
    if be == Backend::None || q.ndim() != 4 || k.shape() != q.shape() || v.ndim() != 4 || state.ndim() != 4 {
        return Ok(None);
    }
    let (b, t, hk, dk) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (hv, dv) = (v.dim(2), v.dim(3));
    if t == 0
        || hk <= 0
        || hv % hk != 0
        || !(1..=256).contains(&dk)
        || dv <= 0
        || v.dim(0) != b
        || v.dim(1) != t
        || g.shape() != [b, t, hv]
        || beta.shape() != [b, t, hv]
        || state.shape() != [b, hv, dv, dk]
        || mask.is_some_and(|m| m.shape() != [b, t])
    {
        return Ok(None);
    }
    let x = |e: mlx_rs::error::Exception| e.to_string();
    let st = if state.dtype() == Dtype::Float32 { state.clone() } else { state.as_dtype(Dtype::Float32).map_err(x)? };
    let mut inputs = vec![q.clone(), k.clone(), v.clone(), g.clone(), beta.clone(), st];
    let mut names = vec!["q", "k", "v", "g", "beta", "state"];
    if let Some(m) = mask {
        inputs.push(if m.dtype() == Dtype::Bool { m.clone() } else { m.as_dtype(Dtype::Bool).map_err(x)? });
        names.push("mask");
    }
    let name = if mask.is_some() { "rmlx_gated_delta_mask" } else { "rmlx_gated_delta" };
    let (kernel, src) = kernel(be, name, &names)?;
    let ints = [("Hk", hk), ("Hv", hv), ("Dk", dk), ("Dv", dv), ("DTYPES", dtypes_tag(&[q, k, v, g, beta])), ("SRC", src)];
    let launch = ffi::Launch {
        grid: (32, dv, b * hv),
        threads: (32, ROWS, 1),
        out_shape: vec![b, t, hv, dv],
        out_dtype: q.dtype(),
        ints: &ints,
        bools: &[],
    };
    let state_shape = [b, hv, dv, dk];
    let mut outs = kernel.apply_outputs(&inputs, &launch, &[(&state_shape, Dtype::Float32)])?;
    let s = outs.pop().ok_or("the kernel gave no state")?;
    let y = outs.pop().ok_or("the kernel gave no output")?;
    Ok(Some((y, s)))
}

/// A 31-bit FNV-1a hash of a kernel's source: a template value, so that
/// MLX's caches (in memory and its PTX files on disk, keyed on the name and
/// the template values) never serve another version of the source.
fn source_tag(src: &str) -> i32 {
    let h = src.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    (h & 0x7fff_ffff) as i32
}

/// The kernel `name` for backend `be`, made once per process, and its
/// source's tag.
fn kernel(be: Backend, name: &'static str, names: &[&str]) -> Result<(&'static ffi::Kernel, i32), String> {
    type Cache = Mutex<Vec<(Backend, &'static str, &'static ffi::Kernel, i32)>>;
    static KERNELS: OnceLock<Cache> = OnceLock::new();
    let mut cache = KERNELS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, k, tag)) = cache.iter().find(|(kb, n, _, _)| *kb == be && *n == name) {
        return Ok((k, *tag));
    }
    let valid = if names.contains(&"mask") { "#define GD_VALID(bt) (mask[(bt)])\n" } else { "#define GD_VALID(bt) true\n" };
    let outputs = ["y", "state_out"];
    let (source, header) = match be {
        Backend::Cuda => (format!("{valid}{}", include_str!("gated_delta.cu")), CUDA_HEADER),
        Backend::Metal => (format!("{valid}{}", include_str!("gated_delta.metal")), METAL_HEADER),
        Backend::None => return Err("no GPU backend".into()),
    };
    let tag = source_tag(&format!("{header}{source}"));
    let k: &'static ffi::Kernel = Box::leak(Box::new(match be {
        Backend::Cuda => ffi::Kernel::cuda_outputs(name, names, &outputs, &source, header),
        _ => ffi::Kernel::metal_outputs(name, names, &outputs, &source, header),
    }));
    cache.push((be, name, k, tag));
    Ok((k, tag))
}
