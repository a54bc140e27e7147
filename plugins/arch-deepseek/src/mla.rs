//! Multi-head Latent Attention, DeepSeek-V2/V3's attention (mlx-lm's
//! `DeepseekV3Attention`), over a KV cache of latents.
//!
//! Per token the layer computes a latent c = RMSNorm(kv_a(x)[:r]) of
//! `kv_lora_rank` r and one RoPE key k_pe = rope(kv_a(x)[r:]) of
//! `qk_rope_head_dim` shared by every head. Head h's key is
//! [W_k^h c ; k_pe] and its value W_v^h c, with W_k^h [nope, r] and
//! W_v^h [v, r] the two halves of `kv_b_proj`. Its score for query
//! [q_nope ; q_pe] is scale * (q_nope . W_k^h c + q_pe . k_pe)
//! = scale * ([W_k^h^T q_nope ; q_pe] . [c ; k_pe]): so the cache keeps
//! [c ; k_pe] as one KV head (every query head reads it, as GQA with one
//! group), the queries are absorbed (`embed_q`: q_nope -> W_k^h^T q_nope),
//! the values are the same [c ; k_pe], and the output's first r channels,
//! the attention-weighted latent, go through W_v^h (`unembed_out`). This is
//! mlx-lm's own decode path (L = 1); its prefill expands keys and values
//! per head instead, the same numbers up to float rounding. The cache then
//! holds r + qk_rope_head_dim values per token and layer (576 for V3)
//! instead of heads x (qk_head_dim + v_head_dim), and key and value head
//! sizes never differ.
//!
//! Weights: `q_a_proj`, `q_a_layernorm`, `q_b_proj` (or `q_proj`),
//! `kv_a_proj_with_mqa`, `kv_a_layernorm`, `o_proj`, and either mlx-lm's
//! per-head `embed_q` [H, r, nope] and `unembed_out` [H, v, r] (switch
//! layers: H "experts" in whatever format the checkpoint has) or Hugging
//! Face's `kv_b_proj` [H * (nope + v), r], split into those at load (its
//! dense weight read back through the layer itself, so any format works).
//!
//! Shapes: B batch, L new tokens, N = B*L rows (the residual stream,
//! deepseek_v3.rs), D hidden, H heads, r kv_lora_rank, nope
//! qk_nope_head_dim, rope qk_rope_head_dim, v v_head_dim.
use mlx_rs::{ops, Array, Dtype};
use rmlx_nn::{merge_heads_to_rows, rms_norm, split_heads_of, Positions, Rope};
use rmlx_plugin_api::{
    author::{Attend, AttendOpts, LinearLayer, Result, SwitchLayer, Weights},
    PluginError,
};

/// mlx-lm builds `q_a_layernorm` and `kv_a_layernorm` with this eps,
/// whatever `rms_norm_eps` says.
const LORA_NORM_EPS: f32 = 1e-6;

/// One layer's attention sizes.
#[derive(Debug, Clone)]
pub struct MlaDims {
    pub heads: i32,
    /// None: one `q_proj`.
    pub q_lora_rank: Option<i32>,
    pub kv_lora_rank: i32,
    pub qk_nope_head_dim: i32,
    pub qk_rope_head_dim: i32,
    pub v_head_dim: i32,
    /// The softmax scale (deepseek_v3.rs `softmax_scale`).
    pub scale: f32,
}

