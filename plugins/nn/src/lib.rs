//! Building blocks shared by architecture plugins, mirroring mlx / mlx-lm:
//! RoPE (default, linear, llama3 scaling), RMSNorm, SwiGLU, config helpers,
//! and the decoder-only transformer (decoder.rs) that llama, qwen2 and qwen3
//! share, and the mixture-of-experts layers (moe.rs). Nothing here names a
//! weight format.
pub mod decoder;
pub mod gated_delta;
pub mod gemma;
pub mod head;
pub mod moe;
pub mod shared_expert;
pub mod yarn;

use mlx_rs::{fast, nn, ops, Array};
use rmlx_plugin_api::{
    author::{Attend, Output, Result},
    PluginError,
};
use serde::de::DeserializeOwned;

/// Parses config.json text into an architecture's config struct with a clear error.
pub fn parse_config<T: DeserializeOwned>(json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| PluginError::config(format!("config.json: {e}")))
}

/// Refuses the first config key of `fields` that is not positive, by name.
pub fn require_positive(fields: &[(&str, i32)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v <= 0) {
        Some((k, v)) => Err(PluginError::config(format!("{k} must be positive, got {v}"))),
        None => Ok(()),
    }
}

/// Refuses query heads that do not group over the KV heads (GQA).
pub fn require_grouped_heads(heads: i32, kv_heads: i32) -> Result<()> {
    if kv_heads <= 0 || heads % kv_heads != 0 {
        return Err(PluginError::config(format!(
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )));
    }
    Ok(())
}

/// mlx.fast.rms_norm over the last axis.
pub fn rms_norm(x: &Array, weight: &Array, eps: f32) -> Result<Array> {
    Ok(fast::rms_norm(x, Some(weight), eps)?)
}

/// silu(gate) * up, as mlx-lm's swiglu: compiled (shapeless), so MLX fuses
/// the sigmoid and both products into one kernel (one primitive per layer
/// where `nn::silu` and a separate multiply made two). Same rounding: the
/// fused kernel keeps each intermediate in its dtype.
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array> {
    let f = |(g, u): (&Array, &Array)| -> std::result::Result<Array, mlx_rs::error::Exception> { g.multiply(nn::sigmoid(g)?)?.multiply(u) };
    let mut fused = mlx_rs::transforms::compile::compile(f, true);
    Ok(fused((gate, up))?)
}

/// max(x, 0)², as mlx.nn.relu2 (the zero in x's dtype, so bf16 stays bf16).
pub fn relu2(x: &Array) -> Result<Array> {
    let zero = Array::from_f32(0.0).as_dtype(x.dtype())?;
    Ok(ops::maximum(x, &zero)?.square()?)
}

/// Rotary position embedding as mlx-lm's `initialize_rope` builds it.
pub struct Rope {
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    freqs: Option<Array>,
    /// YaRN's attention factor: x[..., :dims] is multiplied by it first (1: none).
    mscale: f32,
}

