//! The rotation families' fused encode on a GPU
//! (`rmlx_kernels::rotated_encode`): one kernel per layer side and step
//! instead of the composed rotation, norms, codebook search and bit planes
//! of [`RotatedCodec::composed_encode`], which stays the CPU's path and the
//! reference. Every rotation (Hadamard, dense, Givens / quaternion / rotor
//! blocks), group norms and QJL are fused.
//!
//! Agreement with the composed path: the Hadamard and block rotations
//! follow the composed arithmetic (same butterflies and products), so codes
//! agree except where a coordinate sits within float rounding of a codebook
//! boundary; the dense rotation (head dims that are not powers of two) and
//! QJL's projection are matmuls, which MLX's CUDA backend runs in TF32 by
//! default (`MLX_ENABLE_TF32`), so there a few codes per thousand land in
//! the neighbouring cell of the composed one (the kernel computes in full
//! float32). [`RotatedCodec::encode_agree`] checks exactly that.
use crate::{
    pack::unpack,
    quant::NormMode,
    rotated::RotatedCodec,
    rotation::Rotation,
};
use mlx_rs::{Array, Dtype};
use rmlx_kernels::{EncodeConsts, EncodeRotation, EncodeSpec};
use rmlx_plugin_api::{
    author::{kv::LayerDims, Result},
    PluginError,
};
use std::sync::Arc;

/// Whether the fused encode is in use: fused kernels on (a GPU backend,
/// not `RMLX_FUSED_KERNELS=0`) and not `RMLX_FUSED_ENCODE=0` (which keeps
/// the fused decode but composes the encode, to measure the encode alone).
pub fn encode_enabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("RMLX_FUSED_ENCODE").is_ok_and(|v| v == "0"));
    !off && rmlx_kernels::enabled()
}

/// Share of codes (and QJL signs) that may sit in a neighbouring cell.
const NEIGHBOUR_SHARE: f64 = 0.01;
/// Largest relative difference of a stored norm (bf16 rounding, a
/// neighbouring code's effect on the preserved norm).
const NORM_REL: f32 = 5e-2;

impl RotatedCodec {
    /// The kernel's constants for head dim `d` (made once), or None where
    /// the kernel does not take the shape.
    fn encode_consts(&self, d: i32) -> Result<Option<Arc<EncodeConsts>>> {
        let mut gpu = self.gpu.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = gpu.get(&d) {
            return Ok(c.clone());
        }
        let p = self.prepared(d)?;
        let spec = EncodeSpec {
            head_dim: d,
            bits: self.mse_bits(),
            group: self.group_size(d),
            mids: &p.book.mids,
            levels: &p.book.levels,
            preserve: self.norm_mode == NormMode::Preserve,
            qjl: p.qjl.as_deref(),
        };
        // MLX's hadamard_transform scale: `1.0f / std::sqrt(n)` (in double).
        let rot = match &p.rot {
            Rotation::Hadamard { signs } => EncodeRotation::Hadamard { signs, scale: (1.0 / (d as f64).sqrt()) as f32 },
            Rotation::Dense { q, .. } => EncodeRotation::Dense { q },
            Rotation::Blocks { n, groups, mats, .. } => EncodeRotation::Blocks { n: *n, groups: *groups, mats },
        };
        let c = EncodeConsts::new(&spec, rot).map(Arc::new);
        gpu.insert(d, c.clone());
        Ok(c)
    }

    /// The key under which the kernel's first output is checked (one per
    /// rotation kind, with or without QJL).
    pub fn encode_key(&self, d: i32) -> Result<&'static str> {
        let p = self.prepared(d)?;
        Ok(match (&p.rot, self.qjl) {
            (Rotation::Hadamard { .. }, false) => "rotated_encode/hadamard",
            (Rotation::Hadamard { .. }, true) => "rotated_encode/hadamard+qjl",
            (Rotation::Dense { .. }, false) => "rotated_encode/dense",
            (Rotation::Dense { .. }, true) => "rotated_encode/dense+qjl",
            (Rotation::Blocks { .. }, false) => "rotated_encode/blocks",
            (Rotation::Blocks { .. }, true) => "rotated_encode/blocks+qjl",
        })
    }

    /// The fused encode of `x` [N, K, D]: the components of
    /// [`RotatedCodec::composed_encode`] (same shapes and dtypes), or None
    /// (the CPU backend, `RMLX_FUSED_KERNELS=0` or `RMLX_FUSED_ENCODE=0`, a
    /// kernel turned off by its check, a shape it does not take).
    pub fn fused_encode(&self, x: &Array, dims: &LayerDims) -> Result<Option<Vec<Array>>> {
        let d = dims.head_dim;
        if !encode_enabled() || x.ndim() != 3 || x.dim(2) != d || !rmlx_kernels::usable(self.encode_key(d)?) {
            return Ok(None);
        }
        let Some(consts) = self.encode_consts(d)? else { return Ok(None) };
        let out = rmlx_kernels::rotated_encode(x, &consts)
            .map_err(|e| PluginError::other(format!("{}: fused encode kernel: {e}", self.name)))?;
        let Some(mut comps) = out else { return Ok(None) };
        comps[1] = comps[1].as_dtype(dims.dtype)?;
        if self.qjl {
            comps[3] = comps[3].as_dtype(dims.dtype)?;
        }
        Ok(Some(comps))
    }

    /// Whether fused components `f` agree with composed ones `r` (see the
    /// module doc): Ok(None) if so, Ok(Some(why)) if not.
    pub fn encode_agree(&self, f: &[Array], r: &[Array], d: i32) -> std::result::Result<Option<String>, String> {
        let s = compare_encoded(self, f, r, d)?;
        Ok(s.failure())
    }
}