impl MlaDims {
    fn q_head_dim(&self) -> i32 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// The query projection: low-rank with a norm between, or one linear.
enum Query {
    LowRank {
        q_a_proj: LinearLayer,  // [D] -> [q_lora_rank]
        q_a_layernorm: Array,   // [q_lora_rank]
        q_b_proj: LinearLayer,  // [q_lora_rank] -> [H * (nope + rope)]
    },
    Full(LinearLayer), // q_proj: [D] -> [H * (nope + rope)]
}

/// One matrix per head: [H] x ([in] -> [out]).
enum PerHead {
    /// [H, in, out], float.
    Dense(Array),
    /// H "experts" of weight [H, out, in] in the checkpoint's format.
    Switch(SwitchLayer),
}

impl PerHead {
    /// x: [B, H, L, in] -> [B, H, L, out]
    fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            PerHead::Dense(w) => Ok(x.matmul(w)?),
            PerHead::Switch(layer) => {
                let (b, h, l) = (x.dim(0), x.dim(1), x.dim(2));
                let xs = x.transpose_axes(&[0, 2, 1, 3])?.expand_dims(-2)?; // [B, L, H, 1, in]
                let heads = Array::from_slice(&(0..h as u32).collect::<Vec<_>>(), &[h]);
                let idx = ops::broadcast_to(&heads, &[b, l, h])?; // [B, L, H]: head h reads "expert" h
                let y = layer.forward(&xs, &idx, false)?; // [B, L, H, 1, out]
                Ok(y.squeeze_axes(&[-2])?.transpose_axes(&[0, 2, 1, 3])?) // [B, H, L, out]
            }
        }
    }
}

pub struct Mla {
    query: Query,
    kv_a_proj_with_mqa: LinearLayer, // [D] -> [r + rope]
    kv_a_layernorm: Array,           // [r]
    embed_q: PerHead,                // H x ([nope] -> [r])
    unembed_out: PerHead,            // H x ([r] -> [v])
    o_proj: LinearLayer,             // [H * v] -> [D]
    dims: MlaDims,
    rope: Rope, // over the rope channels
}

impl Mla {
    /// `p`: the layer's `self_attn`.
    pub fn load(w: &mut Weights, p: &str, dims: MlaDims, rope: Rope) -> Result<Self> {
        let d = &dims;
        let query = match d.q_lora_rank {
            Some(_) => Query::LowRank {
                q_a_proj: w.linear(&format!("{p}.q_a_proj"))?,
                q_a_layernorm: w.tensor(&format!("{p}.q_a_layernorm.weight"))?,
                q_b_proj: w.linear(&format!("{p}.q_b_proj"))?,
            },
            None => Query::Full(w.linear(&format!("{p}.q_proj"))?),
        };
        let q_out = match &query {
            Query::LowRank { q_b_proj, .. } => q_b_proj.0.dims().1,
            Query::Full(q_proj) => q_proj.0.dims().1,
        };
        if q_out as i32 != d.heads * d.q_head_dim() {
            return Err(PluginError::config(format!(
                "{p}: the query projection gives {q_out} features; the config says {} heads x {}",
                d.heads,
                d.q_head_dim()
            )));
        }
        let kv_a_proj_with_mqa = w.linear(&format!("{p}.kv_a_proj_with_mqa"))?;
        let kv_a_layernorm = w.tensor(&format!("{p}.kv_a_layernorm.weight"))?;
        let (embed_q, unembed_out) = if w.contains(&format!("{p}.embed_q.weight")) {
            let embed_q = w.switch_linear(&format!("{p}.embed_q"))?;
            let unembed_out = w.switch_linear(&format!("{p}.unembed_out"))?;
            let (h, r, nope, v) = (d.heads as u32, d.kv_lora_rank as u32, d.qk_nope_head_dim as u32, d.v_head_dim as u32);
            if embed_q.dims() != (h, nope, r) || unembed_out.dims() != (h, r, v) {
                return Err(PluginError::config(format!(
                    "{p}: embed_q is {:?} and unembed_out {:?} (heads, in, out); the config says ({h}, {nope}, {r}) and ({h}, {r}, {v})",
                    embed_q.dims(),
                    unembed_out.dims()
                )));
            }
            (PerHead::Switch(embed_q), PerHead::Switch(unembed_out))
        } else {
            split_kv_b_proj(w, p, d, kv_a_layernorm.dtype())?
        };
        Ok(Self { query, kv_a_proj_with_mqa, kv_a_layernorm, embed_q, unembed_out, o_proj: w.linear(&format!("{p}.o_proj"))?, dims, rope })
    }