impl Rope {
    /// `scaling`: config.json's `rope_scaling` (null for none).
    pub fn new(dims: i32, base: f32, traditional: bool, scaling: Option<&serde_json::Value>) -> Result<Self> {
        let plain = |scale| Rope { dims, traditional, base: Some(base), scale, freqs: None, mscale: 1.0 };
        let Some(cfg) = scaling.filter(|v| !v.is_null()) else {
            return Ok(plain(1.0));
        };
        let get = |k: &str| cfg.get(k).and_then(|v| v.as_f64());
        let kind = cfg
            .get("type")
            .or_else(|| cfg.get("rope_type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        match kind {
            "default" => Ok(plain(1.0)),
            "linear" => {
                let factor = get("factor").ok_or_else(|| PluginError::config("rope_scaling linear needs `factor`"))?;
                Ok(plain((1.0 / factor) as f32))
            }
            "llama3" => {
                let factor = get("factor").ok_or_else(|| PluginError::config("rope_scaling llama3 needs `factor`"))?;
                let low = get("low_freq_factor").unwrap_or(1.0);
                let high = get("high_freq_factor").unwrap_or(4.0);
                let old_ctx = get("original_max_position_embeddings").unwrap_or(8192.0);
                let freqs = llama3_freqs(dims, base as f64, factor, low, high, old_ctx);
                let freqs = Array::from_slice(&freqs, &[freqs.len() as i32]);
                Ok(Rope { dims, traditional, base: None, scale: 1.0, freqs: Some(freqs), mscale: 1.0 })
            }
            other => Err(PluginError::config(format!("unsupported rope_scaling type `{other}`"))),
        }
    }

    /// As `new`, also building mlx-lm's `YarnRoPE` for the `yarn` types
    /// (`yarn`, `deepseek_yarn`, `telechat3-yarn`: `factor`, and optionally
    /// `original_max_position_embeddings`, `beta_fast`, `beta_slow`,
    /// `mscale`, `mscale_all_dim`, with mlx-lm's defaults). Architectures
    /// whose mlx-lm file reaches YaRN through `initialize_rope` call this
    /// (`new` still refuses yarn for those whose tests say so).
    pub fn with_yarn(dims: i32, base: f32, traditional: bool, scaling: Option<&serde_json::Value>) -> Result<Self> {
        let Some(cfg) = scaling.filter(|v| !v.is_null()) else {
            return Self::new(dims, base, traditional, scaling);
        };
        let kind = cfg.get("type").or_else(|| cfg.get("rope_type")).and_then(|v| v.as_str()).unwrap_or("default");
        if !matches!(kind, "yarn" | "deepseek_yarn" | "telechat3-yarn") {
            return Self::new(dims, base, traditional, scaling);
        }
        let y = yarn::Yarn::from_config(cfg)?;
        let (freqs, mscale) = y.freqs(dims, base as f64);
        let freqs = Array::from_slice(&freqs, &[freqs.len() as i32]);
        Ok(Rope { dims, traditional, base: None, scale: 1.0, freqs: Some(freqs), mscale })
    }

    /// x[..., :dims] times YaRN's mscale (x itself when it is 1).
    fn pre_scale(&self, x: &Array) -> Result<Array> {
        if self.mscale == 1.0 {
            return Ok(x.clone());
        }
        let m = Array::from_f32(self.mscale).as_dtype(x.dtype())?;
        if x.dim(-1) == self.dims {
            return Ok(x.multiply(&m)?);
        }
        let parts = x.split_at_indices(&[self.dims], -1)?; // [.., dims], [.., rest]
        Ok(ops::concatenate(&[parts[0].multiply(&m)?, parts[1].clone()], -1)?)
    }

    /// x: [B, heads, L, head_dim], positions offset.. offset+L.
    pub fn apply(&self, x: &Array, offset: i32) -> Result<Array> {
        let x = self.pre_scale(x)?;
        Ok(fast::rope(&x, self.dims, self.traditional, self.base, self.scale, offset, self.freqs.as_ref())?)
    }

    /// x: [B, heads, L, head_dim], row b at positions pos[b].. pos[b]+L.
    pub fn apply_at(&self, x: &Array, pos: &Positions) -> Result<Array> {
        match pos {
            Positions::Scalar(o) => self.apply(x, *o),
            Positions::PerRow(offsets) => {
                let x = self.pre_scale(x)?;
                Ok(fast::rope_dynamic(&x, self.dims, self.traditional, self.base, self.scale, offsets, self.freqs.as_ref())?)
            }
            Positions::Rotations { cos, sin } => rotate_half_rope(x, cos, sin),
        }
    }
}

/// x * cos + rotate_half(x) * sin over the whole head, rotate_half pairing
/// channel i with i + hd/2 (Hugging Face's `apply_rotary_pos_emb`).
/// x: [B, H, L, hd], cos/sin: [B, 1, L, hd] -> [B, H, L, hd]
pub fn rotate_half_rope(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let (cos, sin) = (cos.as_dtype(x.dtype())?, sin.as_dtype(x.dtype())?);
    let h = x.split_equal(2, -1)?; // 2 x [B, H, L, hd/2]
    let rot = ops::concatenate(&[h[1].negative()?, h[0].clone()], -1)?; // [B, H, L, hd]
    Ok(x.multiply(&cos)?.add(&rot.multiply(&sin)?)?)
}

/// Where a forward's new tokens sit: one offset per row (int32 [B],
/// `fast::rope_dynamic`), always read from `Attention::offsets()` so a forward
/// traced for compilation never bakes a position in (plugin-api ABI 3).
/// `Scalar` is for callers outside the engine (fixed positions).
pub enum Positions {
    Scalar(i32),
    PerRow(Array),
    /// Precomputed rotations, cos and sin [B, 1, L, hd], applied over the
    /// whole head with rotate_half (multimodal RoPE: Qwen2.5-VL builds them
    /// from the host's [3, B, L] positions, qwen2_5_vl.rs).
    Rotations { cos: Array, sin: Array },
}

impl Positions {
    pub fn of(attn: &dyn Attend) -> Self {
        Positions::PerRow(attn.offsets())
    }
}

/// `h` [B, L, D] with the host's input features (image or audio) where its
/// mask is set (ABI 3.3 `input_embeddings`); `h` itself when there are none.
pub fn merge_inputs(h: Array, attn: &dyn Attend) -> Result<Array> {
    match attn.input_embeddings() {
        None => Ok(h),
        Some((features, mask)) => {
            // features [B, L, D], mask bool [B, L] -> [B, L, 1]
            let mask = mask.expand_dims(-1)?;
            Ok(mlx_rs::ops::select(&mask, &features.as_dtype(h.dtype())?, &h)?)
        }
    }
}

/// Hands the host block `layer`'s output `h` [B, L, D] if it asked for it.
pub fn offer_hidden(attn: &mut dyn Attend, layer: u32, h: &Array) -> Result<()> {
    if attn.wants_hidden(layer) {
        attn.put_hidden(layer, h)?;
    }
    Ok(())
}

/// As `offer_hidden` for a residual stream carried as rows: `h` [N, D],
/// N = B*L, reshaped to the [B, L, D] the host reads only when it asked.
pub fn offer_hidden_rows(attn: &mut dyn Attend, layer: u32, h: &Array, (b, l): (i32, i32)) -> Result<()> {
    if attn.wants_hidden(layer) {
        attn.put_hidden(layer, &h.reshape(&[b, l, -1])?)?;
    }
    Ok(())
}

/// As `finish` for final normed hidden states carried as rows, `h` [N, D]
/// with N = B*L: `head` maps rows [M, D] -> [M, V], and the result has the
/// shape `finish` gives ([B, L, D], [B, L, V] or [B, 1, V]).
pub fn finish_rows(
    h: Array,
    (b, l): (i32, i32),
    attn: &dyn Attend,
    head: impl FnOnce(&Array) -> Result<Array>,
) -> Result<Array> {
    match attn.output() {
        Output::Hidden => Ok(h.reshape(&[b, l, -1])?),               // [B, L, D]
        Output::AllLogits => Ok(head(&h)?.reshape(&[b, l, -1])?),    // [N, V] -> [B, L, V]
        Output::LastLogits => {
            let last = if l == 1 { h } else { h.take_axis(last_rows(b, l), 0)? }; // [B, D]
            Ok(head(&last)?.reshape(&[b, 1, -1])?) // [B, V] -> [B, 1, V]
        }
        Output::Media => Err(rmlx_plugin_api::PluginError::unsupported("this model has no media encoder")),
    }
}

/// int32 [B]: the row of each batch row's last position in [N, D], N = B*L.
fn last_rows(b: i32, l: i32) -> Array {
    let rows: Vec<i32> = (0..b).map(|r| r * l + l - 1).collect();
    Array::from_slice(&rows, &[b])
}

/// The forward's output from the final normed hidden states `h` [B, L, D]:
/// `h` itself, or `head` over the last or every position, as the host asked.
pub fn finish(h: Array, attn: &dyn Attend, head: impl FnOnce(&Array) -> Result<Array>) -> Result<Array> {
    match attn.output() {
        Output::Hidden => Ok(h),                      // [B, L, D]
        Output::AllLogits => head(&h),                // [B, L, V]
        Output::LastLogits => head(&last_position(&h)?), // [B, 1, V]
        Output::Media => Err(rmlx_plugin_api::PluginError::unsupported("this model has no media encoder")),
    }
}

/// mlx-lm's Llama3RoPE frequencies (computed in f32 like MLX does).
fn llama3_freqs(dims: i32, base: f64, factor: f64, low: f64, high: f64, old_ctx: f64) -> Vec<f32> {
    let low_wavelen = (old_ctx / low) as f32;
    let high_wavelen = (old_ctx / high) as f32;
    (0..dims)
        .step_by(2)
        .map(|i| {
            let f = (base as f32).powf(i as f32 / dims as f32);
            let wavelen = 2.0 * std::f32::consts::PI * f;
            let f = if wavelen > low_wavelen { f * factor as f32 } else { f };
            if wavelen > high_wavelen && wavelen < low_wavelen {
                let smooth = (old_ctx as f32 / wavelen - low as f32) / (high as f32 - low as f32);
                f / ((1.0 - smooth) / factor as f32 + smooth)
            } else {
                f
            }
        })
        .collect()
}

/// The last position of `h` [B, L, D] -> [B, 1, D].
pub fn last_position(h: &Array) -> Result<Array> {
    let l = h.dim(1);
    Ok(h.take_axis(Array::from_slice(&[l - 1], &[1]), 1)?)
}

/// [B, L, heads*hd] -> [B, heads, L, hd]
pub fn split_heads(x: &Array, heads: i32) -> Result<Array> {
    split_heads_of(x, (x.dim(0), x.dim(1)), heads)
}

/// x: [N, heads*hd] (N = B*L, row-major over (B, L)) or [B, L, heads*hd],
/// `bl` = (B, L) -> [B, heads, L, hd]: one reshape and one transpose, or at
/// L = 1 (a decode step) one reshape alone: [B, 1, H, hd] and [B, H, 1, hd]
/// hold their elements in the same order, so the transpose is a primitive
/// that moves nothing.
pub fn split_heads_of(x: &Array, (b, l): (i32, i32), heads: i32) -> Result<Array> {
    if l == 1 {
        return Ok(x.reshape(&[b, heads, 1, -1])?);
    }
    Ok(x.reshape(&[b, l, heads, -1])?.transpose_axes(&[0, 2, 1, 3])?)
}

/// [B, heads, L, hd] -> [B, L, heads*hd]
pub fn merge_heads(x: &Array) -> Result<Array> {
    let (b, l) = (x.dim(0), x.dim(2));
    if l == 1 {
        return Ok(x.reshape(&[b, 1, -1])?); // no transpose at L = 1 (see split_heads_of)
    }
    Ok(x.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?)
}

/// [B, heads, L, hd] -> [N, heads*hd], N = B*L: the rows a 2-D residual
/// stream carries (the same single reshape as `merge_heads`).
pub fn merge_heads_to_rows(x: &Array) -> Result<Array> {
    let (b, l) = (x.dim(0), x.dim(2));
    if l == 1 {
        return Ok(x.reshape(&[b, -1])?); // no transpose at L = 1 (see split_heads_of)
    }
    Ok(x.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b * l, -1])?)
}

