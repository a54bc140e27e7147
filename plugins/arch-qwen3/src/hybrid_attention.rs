//! Gated full attention, the hybrid's attention layers (mlx-lm's
//! `Qwen3NextAttention`): every `full_attention_interval`-th layer of
//! hybrid.rs's model.
//!
//! Shapes: B batch, L new tokens, D hidden, H query heads, K kv heads,
//! hd head_dim, Hk/Hv linear key/value heads, Dk/Dv their sizes,
//! E experts, V vocab, N = B*L rows: the model carries its residual stream
//! as rows [N, D] (as plugins/nn's Decoder), so every linear gets a 2-D
//! input (MLX's matmul folds a [B, L, D] input with a Flatten + Unflatten);
//! [B, L, ...] appears only where the shape means something (the heads, the
//! conv over time, the recurrence).
use mlx_rs::{nn, Array};
use rmlx_nn::{rms_norm, split_heads_of, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, LinearLayer, Linears, Result, Weights},
    PluginError,
};

use crate::hybrid::Hybrid;

/// Gated full attention (mlx-lm's `Qwen3NextAttention`).
pub struct GatedAttention {
    /// q_proj [D] -> [H*2*hd] (per head, queries then gate), k_proj and
    /// v_proj [D] -> [K*hd]: one matmul where the format stacks them.
    qkv: Linears,
    o_proj: LinearLayer, // [H*hd] -> [D]
    q_norm: Array,       // [hd]
    k_norm: Array,       // [hd]
    rope: Rope,          // over the first hd * partial_rotary_factor dims
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    eps: f32,
}

impl GatedAttention {
    pub(crate) fn load(w: &mut Weights, p: &str, c: &Hybrid) -> Result<Self> {
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let has = w.contains(&format!("{p}.{n}.bias"));
            if has != c.attention_bias {
                return Err(PluginError::config(format!(
                    "{p}.{n}: attention_bias is {} but the checkpoint {} a bias",
                    c.attention_bias,
                    if has { "has" } else { "has no" }
                )));
            }
        }
        Ok(Self {
            qkv: w.linears(&[&format!("{p}.q_proj"), &format!("{p}.k_proj"), &format!("{p}.v_proj")])?,
            o_proj: w.linear(&format!("{p}.o_proj"))?,
            q_norm: c.norm(w, &format!("{p}.q_norm.weight"))?,
            k_norm: c.norm(w, &format!("{p}.k_norm.weight"))?,
            rope: c.rope()?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, D] -> [N, D], or [B, L, D] -> [B, L, D]; `bl` = (B, L).
    pub(crate) fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let (b, l) = bl;
        let [qg, k, v]: [Array; 3] = self.qkv.forward(x)?.try_into().map_err(|_| PluginError::other("q/k/v: three outputs expected"))?;
        let qg = qg.reshape(&[b, l, self.heads, 2 * self.head_dim])?; // [B, L, H, 2hd]
        let mut parts = qg.split_at_indices(&[self.head_dim], -1)?; // 2 x [B, L, H, hd]
        let gate = parts.pop().expect("two parts"); // [B, L, H, hd]
        let q = rms_norm(&parts.pop().expect("two parts"), &self.q_norm, self.eps)?.transpose_axes(&[0, 2, 1, 3])?; // [B, H, L, hd]
        let k = split_heads_of(&k, bl, self.kv_heads)?; // [B, K, L, hd]
        let k = rms_norm(&k, &self.k_norm, self.eps)?;
        let v = split_heads_of(&v, bl, self.kv_heads)?; // [B, K, L, hd]
        let q = self.rope.apply_at(&q, pos)?;
        let k = self.rope.apply_at(&k, pos)?;
        let scale = (self.head_dim as f32).powf(-0.5);
        let o = attn.attend(layer, q, k, v, &AttendOpts::plain(scale))?; // [B, H, L, hd]
        // gated per head, then merged: [B, H, L, hd] -> [B, L, H, hd] -> [N | B, L, H*hd]
        let o = o.transpose_axes(&[0, 2, 1, 3])?.multiply(nn::sigmoid(&gate)?)?;
        self.o_proj.forward(&o.reshape(&lead_of(x, bl))?)
    }
}

/// The shape that keeps x's leading axes and flattens the rest: [N, -1] for
/// rows [N, D], [B, L, -1] for [B, L, D].
fn lead_of(x: &Array, (b, l): (i32, i32)) -> Vec<i32> {
    if x.ndim() == 2 {
        vec![b * l, -1]
    } else {
        vec![b, l, -1]
    }
}
