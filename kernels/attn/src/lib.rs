//! Fused GPU kernels that plugins call when the host's default device is a
//! GPU: CUDA sources through MLX's `cuda_kernel` (NVRTC-compiled at first
//! use, cached per template), Metal sources through `metal_kernel`. A kernel
//! never changes global MLX state; it runs on the default GPU stream, and its
//! output is a graph node like any op's.
//!
//! Every entry point returns `Ok(None)` where it has no kernel for the
//! backend in use (the CPU backend, say): the caller then takes its composed
//! path, which stays the reference the tests compare against.
//!
//! [`paged_decode`]: decode attention straight over a KV family's paged
//! blocks through the block tables (one skeleton, `paged_decode.cu` /
//! `.metal`; a prelude per family says how to read one coordinate).
//!
//! [`gated_delta`]: the gated DeltaNet recurrence of the Qwen3-Next /
//! Qwen3.5 hybrids over all of a forward's tokens in one launch
//! (`gated_delta.cu` / `.metal`).
use mlx_rs::{Array, Dtype};
use std::sync::OnceLock;

mod ffi;
mod gated_delta;
pub use ffi::Backend;
mod encode;
pub use encode::{rotated_encode, verified_parts, EncodeConsts, EncodeRotation, EncodeSpec};
pub use gated_delta::gated_delta;

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

/// How a family's slot is laid out (keys and values alike).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    /// The vectors as they are: one pool [S, K, D] (any float dtype).
    Dense,
    /// MLX affine (mlx-lm's QuantizedKVCache): codes uint32 [S, K, D*bits/32]
    /// (low bits first), scales and biases [S, K, D/group].
    Affine { bits: i32, group: i32 },
    /// The rotation families: bit-plane packed codebook codes uint32
    /// [S, K, bits * ceil(D/32)], group norms [S, K, D/group]; the query
    /// arrives rotated and the output leaves rotated.
    Rotated { bits: i32, group: i32 },
    /// `fp8`: e4m3 codes uint8 [S, K, D], one scale per (slot, kv head)
    /// [S, K] (bfloat16).
    Fp8,
}

impl Family {
    fn name(&self) -> &'static str {
        match self {
            Family::Dense => "rmlx_decode_dense",
            Family::Affine { .. } => "rmlx_decode_affine",
            Family::Rotated { .. } => "rmlx_decode_rotated",
            Family::Fp8 => "rmlx_decode_fp8",
        }
    }

    /// Input names of one side's pools, keys then values.
    fn pools(&self) -> [&'static [&'static str]; 2] {
        match self {
            Family::Dense => [&["kp"], &["vp"]],
            Family::Affine { .. } => [&["kw", "ks", "kb"], &["vw", "vs", "vb"]],
            Family::Rotated { .. } => [&["kc", "kn", "klv"], &["vc", "vn", "vlv"]],
            Family::Fp8 => [&["kc", "ks"], &["vc", "vs"]],
        }
    }

    fn ints(&self) -> Vec<(&'static str, i32)> {
        match *self {
            Family::Dense | Family::Fp8 => vec![],
            Family::Affine { bits, group } | Family::Rotated { bits, group } => vec![("BITS", bits), ("G", group)],
        }
    }

    /// Defines LOAD_K / LOAD_V for the skeleton (CUDA and Metal alike).
    fn prelude(&self) -> &'static str {
        match self {
            Family::Dense => concat!(
                "#define LOAD_K(row, i, d) static_cast<float>(kp[(row) * D + (d)])\n",
                "#define LOAD_V(row, i, d) static_cast<float>(vp[(row) * D + (d)])\n",
            ),
            Family::Affine { .. } => concat!(
                "constexpr int PERW = 32 / BITS;\n",
                "#define AFF(w, s, z, row, d) (static_cast<float>(s[(row) * (D / G) + (d) / G]) * ",
                "(float)((w[(row) * (D / PERW) + (d) / PERW] >> (((d) % PERW) * BITS)) & ((1u << BITS) - 1u)) + ",
                "static_cast<float>(z[(row) * (D / G) + (d) / G]))\n",
                "#define LOAD_K(row, i, d) AFF(kw, ks, kb, row, d)\n",
                "#define LOAD_V(row, i, d) AFF(vw, vs, vb, row, d)\n",
            ),
            Family::Rotated { .. } => concat!(
                "constexpr int WRD = (D + 31) / 32;\n",
                "#define ROT(c, n, lv, row, i, d) (lv[plane_code(c + (row) * (BITS * WRD), i, lane, BITS, WRD)] * ",
                "static_cast<float>(n[(row) * (D / G) + (d) / G]))\n",
                "#define LOAD_K(row, i, d) ROT(kc, kn, klv, row, i, d)\n",
                "#define LOAD_V(row, i, d) ROT(vc, vn, vlv, row, i, d)\n",
            ),
            Family::Fp8 => concat!(
                "#define LOAD_K(row, i, d) (e4m3_float(kc[(row) * D + (d)]) * static_cast<float>(ks[row]))\n",
                "#define LOAD_V(row, i, d) (e4m3_float(vc[(row) * D + (d)]) * static_cast<float>(vs[row]))\n",
            ),
        }
    }

    fn check(&self, d: i32) -> bool {
        match *self {
            Family::Dense | Family::Fp8 => true,
            Family::Affine { bits, group } => {
                matches!(bits, 2 | 4 | 8) && group > 0 && d % group == 0 && (d * bits) % 32 == 0
            }
            Family::Rotated { bits, group } => (1..=8).contains(&bits) && group > 0 && d % group == 0,
        }
    }
}

