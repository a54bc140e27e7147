//! Fused encode of the rotation families (kv-quant's `rotated.rs`): a
//! step's new key or value vectors [N, K, D] -> packed codes and norms in one
//! kernel (`rotated_encode.cu` / `.metal`) instead of the ~70 composed
//! primitives per layer side (rotation, norms, codebook search, bit planes).
//!
//! The kernel writes one uint32 array [N, K, TOT] (codes, then norms as
//! float bits, then QJL's signs and residual norm); [`rotated_encode`]
//! splits it into the family's components (one split, one bit view).
use crate::{ffi, Backend};
use mlx_rs::{Array, Dtype};
use std::sync::{Mutex, OnceLock};

/// The rotation of a family, as the kernel applies it (`y = x R`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EncodeRotation<'a> {
    /// `y = H (s ⊙ x) * scale`: Walsh-Hadamard (natural order, as MLX's
    /// `hadamard_transform`), `D` a power of two.
    Hadamard { signs: &'a [f32], scale: f32 },
    /// Block-diagonal: `groups` blocks `[n, n]` row-major (`y_g = M_g x_g`);
    /// coordinates past `groups * n` pass unchanged.
    Blocks { n: i32, groups: i32, mats: &'a [f32] },
    /// A dense orthogonal `[D, D]` row-major (`y = x Q`).
    Dense { q: &'a [f32] },
}

/// What a family's encode needs besides its rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeSpec<'a> {
    pub head_dim: i32,
    /// Codebook bits (without the QJL bit).
    pub bits: i32,
    /// Rotated coordinates per norm (divides `head_dim`; `head_dim` with QJL).
    pub group: i32,
    /// Codebook boundaries ascending (`2^bits - 1`) and levels (`2^bits`).
    pub mids: &'a [f32],
    pub levels: &'a [f32],
    /// Store `norm / ||levels||` instead of the norm.
    pub preserve: bool,
    /// QJL's `S` [D, D] row-major: signs of `S r` and `||r||` are added.
    pub qjl: Option<&'a [f32]>,
}

/// The kernel's constant inputs (rotation, codebook, scale, QJL matrix), made
/// once per family and head dim by the caller and passed to every call.
pub struct EncodeConsts {
    arrays: [Array; 4],
    ints: Vec<(&'static str, i32)>,
    bools: [(&'static str, bool); 2],
    tot: i32,
    spec: (i32, i32, i32, bool),
}

// The arrays are immutable constants (evaluated once, read by kernels).
unsafe impl Sync for EncodeConsts {}

impl EncodeConsts {
    /// None where the kernel does not take this shape (head_dim outside
    /// 8..=256, a group that does not divide it, bits outside 1..=8).
    pub fn new(spec: &EncodeSpec, rot: EncodeRotation) -> Option<Self> {
        let d = spec.head_dim;
        let nl = 1usize << spec.bits.clamp(0, 8);
        let qjl_ok = spec.qjl.is_none_or(|s| s.len() == (d * d) as usize && spec.group == d);
        if !(8..=256).contains(&d)
            || !(1..=8).contains(&spec.bits)
            || spec.group <= 0
            || d % spec.group != 0
            || spec.levels.len() != nl
            || spec.mids.len() != nl - 1
            || !qjl_ok
        {
            return None;
        }
        let (kind, bn, bg, rot_arr, scale) = match rot {
            EncodeRotation::Hadamard { signs, scale } => {
                if d & (d - 1) != 0 || signs.len() != d as usize {
                    return None;
                }
                (0, 1, 0, Array::from_slice(signs, &[d]), scale)
            }
            EncodeRotation::Blocks { n, groups, mats } => {
                if n <= 0 || groups < 0 || groups * n > d || mats.len() != (groups * n * n) as usize {
                    return None;
                }
                let arr = if mats.is_empty() { Array::from_slice(&[0f32], &[1]) } else { Array::from_slice(mats, &[groups * n * n]) };
                (1, n, groups, arr, 1.0)
            }
            EncodeRotation::Dense { q } => {
                if q.len() != (d * d) as usize {
                    return None;
                }
                (2, 1, 0, Array::from_slice(q, &[d * d]), 1.0)
            }
        };
        let mut cb = spec.mids.to_vec();
        cb.extend_from_slice(spec.levels);
        let s = match spec.qjl {
            Some(s) => Array::from_slice(s, &[d * d]),
            None => Array::from_slice(&[0f32], &[1]),
        };
        let words = (d + 31) / 32;
        let tot = spec.bits * words + d / spec.group + if spec.qjl.is_some() { words + 1 } else { 0 };
        Some(EncodeConsts {
            arrays: [rot_arr, Array::from_slice(&cb, &[cb.len() as i32]), Array::from_slice(&[scale], &[1]), s],
            ints: vec![("D", d), ("BITS", spec.bits), ("G", spec.group), ("ROT", kind), ("BN", bn), ("BG", bg)],
            bools: [("QJL", spec.qjl.is_some()), ("PRESERVE", spec.preserve)],
            tot,
            spec: (d, spec.bits, spec.group, spec.qjl.is_some()),
        })
    }
}

const NAME: &str = "rmlx_rotated_encode";
const INPUTS: [&str; 5] = ["x", "rot", "cb", "params", "s"];

fn kernel(be: Backend) -> Option<&'static ffi::Kernel> {
    static KERNELS: OnceLock<Mutex<Vec<(Backend, &'static ffi::Kernel)>>> = OnceLock::new();
    let mut cache = KERNELS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = cache.iter().find(|(b, _)| *b == be) {
        return Some(*k);
    }
    let k: &'static ffi::Kernel = Box::leak(Box::new(match be {
        Backend::Cuda => ffi::Kernel::cuda(NAME, &INPUTS, "out", include_str!("rotated_encode.cu"), ""),
        Backend::Metal => ffi::Kernel::metal(NAME, &INPUTS, "out", include_str!("rotated_encode.metal"), ""),
        Backend::None => return None,
    }));
    cache.push((be, k));
    Some(k)
}

/// Encode `x` [N, K, D] (any float dtype) with the family of `consts`:
/// Some([codes uint32 [N, K, bits * ceil(D/32)], norms float32 [N, K, D/G]])
/// plus, with QJL, [signs uint32 [N, K, ceil(D/32)], residual norms float32
/// [N, K]]: the components in the layout kv-quant's composed encode writes
/// (norms still to be cast to the activation dtype). None on the CPU backend
/// or for a shape the kernel does not take (the caller composes).
pub fn rotated_encode(x: &Array, consts: &EncodeConsts) -> Result<Option<Vec<Array>>, String> {
    let be = crate::backend();
    let (d, bits, group, qjl) = consts.spec;
    if be == Backend::None || x.ndim() != 3 || x.dim(2) != d || x.size() == 0 {
        return Ok(None);
    }
    let Some(k) = kernel(be) else { return Ok(None) };
    let (n, kv) = (x.dim(0), x.dim(1));
    let e = |e: mlx_rs::error::Exception| e.to_string();
    // float32 input unless already half/bfloat (the kernel reads any float)
    let xin = match x.dtype() {
        Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16 => x.clone(),
        _ => x.as_dtype(Dtype::Float32).map_err(e)?,
    };
    let mut inputs = vec![xin];
    inputs.extend(consts.arrays.iter().cloned());
    let launch = ffi::Launch {
        grid: (32 * n * kv, 1, 1),
        threads: (32, 1, 1),
        out_shape: vec![n, kv, consts.tot],
        out_dtype: Dtype::Uint32,
        ints: &consts.ints,
        bools: &consts.bools,
    };
    let out = k.apply(&inputs, &launch)?;
    let words = (d + 31) / 32;
    let (wc, ng) = (bits * words, d / group);
    let mut cuts = vec![wc, wc + ng];
    if qjl {
        cuts.push(wc + ng + words);
    }
    let parts = out.split_at_indices(&cuts, -1).map_err(e)?;
    let f = |a: &Array| a.view_dtype(Dtype::Float32).map_err(e);
    let mut comps = vec![parts[0].clone(), f(&parts[1])?];
    if qjl {
        comps.push(parts[2].clone());
        comps.push(f(&parts[3])?.squeeze_axes(&[-1]).map_err(e)?);
    }
    Ok(Some(comps))
}

/// [`crate::verified`] for a kernel with several outputs: the first call in
/// the process is checked by `agree(fused, reference)` (Ok(None): agreed;
/// Ok(Some(why)): disagreed), after which a kernel that failed or disagreed
/// is off for the process (one line on stderr) and that call answers with
/// the reference.
pub fn verified_parts(
    key: &'static str,
    fused: Vec<Array>,
    agree: impl FnOnce(&[Array], &[Array]) -> Result<Option<String>, String>,
    composed: impl FnOnce() -> rmlx_plugin_api::author::Result<Vec<Array>>,
) -> rmlx_plugin_api::author::Result<Vec<Array>> {
    if crate::checked(key) == 1 {
        return Ok(fused);
    }
    let reference = composed()?;
    match agree(&fused, &reference) {
        Ok(None) => {
            crate::set_checked(key, 1);
            Ok(fused)
        }
        Ok(Some(why)) => {
            crate::set_checked(key, 2);
            eprintln!("rmlx-kernels: {key} differs from the composed path ({why}); using the composed path");
            Ok(reference)
        }
        Err(e) => {
            crate::set_checked(key, 2);
            eprintln!("rmlx-kernels: {key} failed ({e}); using the composed path");
            Ok(reference)
        }
    }
}
