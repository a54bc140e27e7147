//! `fp8`: e4m3 codes with one scale per (slot, kv head), so every head
//! vector uses the e4m3 range: `scale = max|x| / 448`, `code = e4m3(x / scale)`.
//!
//! Components: `codes` uint8 [K, D], `scales` bfloat16 [K] (bf16 has f32's
//! range, so tiny and huge heads both keep a usable scale). Bits per value:
//! `8 + 16/D` (8.125 at D = 128). Relative error per value: e4m3 has 3
//! mantissa bits, a rounding error of at most 2^-4 of the value (normals).
//!
//! On a GPU, decode steps attend through the fused paged kernel
//! (`rmlx_kernels::Family::Fp8`: e4m3 decoded in registers, no float copy).
use mlx_rs::{ops::maximum, Array, Dtype};
use rmlx_plugin_api::{
    author::{
        kv::{composed_attend, Component, KvCodecImpl, LayerDims, Paged},
        Result,
    },
    PluginError,
};

/// The largest finite e4m3 value.
const E4M3_MAX: f32 = 448.0;

pub struct Fp8;

impl KvCodecImpl for Fp8 {
    /// Keys and values of this family: on a GPU, decode steps go through the
    /// fused paged kernel, which reads the e4m3 codes and scales through the
    /// block tables; everything else composes (decode, then dense attention).
    fn attend(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Array> {
        if k_dims.head_dim == v_dims.head_dim && rmlx_kernels::usable("paged_decode/fp8") {
            if let Some(out) = rmlx_kernels::attend_decode(rmlx_kernels::Family::Fp8, q, k_pools, v_pools, paged, k_dims)? {
                let out = out.as_dtype(q.dtype())?;
                return rmlx_kernels::verified("paged_decode/fp8", out, 2e-2, || {
                    composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
                });
            }
        }
        composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
    }

    fn components(&self, dims: &LayerDims) -> Vec<Component> {
        vec![
            Component::new("codes", Dtype::Uint8, &[dims.kv_heads, dims.head_dim]),
            Component::new("scales", Dtype::Bfloat16, &[dims.kv_heads]),
        ]
    }

    /// x [N, K, D] -> codes uint8 [N, K, D], scales bf16 [N, K].
    fn encode(&self, x: &Array, _dims: &LayerDims) -> Result<Vec<Array>> {
        let xf = x.as_dtype(Dtype::Float32)?;
        let amax = xf.abs()?.max_axis(-1, true)?; // [N, K, 1]
        // Round the scale to its stored dtype first, so codes match it.
        let scale = maximum(&amax, Array::from_f32(1e-30))?
            .divide(Array::from_f32(E4M3_MAX))?
            .as_dtype(Dtype::Bfloat16)?;
        let codes = xf.divide(scale.as_dtype(Dtype::Float32)?)?.to_fp8()?;
        Ok(vec![codes, scale.squeeze_axes(&[-1])?])
    }

    /// codes [B, T, K, D], scales [B, T, K] -> [B, K, T, D]
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        if comps.len() != 2 {
            return Err(PluginError::other(format!("fp8: {} components, expected 2", comps.len())));
        }
        let scale = comps[1].as_dtype(Dtype::Float32)?.expand_dims(-1)?;
        let x = comps[0].from_fp8(Dtype::Float32)?.multiply(&scale)?;
        Ok(x.transpose_axes(&[0, 2, 1, 3])?.as_dtype(dims.dtype)?)
    }
}
