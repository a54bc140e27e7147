//! The gated DeltaNet layer, the hybrid's linear-attention layers: its
//! input projections (qwen3_next's fused, qwen3_5's split) over plugins/nn's
//! gated_delta.rs, and the mask of the batched prefill's left padding.
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, Hk/Hv linear key/value heads, Dk/Dv their sizes,
//! E experts, V vocab, N = B*L rows: the model carries its residual stream
//! as rows [N, D] (as plugins/nn's Decoder), so every linear gets a 2-D
//! input (MLX's matmul folds a [B, L, D] input with a Flatten + Unflatten);
//! [B, L, ...] appears only where the shape means something (the heads, the
//! conv over time, the recurrence).
use mlx_rs::Array;
use rmlx_nn::gated_delta::GatedDeltaNet;
use rmlx_plugin_api::{
    author::{Attend, Linears, Result, Weights},
    PluginError,
};

use crate::hybrid::{Hybrid, Projections};

/// [B, L, ...] from rows [N, ...]; an input already [B, L, ...] as it is.
fn unfold_rows(t: Array, (b, l): (i32, i32), rows: bool) -> Result<Array> {
    if !rows {
        return Ok(t);
    }
    let mut shape = vec![b, l];
    shape.extend_from_slice(&t.shape()[1..]);
    Ok(t.reshape(&shape)?)
}

/// The input projections of a gated DeltaNet layer, all of x: one matmul
/// where the weight format stacks them (`Weights::linears`), else one each.
enum DeltaInput {
    /// qwen3_next: qkvz [D] -> [2*Hk*Dk + 2*Hv*Dv] and ba [D] -> [2*Hv], each
    /// grouped per key head (q, k, v, z and b, a of that head's group).
    Fused(Linears),
    /// qwen3_5: qkv [D] -> [C], z [D] -> [Hv*Dv], b and a [D] -> [Hv].
    Split(Linears),
}

pub struct DeltaLayer {
    input: DeltaInput,
    net: GatedDeltaNet,
}