/// Helpers the rotated prelude calls (CUDA).
const CUDA_HEADER: &str = "
__device__ __forceinline__ uint32_t plane_code(const uint32_t* w, int i, int lane, int bits, int words) {
  uint32_t c = 0;
  for (int j = 0; j < bits; ++j) c |= ((w[j * words + i] >> lane) & 1u) << j;
  return c;
}
// e4m3 (fn: no infinities, 0x7f / 0xff NaN; bias 7) to float.
__device__ __forceinline__ float e4m3_float(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t e = (b >> 3) & 0xfu;
  const uint32_t m = b & 7u;
  if (e == 15u && m == 7u) return __uint_as_float(0x7fc00000u);
  if (e == 0u) return __uint_as_float(sign | __float_as_uint((float)m * 0.001953125f));
  return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}
";

/// The same for Metal.
const METAL_HEADER: &str = "
inline uint plane_code(const device uint32_t* w, int i, int lane, int bits, int words) {
  uint c = 0;
  for (int j = 0; j < bits; ++j) c |= ((w[j * words + i] >> lane) & 1u) << j;
  return c;
}
inline float e4m3_float(uint b) {
  const uint sign = (b & 0x80u) << 24;
  const uint e = (b >> 3) & 0xfu;
  const uint m = b & 7u;
  if (e == 15u && m == 7u) return as_type<float>(0x7fc00000u);
  if (e == 0u) return as_type<float>(sign | as_type<uint>((float)m * 0.001953125f));
  return as_type<float>(sign | ((e + 120u) << 23) | (m << 20));
}
";

/// The static shape of one layer's decode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeShape {
    /// Query heads and KV heads (H a multiple of K).
    pub heads: i32,
    pub kv_heads: i32,
    /// Head size of keys and values (<= 256).
    pub head_dim: i32,
    pub block_size: i32,
}

/// Decode attention over one family's paged pools.
///
/// - `q` float32 [B, H, D] (rotated for the rotation families);
/// - `k`/`v`: the family's pools, whole ([S, K, ...] each), plus for the
///   rotation families the codebook levels float32 [2^bits] as the last;
/// - `tables` int32 [B, nblk]; `valid` bool [B, ctx];
/// - `sinks` float [H] or None; `scale`; `softcap` (0: none).
///
/// Returns float32 [B, H, D], or None where no kernel serves this backend or
/// shape (the caller composes).
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    family: Family,
    q: &Array,
    k: &[Array],
    v: &[Array],
    tables: &Array,
    valid: &Array,
    sinks: Option<&Array>,
    scale: f32,
    softcap: f32,
    s: DecodeShape,
) -> Result<Option<Array>, String> {
    launch_decode(family, q, k, v, tables, valid, sinks, scale, softcap, s, false)
}