    /// x: [N, D], N = B*L -> [N, D]; `bl` = (B, L).
    pub fn forward(&self, x: &Array, bl: (i32, i32), layer: u32, pos: &Positions, attn: &mut dyn Attend) -> Result<Array> {
        let d = &self.dims;
        let (b, l) = bl;
        let q = match &self.query {
            Query::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                q_b_proj.forward(&rms_norm(&q_a_proj.forward(x)?, q_a_layernorm, LORA_NORM_EPS)?)?
            }
            Query::Full(q_proj) => q_proj.forward(x)?,
        }; // [N, H * (nope + rope)]
        let q = split_heads_of(&q, bl, d.heads)?; // [B, H, L, nope + rope]
        let q = q.split_at_indices(&[d.qk_nope_head_dim], -1)?; // [B, H, L, nope], [B, H, L, rope]
        let kv = self.kv_a_proj_with_mqa.forward(x)?; // [N, r + rope]
        let kv = kv.split_at_indices(&[d.kv_lora_rank], -1)?; // [N, r], [N, rope]
        let latent = rms_norm(&kv[0], &self.kv_a_layernorm, LORA_NORM_EPS)?.reshape(&[b, 1, l, d.kv_lora_rank])?; // [B, 1, L, r]
        let k_pe = kv[1].reshape(&[b, 1, l, d.qk_rope_head_dim])?; // [B, 1, L, rope]
        let q_pe = self.rope.apply_at(&q[1], pos)?; // [B, H, L, rope]
        let k_pe = self.rope.apply_at(&k_pe, pos)?; // [B, 1, L, rope]
        let q_abs = self.embed_q.forward(&q[0])?; // [B, H, L, r]
        let q = ops::concatenate(&[q_abs, q_pe.as_dtype(q[0].dtype())?], -1)?; // [B, H, L, r + rope]
        let k = ops::concatenate(&[latent, k_pe.as_dtype(q.dtype())?], -1)?.as_dtype(q.dtype())?; // [B, 1, L, r + rope]
        let o = attn.attend(layer, q, k.clone(), k, &AttendOpts::plain(d.scale))?; // [B, H, L, r + rope]
        let o = o.split_at_indices(&[d.kv_lora_rank], -1)?; // the weighted latent [B, H, L, r], the rest
        let o = self.unembed_out.forward(&o[0])?; // [B, H, L, v]
        self.o_proj.forward(&merge_heads_to_rows(&o)?) // [N, H * v] -> [N, D]
    }
}

/// Hugging Face's `kv_b_proj` [H * (nope + v), r] as the per-head
/// `embed_q` [H, nope, r] and `unembed_out` [H, r, v] (in -> out), as
/// mlx-lm's `sanitize` splits it. Its dense weight is read through the
/// layer (`kv_b_proj(I_r)` = W^T), so the checkpoint's format does not
/// matter; `dtype` is the compute dtype.
fn split_kv_b_proj(w: &mut Weights, p: &str, d: &MlaDims, dtype: Dtype) -> Result<(PerHead, PerHead)> {
    let kv_b = w.linear(&format!("{p}.kv_b_proj"))?;
    let (h, r, nope, v) = (d.heads, d.kv_lora_rank, d.qk_nope_head_dim, d.v_head_dim);
    let (inp, out) = { let t = kv_b.0.dims(); (t.0, t.1) };
    if (inp as i32, out as i32) != (r, h * (nope + v)) {
        return Err(PluginError::config(format!(
            "{p}.kv_b_proj maps {inp} -> {out}; the config says kv_lora_rank {r} -> heads {h} x (qk_nope_head_dim {nope} + v_head_dim {v})"
        )));
    }
    let eye = Array::eye::<f32>(r, None, None)?.as_dtype(dtype)?; // [r, r]
    let wt = kv_b.forward(&eye)?; // [r, H * (nope + v)] = W^T
    let per_head = wt.reshape(&[r, h, nope + v])?.transpose_axes(&[1, 0, 2])?; // [H, r, nope + v]
    let parts = per_head.split_at_indices(&[nope], -1)?; // [H, r, nope], [H, r, v]
    let embed_q = parts[0].swap_axes(-1, -2)?; // [H, nope, r]
    Ok((PerHead::Dense(embed_q), PerHead::Dense(parts[1].clone())))
}
