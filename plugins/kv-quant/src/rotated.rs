//! The rotation families' codec: a seeded orthogonal rotation, then the
//! per-vector norm + Lloyd-Max scalar quantizer ([`crate::quant`]), optionally
//! with a 1-bit QJL residual (TurboQuant_prod, arXiv 2504.19874 §3.2).
//!
//! Components per slot (K kv heads, D head dim, W(b) = b * ceil(D/32)):
//! - `codes`  uint32 [K, W(b')]: the bit-plane packed codes ([`crate::pack`]),
//!   b' = b, or b - 1 with QJL;
//! - `norms`  activation dtype [K, D/G]: the norm of each group of G rotated
//!   coordinates ([`NormMode`]); G = D (one norm per vector) unless the
//!   family quantizes in groups (G must divide D, else G = D);
//! - with QJL: `qjl_signs` uint32 [K, W(1)], the signs of `S r` for the
//!   rotated unit residual `r = y - ĉ` and a seeded Gaussian `S` [D, D], and
//!   `qjl_norms` activation dtype [K], `||r||`.
//!
//! Attention never leaves the rotated domain per token: `scores` rotates the
//! query once (`s = (q R)·(norm · ĉ)`) and `mix` un-rotates the output once
//! per head (`out = (Σ p · norm · ĉ) Rᵀ`). The QJL term is the paper's unbiased
//! estimator `<z, r> ≈ sqrt(π/2)/D · ||r|| · <S z, sign(S r)>`.
use crate::{
    codebook::{qjl_const, sphere_codebook, Codebook},
    pack::{pack, unpack, words},
    quant::{levels, norm_keep, quantize, safe_div, NormMode},
    rotation::{Rng, Rotation},
};
use mlx_rs::{ops::matmul, Array, Dtype};
use rmlx_plugin_api::{
    author::{
        kv::{composed_attend, gqa_matmul, Component, KvCodecImpl, LayerDims, Paged},
        Result,
    },
    PluginError,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// What one head dim needs: computed once, then shared.
pub struct Prepared {
    pub rot: Rotation,
    pub book: Codebook,
    /// QJL's `S` [D, D] row-major.
    pub qjl: Option<Vec<f32>>,
}

/// A rotation family of `bits` bits per coordinate.
pub struct RotatedCodec {
    pub name: &'static str,
    pub bits: i32,
    pub qjl: bool,
    pub norm_mode: NormMode,
    /// Coordinates per norm (None: the whole vector).
    pub group: Option<i32>,
    seed: u64,
    rotation: fn(i32, u64) -> Rotation,
    cache: Mutex<HashMap<i32, Arc<Prepared>>>,
    /// The fused encode kernel's constants per head dim (None: no kernel
    /// for that shape), see [`crate::rotated_gpu`].
    pub(crate) gpu: Mutex<HashMap<i32, Option<Arc<rmlx_kernels::EncodeConsts>>>>,
}

impl RotatedCodec {
    pub fn new(name: &'static str, bits: i32, qjl: bool, norm_mode: NormMode, seed: u64, rotation: fn(i32, u64) -> Rotation) -> Self {
        // QJL's estimator is unbiased only against the raw norm.
        let norm_mode = if qjl { NormMode::Raw } else { norm_mode };
        Self {
            name,
            bits,
            qjl,
            norm_mode,
            group: None,
            seed,
            rotation,
            cache: Mutex::new(HashMap::new()),
            gpu: Mutex::new(HashMap::new()),
        }
    }

    /// One norm per `group` rotated coordinates (QJL keeps one per vector).
    pub fn with_group(mut self, group: i32) -> Self {
        if !self.qjl {
            self.group = Some(group);
        }
        self
    }

    /// The group size at head dim `d`.
    pub fn group_size(&self, d: i32) -> i32 {
        match self.group {
            Some(g) if g >= 8 && d % g == 0 => g,
            _ => d,
        }
    }

    /// Bits of the codebook codes (one fewer with QJL).
    pub fn mse_bits(&self) -> i32 {
        self.bits - self.qjl as i32
    }

    /// The rotation, codebook and QJL matrix for head dim `d`.
    pub fn prepared(&self, d: i32) -> Result<Arc<Prepared>> {
        if d < 8 {
            return Err(PluginError::unsupported(format!("{}: head_dim {d} is too small (at least 8)", self.name)));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&d) {
            return Ok(p.clone());
        }
        let qjl = self.qjl.then(|| {
            let mut rng = Rng::new(self.seed ^ 0x514A_4C00);
            (0..d * d).map(|_| rng.normal() as f32).collect()
        });
        let p = Arc::new(Prepared {
            rot: (self.rotation)(d, self.seed),
            book: sphere_codebook(self.group_size(d) as usize, self.mse_bits() as u32),
            qjl,
        });
        cache.insert(d, p.clone());
        Ok(p)
    }

    fn s_matrix(p: &Prepared, d: i32) -> Array {
        Array::from_slice(p.qjl.as_deref().unwrap_or(&[]), &[d, d])
    }

    /// The rotated vectors `norm · ĉ` [B, T, K, D] and, with QJL, the signs
    /// ±1 [B, T, K, D].
    fn unpack_all(&self, comps: &[Array], p: &Prepared, d: i32) -> Result<(Array, Option<Array>)> {
        self.expect(comps)?;
        let c = levels(&unpack(&comps[0], self.mse_bits(), d)?, &p.book)?;
        let c = self.scale_groups(&c, &comps[1], d)?;
        let sg = if self.qjl {
            let bits = unpack(&comps[2], 1, d)?.as_dtype(Dtype::Float32)?;
            Some(bits.multiply(Array::from_f32(2.0))?.subtract(Array::from_f32(1.0))?)
        } else {
            None
        };
        Ok((c, sg))
    }

    /// `c` [.., D] times the group norms `n` [.., D/G] (activation dtype).
    fn scale_groups(&self, c: &Array, n: &Array, d: i32) -> Result<Array> {
        let g = self.group_size(d);
        let n = n.as_dtype(Dtype::Float32)?;
        let shape = c.shape().to_vec();
        let mut split = shape[..shape.len() - 1].to_vec();
        split.extend([d / g, g]);
        Ok(c.reshape(&split)?.multiply(n.expand_dims(-1)?)?.reshape(&shape)?)
    }

    /// Decode attention (one query per row) through the fused GPU kernel
    /// (`rmlx_kernels::paged_decode`): codes read in place through the
    /// block tables, nothing decoded to full precision. None where it does
    /// not apply (the CPU backend, prefill, QJL, keys and values of
    /// different head sizes): the caller composes.
    #[allow(clippy::too_many_arguments)]
    fn fused_decode(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Option<Array>> {
        let d = k_dims.head_dim;
        if self.qjl || q.dim(2) != 1 || v_dims.head_dim != d || !rmlx_kernels::enabled() {
            return Ok(None);
        }
        let p = self.prepared(d)?;
        let qr = p.rot.forward(&q.as_dtype(Dtype::Float32)?)?; // [B, H, 1, D], rotated
        let lv = Array::from_slice(&p.book.levels, &[p.book.levels.len() as i32]);
        let family = rmlx_kernels::Family::Rotated { bits: self.mse_bits(), group: self.group_size(d) };
        let (k, v) = ([k_pools[0].clone(), k_pools[1].clone(), lv.clone()], [v_pools[0].clone(), v_pools[1].clone(), lv]);
        let Some(out) = rmlx_kernels::attend_decode(family, &qr, &k, &v, paged, k_dims)? else { return Ok(None) };
        // rotated [B, H, 1, D], un-rotated once per head
        Ok(Some(p.rot.inverse(&out)?.as_dtype(q.dtype())?))
    }

    /// The composed encode (the CPU's path and the fused kernel's
    /// reference): x [N, K, D] -> codes [N, K, W], norms [N, K, D/G]
    /// (+ qjl_signs [N, K, W(1)], qjl_norms [N, K]).
    pub fn composed_encode(&self, x: &Array, dims: &LayerDims) -> Result<Vec<Array>> {
        let d = dims.head_dim;
        let p = self.prepared(d)?;
        let g = self.group_size(d);
        let (n, k) = (x.dim(0), x.dim(1));
        // rotate, then one norm per group: [N, K, D/G, G]
        let z = p.rot.forward(x)?.reshape(&[n, k, d / g, g])?;
        let norm = norm_keep(&z)?; // [N, K, D/G, 1]
        let y = safe_div(&z, &norm)?; // unit groups
        let (codes, c) = quantize(&y, &p.book)?;
        let stored = match self.norm_mode {
            NormMode::Raw => norm.clone(),
            NormMode::Preserve => safe_div(&norm, &norm_keep(&c)?)?,
        };
        let (codes, y, c) = (codes.reshape(&[n, k, d])?, y.reshape(&[n, k, d])?, c.reshape(&[n, k, d])?);
        let mut out = vec![pack(&codes, self.mse_bits())?, stored.squeeze_axes(&[-1])?.as_dtype(dims.dtype)?];
        if self.qjl {
            let r = y.subtract(&c)?; // [N, K, D]
            let proj = matmul(&r, Self::s_matrix(&p, d).t())?; // S r
            let signs = proj.ge(Array::from_f32(0.0))?.as_dtype(Dtype::Uint32)?;
            out.push(pack(&signs, 1)?);
            out.push(norm_keep(&r)?.squeeze_axes(&[-1])?.as_dtype(dims.dtype)?);
        }
        Ok(out)
    }

    fn expect(&self, comps: &[Array]) -> Result<()> {
        let want = if self.qjl { 4 } else { 2 };
        if comps.len() != want {
            return Err(PluginError::other(format!("{}: {} components, expected {want}", self.name, comps.len())));
        }
        Ok(())
    }
}

/// `x` [B, H, L, T] times a per-(row, token, kv head) factor `w` [B, T, K],
/// query head h using kv head h / (H / K).
pub fn per_kv(x: &Array, w: &Array) -> Result<Array> {
    let (b, h, l, t) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let k = w.dim(2);
    let w = w.as_dtype(Dtype::Float32)?.transpose_axes(&[0, 2, 1])?.reshape(&[b, k, 1, 1, t])?;
    Ok(x.reshape(&[b, k, h / k, l, t])?.multiply(&w)?.reshape(&[b, h, l, t])?)
}

impl KvCodecImpl for RotatedCodec {
    /// A per-layer, per-head mean (`rmlx kv-calibrate`): the rotation and
    /// the codebook then see what differs from the mean, which is where they
    /// lose little (ANALYSIS.md: most of a small model's key norm is shared).
    fn calibration(&self) -> Option<String> {
        Some("mean".into())
    }

    fn check(&self, dims: &LayerDims) -> Result<()> {
        self.prepared(dims.head_dim).map(|_| ())
    }

    /// Keys and values of this family: on a GPU, decode steps go through the
    /// fused kernel over the packed codes; everything else is composed.
    fn attend(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Array> {
        if rmlx_kernels::usable("paged_decode/rotated") {
            if let Some(out) = self.fused_decode(q, k_pools, v_pools, paged, k_dims, v_dims)? {
                return rmlx_kernels::verified("paged_decode/rotated", out, 2e-2, || {
                    composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
                });
            }
        }
        composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
    }

    fn components(&self, dims: &LayerDims) -> Vec<Component> {
        let (k, d) = (dims.kv_heads, dims.head_dim);
        let mut c = vec![
            Component::new("codes", Dtype::Uint32, &[k, words(d, self.mse_bits())]),
            Component::new("norms", dims.dtype, &[k, d / self.group_size(d)]),
        ];
        if self.qjl {
            c.push(Component::new("qjl_signs", Dtype::Uint32, &[k, words(d, 1)]));
            c.push(Component::new("qjl_norms", dims.dtype, &[k]));
        }
        c
    }

    /// x [N, K, D] -> codes [N, K, W], norms [N, K, D/G] (+ qjl_signs,
    /// qjl_norms): on a GPU through the fused encode kernel (checked against
    /// [`RotatedCodec::composed_encode`] on its first call in the process),
    /// else composed.
    fn encode(&self, x: &Array, dims: &LayerDims) -> Result<Vec<Array>> {
        if let Some(fused) = self.fused_encode(x, dims)? {
            let key = self.encode_key(dims.head_dim)?;
            return rmlx_kernels::verified_parts(
                key,
                fused,
                |f, r| self.encode_agree(f, r, dims.head_dim),
                || self.composed_encode(x, dims),
            );
        }
        self.composed_encode(x, dims)
    }

    /// [B, T, K, ..] -> [B, K, T, D]
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let d = dims.head_dim;
        let p = self.prepared(d)?;
        let (mut c, sg) = self.unpack_all(comps, &p, d)?; // norm · ĉ [B, T, K, D]
        if let Some(sg) = sg {
            // norm · r̂, r̂ = sqrt(π/2)/D · ||r|| · Sᵀ sign(S r)
            let w = comps[1].squeeze_axes(&[-1])?.multiply(&comps[3])?.as_dtype(Dtype::Float32)?;
            let w = w.multiply(Array::from_f32(qjl_const() / d as f32))?; // [B, T, K]
            c = c.add(matmul(&sg, Self::s_matrix(&p, d))?.multiply(w.expand_dims(-1)?)?)?;
        }
        let x = p.rot.inverse(&c)?;
        Ok(x.transpose_axes(&[0, 2, 1, 3])?.as_dtype(dims.dtype)?)
    }

    /// q [B, H, L, D] -> float32 [B, H, L, T]: `(q R)·(norm · ĉ)` (+ QJL term).
    fn scores(&self, q: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let d = dims.head_dim;
        let p = self.prepared(d)?;
        let (c, sg) = self.unpack_all(comps, &p, d)?; // [B, T, K, D]
        let qr = p.rot.forward(q)?; // [B, H, L, D]
        let mut s = gqa_matmul(&qr, &c.transpose_axes(&[0, 2, 3, 1])?)?; // [B, H, L, T]
        if let Some(sg) = sg {
            let qs = matmul(&qr, Self::s_matrix(&p, d).t())?; // S z
            let s2 = gqa_matmul(&qs, &sg.transpose_axes(&[0, 2, 3, 1])?)?;
            // norms [B, T, K, 1] (QJL: one group)
            let w = comps[1].squeeze_axes(&[-1])?.multiply(&comps[3])?.as_dtype(Dtype::Float32)?;
            s = s.add(per_kv(&s2, &w.multiply(Array::from_f32(qjl_const() / d as f32))?)?)?;
        }
        Ok(s)
    }

    /// p [B, H, L, T] -> [B, H, L, D]: `(Σ_t p · norm · ĉ) Rᵀ`, one inverse rotation per head.
    fn mix(&self, p: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let d = dims.head_dim;
        let prep = self.prepared(d)?;
        let (c, sg) = self.unpack_all(comps, &prep, d)?; // norm · ĉ [B, T, K, D]
        let pf = p.as_dtype(Dtype::Float32)?;
        let mut out = gqa_matmul(&pf, &c.transpose_axes(&[0, 2, 1, 3])?)?; // [B, H, L, D]
        if let Some(sg) = sg {
            let norm = comps[1].squeeze_axes(&[-1])?.as_dtype(Dtype::Float32)?; // [B, T, K]
            let w = norm.multiply(&comps[3].as_dtype(Dtype::Float32)?)?.multiply(Array::from_f32(qjl_const() / d as f32))?;
            let acc = gqa_matmul(&per_kv(&pf, &w)?, &sg.transpose_axes(&[0, 2, 1, 3])?)?; // Σ p w sign
            out = out.add(matmul(&acc, Self::s_matrix(&prep, d))?)?;
        }
        Ok(prep.rot.inverse(&out)?.as_dtype(p.dtype())?)
    }
}