impl DeltaLayer {
    pub(crate) fn load(w: &mut Weights, p: &str, c: &Hybrid) -> Result<Self> {
        let lin = |w: &mut Weights, names: &[&str]| {
            let full: Vec<String> = names.iter().map(|n| format!("{p}.{n}")).collect();
            w.linears(&full.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let input = match c.projections {
            Projections::Fused => DeltaInput::Fused(lin(w, &["in_proj_qkvz", "in_proj_ba"])?),
            Projections::Split => DeltaInput::Split(lin(w, &["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"])?),
        };
        Ok(Self { input, net: GatedDeltaNet::load_layout(w, p, c.delta, c.hf_layout)? })
    }

    /// x: [N, D] -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    pub(crate) fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, attn: &mut dyn Attend) -> Result<Array> {
        let d = self.net.dims();
        let (bsz, l) = bl;
        let rows = x.ndim() == 2;
        let (qkv, z, b, a) = match &self.input {
            DeltaInput::Fused(proj) => {
                let [qkvz, ba]: [Array; 2] = parts(proj.forward(x)?)?; // [N | B, L, ...]
                // mlx-lm's fix_query_key_value_ordering: per key head, the
                // group holds q [Dk], k [Dk], v [r*Dv], z [r*Dv] (r = Hv/Hk).
                let (nk, r) = (d.k_heads, d.v_heads / d.k_heads);
                let g = qkvz.reshape(&[bsz, l, nk, -1])?; // [B, L, Hk, 2Dk + 2rDv]
                let s = g.split_at_indices(&[d.k_dim, 2 * d.k_dim, 2 * d.k_dim + r * d.v_dim], -1)?;
                let flat = |t: &Array| t.reshape(&[bsz, l, -1]);
                let qkv = rmlx_nn::concatenate(&[flat(&s[0])?, flat(&s[1])?, flat(&s[2])?], -1)?; // [B, L, C]
                let z = s[3].reshape(&[bsz * l, d.value_dim()])?; // [N, Hv*Dv]
                let ba = ba.reshape(&[bsz, l, nk, -1])?; // [B, L, Hk, 2r]
                let s = ba.split_at_indices(&[r], -1)?;
                (qkv, z, s[0].reshape(&[bsz, l, d.v_heads])?, s[1].reshape(&[bsz, l, d.v_heads])?)
            }
            // One matmul: its rows [N, C + Hv*Dv + 2Hv] unfold to [B, L, ...]
            // once, before the split (one reshape where qkv, b and a took
            // one each; z goes back to rows for the gated norm).
            DeltaInput::Split(Linears::Fused(proj, sizes)) if rows => {
                let y = proj.forward(x)?.reshape(&[bsz, l, -1])?; // [B, L, C + Hv*Dv + 2Hv]
                let mut at = 0;
                let cuts: Vec<i32> = sizes[..sizes.len() - 1].iter().map(|n| { at += n; at }).collect();
                let [qkv, z, b, a]: [Array; 4] = parts(y.split_at_indices(&cuts, -1)?)?;
                (qkv, z.reshape(&[bsz * l, -1])?, b, a) // [B, L, C], [N, Hv*Dv], [B, L, Hv] x 2
            }
            DeltaInput::Split(proj) => {
                let [qkv, z, b, a]: [Array; 4] = parts(proj.forward(x)?)?;
                (
                    unfold_rows(qkv, bl, rows)?, // [B, L, C]
                    z,                           // [N | B, L, Hv*Dv]
                    unfold_rows(b, bl, rows)?,   // [B, L, Hv]
                    unfold_rows(a, bl, rows)?,   // [B, L, Hv]
                )
            }
        };
        let (qkv, b, a) = mask_padding(qkv, b, a, attn)?;
        let y = self.net.mix(&qkv, &z, &b, &a, layer, attn)?; // [N, D]
        unfold_rows(y, bl, !rows) // back to x's rank: [N, D] | [B, L, D]
    }
}

/// The outputs of a `Linears`, as many as asked for.
fn parts<const K: usize>(outs: Vec<Array>) -> Result<[Array; K]> {
    outs.try_into().map_err(|_| PluginError::other(format!("the input projections: {K} outputs expected")))
}

/// What `a` and `b` become at padding: softplus(-1e4 + dt_bias) is 0, so
/// the decay exp(-exp(A_log) * 0) is exactly 1, and sigmoid(-1e4) is 0
/// (beta 0: nothing is written). Finite, so every dtype holds it.
const PAD_GATE: f32 = -1e4;

/// Ragged rows (the host's batched prefill, `PagedForward::ragged`): rows
/// are LEFT-padded to the longest, and a padded row's positions start below
/// 0 (`Attend::offsets` is its cached tokens minus its padding), so column i
/// of row b is padding where offsets[b] + i < 0. There the conv input is
/// zero and the recurrence leaves the state as it was (decay 1, beta 0;
/// mlx-lm's `mx.where(mask, ...)` on `mixed_qkv` and the state). With a
/// fresh row (zero conv state) this is exact: the conv sees zeros before
/// the row's first token either way. A row that resumes a state never
/// comes padded (the host pads only rows that start fresh; offsets >= 0
/// then mask nothing). One row or one token per row has no padding.
/// qkv [B, L, C], b, a [B, L, Hv] -> the same, masked.
fn mask_padding(qkv: Array, b: Array, a: Array, attn: &dyn Attend) -> Result<(Array, Array, Array)> {
    let (bsz, l) = (qkv.dim(0), qkv.dim(1));
    if bsz == 1 || l == 1 {
        return Ok((qkv, b, a));
    }
    let cols = mlx_rs::ops::arange::<_, i32>(0, l, None)?.reshape(&[1, l])?; // [1, L]
    let pos = attn.offsets().reshape(&[bsz, 1])?.add(&cols)?; // [B, L]: each column's position
    let real = pos.ge(Array::from_int(0))?.expand_dims(-1)?; // bool [B, L, 1]
    let qkv = mlx_rs::ops::select(&real, &qkv, Array::from_f32(0.0).as_dtype(qkv.dtype())?)?;
    let gate = |x: &Array| -> Result<Array> {
        Ok(mlx_rs::ops::select(&real, x, Array::from_f32(PAD_GATE).as_dtype(x.dtype())?)?)
    };
    Ok((qkv, gate(&b)?, gate(&a)?))
}
