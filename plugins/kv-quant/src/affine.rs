//! `q8`, `q4`, `q2`: mlx-lm's `QuantizedKVCache` format. Each head vector is
//! quantized with MLX's affine `quantize` in groups along head_dim (64 when
//! head_dim is a multiple of 64, else 32; other head dims are refused), and
//! attention runs `quantized_matmul` on the packed arrays, as mlx-lm's
//! `quantized_scaled_dot_product_attention` does: no dequantized copy.
//!
//! Components: `wq` uint32 [K, D*bits/32], `scales` and `biases` in the
//! activation dtype [K, D/group]. Bits per value: `bits + 32/group` with a
//! 16-bit activation dtype (q4, group 64: 4.5).
use mlx_rs::{
    ops::{dequantize, quantize, quantized_matmul},
    Array, Dtype,
};
use rmlx_plugin_api::{
    author::{
        kv::{composed_attend, Component, KvCodecImpl, LayerDims, Paged},
        Result,
    },
    PluginError,
};

pub struct Affine {
    pub name: &'static str,
    pub bits: i32,
}

impl Affine {
    /// The group size for `head_dim`: 64 or 32, whichever divides it first.
    pub fn group(&self, head_dim: i32) -> Result<i32> {
        [64, 32].into_iter().find(|g| head_dim > 0 && head_dim % g == 0).ok_or_else(|| {
            PluginError::unsupported(format!(
                "{}: head_dim {head_dim} is not a multiple of 32 (MLX's affine quantization groups are 32 or 64)",
                self.name
            ))
        })
    }

    fn expect(&self, comps: &[Array]) -> Result<()> {
        if comps.len() != 3 {
            return Err(PluginError::other(format!("{}: {} components, expected 3", self.name, comps.len())));
        }
        Ok(())
    }

    /// Components [B, T, K, ..] -> [B, K, 1, T, ..]: one matrix per kv head,
    /// broadcast over its query-head group.
    fn per_head(comps: &[Array]) -> Result<Vec<Array>> {
        comps.iter().map(|c| Ok(c.transpose_axes(&[0, 2, 1, 3])?.expand_dims(2)?)).collect()
    }
}

impl KvCodecImpl for Affine {
    fn check(&self, dims: &LayerDims) -> Result<()> {
        self.group(dims.head_dim).map(|_| ())
    }

    /// Keys and values of this family: on a GPU, decode steps go through the
    /// fused paged kernel, which reads the packed codes, scales and biases
    /// through the block tables; everything else is composed (quantized
    /// matmuls on the gathered blocks).
    fn attend(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Array> {
        if k_dims.head_dim == v_dims.head_dim && rmlx_kernels::usable("paged_decode/affine") {
            let family = rmlx_kernels::Family::Affine { bits: self.bits, group: self.group(k_dims.head_dim)? };
            if let Some(out) = rmlx_kernels::attend_decode(family, q, k_pools, v_pools, paged, k_dims)? {
                let out = out.as_dtype(q.dtype())?;
                return rmlx_kernels::verified("paged_decode/affine", out, 2e-2, || {
                    composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
                });
            }
        }
        composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
    }

    fn components(&self, dims: &LayerDims) -> Vec<Component> {
        let (k, d) = (dims.kv_heads, dims.head_dim);
        let g = self.group(d).unwrap_or(32);
        vec![
            Component::new("wq", Dtype::Uint32, &[k, d * self.bits / 32]),
            Component::new("scales", dims.dtype, &[k, d / g]),
            Component::new("biases", dims.dtype, &[k, d / g]),
        ]
    }

    /// x [N, K, D] -> wq [N, K, D*bits/32], scales, biases [N, K, D/g].
    fn encode(&self, x: &Array, dims: &LayerDims) -> Result<Vec<Array>> {
        let g = self.group(dims.head_dim)?;
        let (n, k, d) = (x.dim(0), x.dim(1), x.dim(2));
        let flat = x.as_dtype(dims.dtype)?.reshape(&[n * k, d])?;
        let (wq, scales, biases) = quantize(&flat, g, self.bits)?;
        Ok(vec![
            wq.reshape(&[n, k, d * self.bits / 32])?,
            scales.reshape(&[n, k, d / g])?,
            biases.reshape(&[n, k, d / g])?,
        ])
    }

    /// [B, T, K, ..] -> [B, K, T, D]
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        self.expect(comps)?;
        let g = self.group(dims.head_dim)?;
        let x = dequantize(&comps[0], &comps[1], &comps[2], g, self.bits)?; // [B, T, K, D]
        Ok(x.transpose_axes(&[0, 2, 1, 3])?.as_dtype(dims.dtype)?)
    }

    /// q [B, H, L, D] -> float32 [B, H, L, T] through `quantized_matmul`.
    fn scores(&self, q: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        self.expect(comps)?;
        let g = self.group(dims.head_dim)?;
        let (b, h, l, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
        let k = comps[0].dim(2);
        let w = Self::per_head(comps)?; // [B, K, 1, T, ..]
        // [B, K, H/K, L, D] x [B, K, 1, T, D]ᵀ -> [B, K, H/K, L, T]
        let qg = q.as_dtype(comps[1].dtype())?.reshape(&[b, k, h / k, l, d])?;
        let s = if dequantize_first() {
            let kd = dequantize(&w[0], &w[1], &w[2], g, self.bits)?; // [B, K, 1, T, D]
            qg.matmul(&kd.swap_axes(-1, -2)?)?
        } else {
            quantized_matmul(&qg, &w[0], &w[1], &w[2], true, g, self.bits)?
        };
        Ok(s.reshape(&[b, h, l, s.dim(-1)])?.as_dtype(Dtype::Float32)?)
    }

    /// p [B, H, L, T] -> [B, H, L, D] through `quantized_matmul`.
    fn mix(&self, p: &Array, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        self.expect(comps)?;
        let g = self.group(dims.head_dim)?;
        let (b, h, l, t) = (p.dim(0), p.dim(1), p.dim(2), p.dim(3));
        let k = comps[0].dim(2);
        let w = Self::per_head(comps)?;
        let pg = p.as_dtype(comps[1].dtype())?.reshape(&[b, k, h / k, l, t])?;
        let out = if dequantize_first() {
            pg.matmul(&dequantize(&w[0], &w[1], &w[2], g, self.bits)?)? // [B, K, H/K, L, D]
        } else {
            quantized_matmul(&pg, &w[0], &w[1], &w[2], false, g, self.bits)? // [B, K, H/K, L, D]
        };
        Ok(out.reshape(&[b, h, l, dims.head_dim])?.as_dtype(p.dtype())?)
    }
}

/// MLX's CUDA `quantized_matmul` (0.32) has no kernel for these batched
/// shapes ([B, K, H/K, L, D] against per-head pools: "No implementation for
/// problem shape" at eval, measured on an H100): there the composed path
/// dequantizes the gathered blocks for the matmul (a per-step temporary; the
/// blocks stay packed), and decode goes through the fused paged kernel,
/// which reads the packed blocks. Metal and the CPU use `quantized_matmul`,
/// as mlx-lm does.
fn dequantize_first() -> bool {
    rmlx_kernels::backend() == rmlx_kernels::Backend::Cuda
}