/// Decode attention over contiguous dense buffers, one sequence per row:
/// `q` [B, H, 1, D] (any float dtype), `keys`/`values` [B, K, CTX, D] (the
/// compiled step's buffers, engine/compiled.rs), `valid` bool [B, CTX]
/// (which slots each row's query sees: the filled ones). Some([B, H, 1, D])
/// in q's dtype on a GPU with the fused kernels on; None otherwise (the
/// caller composes). Unlike MLX's fused `sdpa_vector`, which serves one
/// query only without an array mask, this takes the mask as data, so a
/// fixed-capacity (compiled) step keeps one kernel per layer.
#[allow(clippy::too_many_arguments)]
pub fn contiguous_decode(
    q: &Array,
    keys: &Array,
    values: &Array,
    valid: &Array,
    sinks: Option<&Array>,
    scale: f32,
    softcap: f32,
) -> Result<Option<Array>, String> {
    if !enabled() || q.ndim() != 4 || q.dim(2) != 1 || keys.ndim() != 4 || values.shape() != keys.shape() {
        return Ok(None);
    }
    let (b, h, d) = (q.dim(0), q.dim(1), q.dim(3));
    let (kv_heads, ctx) = (keys.dim(1), keys.dim(2));
    if keys.dim(0) != b || keys.dim(3) != d || valid.shape() != [b, ctx] {
        return Ok(None);
    }
    let x = |e: mlx_rs::error::Exception| e.to_string();
    let qf = q.as_dtype(Dtype::Float32).map_err(x)?.reshape(&[b, h, d]).map_err(x)?;
    let tables = Array::from_slice(&[0i32], &[1, 1]);
    let shape = DecodeShape { heads: h, kv_heads, head_dim: d, block_size: 1 };
    let out = launch_decode(Family::Dense, &qf, std::slice::from_ref(keys), std::slice::from_ref(values), &tables, valid, sinks, scale, softcap, shape, true)?;
    match out {
        Some(o) => Ok(Some(o.reshape(&[b, h, 1, d]).map_err(x)?.as_dtype(q.dtype()).map_err(x)?)),
        None => Ok(None),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_decode(
    family: Family,
    q: &Array,
    k: &[Array],
    v: &[Array],
    tables: &Array,
    valid: &Array,
    sinks: Option<&Array>,
    scale: f32,
    softcap: f32,
    s: DecodeShape,
    head_major: bool,
) -> Result<Option<Array>, String> {
    let be = backend();
    let [kn, vn] = family.pools();
    if be == Backend::None
        || !(8..=256).contains(&s.head_dim)
        || s.kv_heads <= 0
        || s.heads % s.kv_heads != 0
        || s.block_size <= 0
        || !family.check(s.head_dim)
        || k.len() != kn.len()
        || v.len() != vn.len()
        || q.ndim() != 3
    {
        return Ok(None);
    }
    let (b, h) = (q.dim(0), q.dim(1));
    let f32 = |a: &Array| a.as_dtype(Dtype::Float32).map_err(|e| e.to_string());
    let sinks_in = match sinks {
        Some(x) => f32(x)?,
        None => Array::from_slice(&vec![0f32; h as usize], &[h]),
    };
    let mut inputs = vec![f32(q)?];
    inputs.extend(k.iter().cloned());
    inputs.extend(v.iter().cloned());
    inputs.extend([tables.clone(), valid.clone(), Array::from_slice(&[scale, softcap], &[2]), sinks_in]);
    let mut names: Vec<&str> = vec!["q"];
    names.extend(kn);
    names.extend(vn);
    names.extend(["tables", "valid", "params", "sinks"]);
    let mut ints = vec![("D", s.head_dim), ("H", s.heads), ("K", s.kv_heads), ("BS", s.block_size)];
    ints.extend(family.ints());
    let bools = [("HAS_SINKS", sinks.is_some()), ("SOFTCAP", softcap > 0.0), ("HEAD_MAJOR", head_major)];
    let launch = ffi::Launch {
        grid: (128, h, b),
        threads: (128, 1, 1),
        out_shape: vec![b, h, s.head_dim],
        out_dtype: Dtype::Float32,
        ints: &ints,
        bools: &bools,
    };
    static KERNELS: OnceLock<std::sync::Mutex<Vec<(Backend, &'static str, &'static ffi::Kernel)>>> = OnceLock::new();
    let mut cache = KERNELS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let kernel = match cache.iter().find(|(kb, n, _)| *kb == be && *n == family.name()) {
        Some((_, _, k)) => *k,
        None => {
            let k: &'static ffi::Kernel = Box::leak(Box::new(match be {
                Backend::Cuda => ffi::Kernel::cuda(
                    family.name(),
                    &names,
                    "out",
                    &format!("{}{}", family.prelude(), include_str!("paged_decode.cu")),
                    CUDA_HEADER,
                ),
                Backend::Metal => ffi::Kernel::metal(
                    family.name(),
                    &names,
                    "out",
                    &format!("{}{}", family.prelude(), include_str!("paged_decode.metal")),
                    METAL_HEADER,
                ),
                Backend::None => return Ok(None),
            }));
            cache.push((be, family.name(), k));
            k
        }
    };
    drop(cache);
    kernel.apply(&inputs, &launch).map(Some)
}

/// bool [B, ctx]: which positions each row's one query sees, from a paged
/// batch's mask (bool [B, 1, 1, ctx]) or, without one, all `ctx` of them.
pub fn decode_valid(mask: Option<&Array>, b: i32, ctx: i32) -> Result<Array, String> {
    match mask {
        Some(m) => m.reshape(&[b, ctx]).map_err(|e| e.to_string()),
        None => mlx_rs::ops::ones::<bool>(&[b, ctx]).map_err(|e| e.to_string()),
    }
}