pub use ops::concatenate;

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[i32]) -> Array {
        let n: i32 = shape.iter().product();
        Array::from_slice(&(0..n).map(|v| v as f32).collect::<Vec<_>>(), shape)
    }

    fn same(a: &Array, b: &Array) -> bool {
        a.shape() == b.shape() && a.as_slice::<f32>() == b.as_slice::<f32>()
    }

    /// Rows [B*L, H*hd] split like [B, L, H*hd], and merged back to rows.
    #[test]
    fn heads_from_and_to_rows_match_the_3d_layout() {
        for l in [3, 1] {
            heads_round_trip(2, l, 4, 5);
        }
    }

    /// One (B, L): L = 1 takes the reshape-only path; it must equal the transpose's layout.
    fn heads_round_trip(b: i32, l: i32, h: i32, hd: i32) {
        let x = iota(&[b, l, h * hd]);
        let rows = x.reshape(&[b * l, h * hd]).unwrap();
        // the reference layout, by an explicit transpose: [B, H, L, hd]
        let heads = x.reshape(&[b, l, h, hd]).unwrap().transpose_axes(&[0, 2, 1, 3]).unwrap().contiguous().unwrap();
        assert!(same(&split_heads(&x, h).unwrap().contiguous().unwrap(), &heads));
        assert!(same(&split_heads_of(&rows, (b, l), h).unwrap().contiguous().unwrap(), &heads));
        let merged = merge_heads_to_rows(&heads).unwrap(); // [B*L, H*hd]
        assert!(same(&merged, &rows));
        assert!(same(&merge_heads(&heads).unwrap(), &x));
    }

    /// The fused SwiGLU rounds as the two-step one does (bf16 and f32).
    #[test]
    fn fused_swiglu_equals_silu_times_up() {
        let n = 4096;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 60.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 1000) as f32 - 500.0) / 90.0).collect();
        for dt in [mlx_rs::Dtype::Bfloat16, mlx_rs::Dtype::Float32] {
            let g = Array::from_slice(&g, &[n as i32]).as_dtype(dt).unwrap();
            let u = Array::from_slice(&u, &[n as i32]).as_dtype(dt).unwrap();
            let two_step = g.multiply(nn::sigmoid(&g).unwrap()).unwrap().multiply(&u).unwrap();
            let fused = swiglu(&g, &u).unwrap();
            let (a, b) = (fused.as_dtype(mlx_rs::Dtype::Float32).unwrap(), two_step.as_dtype(mlx_rs::Dtype::Float32).unwrap());
            assert_eq!(a.as_slice::<f32>(), b.as_slice::<f32>(), "{dt:?}");
        }
    }

    /// The last position's row of each batch row, as `last_position` picks it.
    #[test]
    fn last_rows_pick_each_rows_last_position() {
        let (b, l, d) = (3, 4, 2);
        let x = iota(&[b, l, d]);
        let want = last_position(&x).unwrap().reshape(&[b, d]).unwrap(); // [B, D]
        let got = x.reshape(&[b * l, d]).unwrap().take_axis(last_rows(b, l), 0).unwrap();
        assert!(same(&got, &want));
    }
}
