//! The baseline KV-cache family: every slot holds its head vectors as they
//! are, in `f16`, `bf16` or `f32` (`f16` etc. as users type them; the host
//! picks the one equal to the model's activation dtype by default).
//!
//! Attention over keys and values both of this family: decode steps on a GPU
//! go through the fused paged kernel (`rmlx_kernels`, reading the blocks in
//! place); otherwise MLX's fused `scaled_dot_product_attention` on the
//! gathered blocks (with its sinks);
//! a soft-capped call, and a pair with another family, go through the
//! composed path (`author::kv::composed_attend`).
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    Array, Dtype,
};
use rmlx_plugin_api::{
    author::{
        kv::{composed_attend, gather_blocks, Component, KvCodecImpl, LayerDims, Paged},
        PluginImpl, Result,
    },
    export_plugin, Manifest, PluginError,
};

/// The family names, with their storage dtype.
pub const FAMILIES: &[(&str, Dtype)] = &[("f16", Dtype::Float16), ("bf16", Dtype::Bfloat16), ("f32", Dtype::Float32)];

/// Keys or values stored in `dtype`: one component `x` [K, D] per slot.
pub struct Dense {
    pub dtype: Dtype,
}

impl KvCodecImpl for Dense {
    fn components(&self, dims: &LayerDims) -> Vec<Component> {
        vec![Component::new("x", self.dtype, &[dims.kv_heads, dims.head_dim])]
    }

    /// x [N, K, D] -> [N, K, D] in the family's dtype.
    fn encode(&self, x: &Array, _dims: &LayerDims) -> Result<Vec<Array>> {
        Ok(vec![x.as_dtype(self.dtype)?])
    }

    /// [B, T, K, D] -> [B, K, T, D]
    fn decode(&self, comps: &[Array], dims: &LayerDims) -> Result<Array> {
        let x = comps.first().ok_or_else(|| PluginError::other("dense KV: no component"))?;
        Ok(x.transpose_axes(&[0, 2, 1, 3])?.as_dtype(dims.dtype)?)
    }

    fn attend(
        &self,
        q: &Array,
        k_pools: &[Array],
        v_pools: &[Array],
        paged: &Paged,
        k_dims: &LayerDims,
        v_dims: &LayerDims,
    ) -> Result<Array> {
        // Decode on a GPU: the fused paged kernel reads the blocks through
        // the tables (no gather copy), soft-cap and sinks included.
        if k_dims.head_dim == v_dims.head_dim && rmlx_kernels::usable("paged_decode/dense") {
            if let Some(out) = rmlx_kernels::attend_decode(rmlx_kernels::Family::Dense, q, k_pools, v_pools, paged, k_dims)? {
                let out = out.as_dtype(q.dtype())?;
                return rmlx_kernels::verified("paged_decode/dense", out, 2e-2, || {
                    composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims)
                });
            }
        }
        if paged.opts.softcap > 0.0 {
            return composed_attend(self, self, q, k_pools, v_pools, paged, k_dims, v_dims);
        }
        // [B, ctx, K, D] -> [B, K, ctx, D] in q's dtype
        let get = |pools: &[Array]| -> Result<Array> {
            let x = gather_blocks(pools, paged)?.remove(0).transpose_axes(&[0, 2, 1, 3])?;
            Ok(if x.dtype() != q.dtype() { x.as_dtype(q.dtype())? } else { x })
        };
        let (keys, values) = (get(k_pools)?, get(v_pools)?);
        let sinks = match paged.opts.sinks {
            Some(s) => Some(s.as_dtype(q.dtype())?),
            None => None,
        };
        let mask = match paged.mask {
            Some(m) => Some(ScaledDotProductAttentionMask::Array(m)),
            None => (q.dim(2) > 1).then_some(ScaledDotProductAttentionMask::Causal),
        };
        Ok(scaled_dot_product_attention(q, &keys, &values, paged.opts.scale, mask, sinks.as_ref())?)
    }
}

/// The codec of a family by name.
pub fn codec(name: &str) -> Option<Dense> {
    FAMILIES.iter().find(|(n, _)| *n == name).map(|&(_, dtype)| Dense { dtype })
}

pub struct KvDense;

impl PluginImpl for KvDense {
    fn manifest() -> Manifest {
        let names: Vec<&str> = FAMILIES.iter().map(|(n, _)| *n).collect();
        Manifest::new("kv-dense", env!("CARGO_PKG_VERSION"), "KV cache stored as it is: f16, bf16, f32").kv_families(&names)
    }

    fn kv_codec(name: &str) -> Result<Box<dyn KvCodecImpl>> {
        codec(name)
            .map(|c| Box::new(c) as Box<dyn KvCodecImpl>)
            .ok_or_else(|| PluginError::unsupported(format!("kv-dense has no family {name}")))
    }
}

export_plugin!(KvDense);