/// How far a fused encode is from the composed one.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeDiff {
    /// Codes in another cell, of `codes` codes; the largest |difference|.
    pub code_mismatch: usize,
    pub codes: usize,
    pub code_max_step: u32,
    /// QJL signs that differ, of `signs`.
    pub sign_mismatch: usize,
    pub signs: usize,
    /// Largest |f - r| / |r| over the stored norms (and QJL's).
    pub norm_rel: f32,
}

impl EncodeDiff {
    /// Why `self` is not an agreement, or None.
    pub fn failure(&self) -> Option<String> {
        let share = |m: usize, n: usize| m as f64 > (NEIGHBOUR_SHARE * n as f64).max(2.0);
        if self.code_max_step > 1 || share(self.code_mismatch, self.codes) {
            return Some(format!(
                "{} of {} codes differ, by up to {} cells",
                self.code_mismatch, self.codes, self.code_max_step
            ));
        }
        if share(self.sign_mismatch, self.signs) {
            return Some(format!("{} of {} QJL signs differ", self.sign_mismatch, self.signs));
        }
        if !(self.norm_rel <= NORM_REL) {
            return Some(format!("norms differ by {} relative", self.norm_rel));
        }
        None
    }
}

/// Compares fused `f` and composed `r` components of `codec` at head dim `d`.
pub fn compare_encoded(codec: &RotatedCodec, f: &[Array], r: &[Array], d: i32) -> std::result::Result<EncodeDiff, String> {
    let e = |e: mlx_rs::error::Exception| e.to_string();
    let want = if codec.qjl { 4 } else { 2 };
    if f.len() != want || r.len() != want {
        return Err(format!("{} fused / {} composed components, expected {want}", f.len(), r.len()));
    }
    for (a, b) in f.iter().zip(r) {
        if a.shape() != b.shape() || a.dtype() != b.dtype() {
            return Err(format!("component {:?} {:?} vs composed {:?} {:?}", a.shape(), a.dtype(), b.shape(), b.dtype()));
        }
    }
    // (mismatches, count, largest step) of two packed code arrays
    let codes = |a: &Array, b: &Array, bits: i32| -> std::result::Result<(usize, usize, u32), String> {
        let ua = unpack(a, bits, d).map_err(|x| x.to_string())?.as_dtype(Dtype::Int32).map_err(e)?;
        let ub = unpack(b, bits, d).map_err(|x| x.to_string())?.as_dtype(Dtype::Int32).map_err(e)?;
        let diff = ua.subtract(&ub).map_err(e)?.abs().map_err(e)?;
        let n = diff.size();
        let mism = diff.gt(Array::from_int(0)).map_err(e)?.as_dtype(Dtype::Int32).map_err(e)?.sum(None).map_err(e)?;
        let step = diff.max(None).map_err(e)?;
        mlx_rs::transforms::eval([&mism, &step]).map_err(e)?;
        let m = mism.try_item_exact::<i32>().map_err(|x| x.to_string())?;
        let s = if n == 0 { 0 } else { step.try_item_exact::<i32>().map_err(|x| x.to_string())? };
        Ok((m as usize, n, s as u32))
    };
    let rel = |a: &Array, b: &Array| -> std::result::Result<f32, String> {
        let (a, b) = (a.as_dtype(Dtype::Float32).map_err(e)?, b.as_dtype(Dtype::Float32).map_err(e)?);
        let den = b.abs().map_err(e)?.add(Array::from_f32(1e-6)).map_err(e)?;
        let q = a.subtract(&b).map_err(e)?.abs().map_err(e)?.divide(&den).map_err(e)?.max(None).map_err(e)?;
        q.eval().map_err(e)?;
        q.try_item_exact::<f32>().map_err(|x| x.to_string())
    };
    let (code_mismatch, n, code_max_step) = codes(&f[0], &r[0], codec.mse_bits())?;
    let mut out = EncodeDiff { code_mismatch, codes: n, code_max_step, norm_rel: rel(&f[1], &r[1])?, ..Default::default() };
    if codec.qjl {
        let (m, n, _) = codes(&f[2], &r[2], 1)?;
        out.sign_mismatch = m;
        out.signs = n;
        out.norm_rel = out.norm_rel.max(rel(&f[3], &r[3])?);
    }
    Ok(out)
}