/// [`paged_decode`] for a family plugin's `attend`: `q` [B, H, L, D] in any
/// float dtype, keys and values of `dims` read from the pools through
/// `paged`. Some(float32 [B, H, 1, D]) on a GPU for a decode step (L = 1);
/// None otherwise (prefill, the CPU backend, `RMLX_FUSED_KERNELS=0`, a shape
/// the kernel does not take), for the caller to compose.
pub fn attend_decode(
    family: Family,
    q: &Array,
    k: &[Array],
    v: &[Array],
    paged: &rmlx_plugin_api::author::kv::Paged,
    dims: &rmlx_plugin_api::author::kv::LayerDims,
) -> rmlx_plugin_api::author::Result<Option<Array>> {
    use rmlx_plugin_api::PluginError;
    if !enabled() || q.ndim() != 4 || q.dim(2) != 1 || q.dim(3) != dims.head_dim {
        return Ok(None);
    }
    let (b, h, d) = (q.dim(0), q.dim(1), q.dim(3));
    let err = |e: String| PluginError::other(format!("fused decode kernel: {e}"));
    let valid = decode_valid(paged.mask, b, paged.ctx).map_err(err)?;
    let shape = DecodeShape { heads: h, kv_heads: dims.kv_heads, head_dim: d, block_size: paged.block_size };
    let o = q.as_dtype(Dtype::Float32)?.reshape(&[b, h, d])?;
    let out = paged_decode(family, &o, k, v, paged.tables, &valid, paged.opts.sinks, paged.opts.scale, paged.opts.softcap, shape)
        .map_err(err)?;
    Ok(match out {
        Some(o) => Some(o.reshape(&[b, h, 1, d])?),
        None => None,
    })
}

/// Whether a kernel has been checked against its composed path in this
/// process: 0 not yet, 1 agreed, 2 disagreed or failed (then off for good).
static CHECKED: std::sync::Mutex<Vec<(&'static str, u8)>> = std::sync::Mutex::new(Vec::new());

fn checked(key: &'static str) -> u8 {
    let v = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    v.iter().find(|(k, _)| *k == key).map_or(0, |(_, s)| *s)
}

fn set_checked(key: &'static str, state: u8) {
    let mut v = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    match v.iter_mut().find(|(k, _)| *k == key) {
        Some(e) => e.1 = state,
        None => v.push((key, state)),
    }
}

/// Whether the kernel `key` may still run (not turned off by a failed check).
pub fn usable(key: &'static str) -> bool {
    checked(key) != 2
}

/// The first output of kernel `key` in this process is checked against the
/// composed path on the same inputs before it is used: a kernel that fails
/// to compile or run, or disagrees (beyond `rel_tol` of the reference's
/// largest magnitude), is turned off for the process with one line on
/// stderr, and that call answers with the reference. Later calls trust it.
pub fn verified(
    key: &'static str,
    fused: Array,
    rel_tol: f32,
    composed: impl FnOnce() -> rmlx_plugin_api::author::Result<Array>,
) -> rmlx_plugin_api::author::Result<Array> {
    if checked(key) == 1 {
        return Ok(fused);
    }
    let reference = composed()?;
    let agree = (|| -> Result<(bool, f32), String> {
        let x = |e: mlx_rs::error::Exception| e.to_string();
        let f = fused.as_dtype(Dtype::Float32).map_err(x)?;
        let r = reference.as_dtype(Dtype::Float32).map_err(x)?;
        let err = f.subtract(&r).map_err(x)?.abs().map_err(x)?.max(None).map_err(x)?;
        let mag = r.abs().map_err(x)?.max(None).map_err(x)?;
        mlx_rs::transforms::eval([&err, &mag]).map_err(x)?;
        let item = |a: &Array| a.try_item_exact::<f32>().map_err(|e| e.to_string());
        let (e, m) = (item(&err)?, item(&mag)?);
        Ok((e.is_finite() && e <= rel_tol * m.max(1e-6) + 1e-5, e))
    })();
    match agree {
        Ok((true, _)) => {
            set_checked(key, 1);
            Ok(fused)
        }
        Ok((false, e)) => {
            set_checked(key, 2);
            eprintln!("rmlx-kernels: {key} differs from the composed path (max error {e}); using the composed path");
            Ok(reference)
        }
        Err(e) => {
            set_checked(key, 2);
            eprintln!("rmlx-kernels: {key} failed ({e}); using the composed path");
            Ok(reference)
        }
    }
}
