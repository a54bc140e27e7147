//! Pieces the Gemma family shares (mlx-lm's gemma, gemma2, gemma3_text,
//! gemma4_text): RMSNorm with the `1 + weight` convention, the
//! tanh-approximated GELU and its gated MLP, the embedding scale, the
//! float16-safe residual add; for Gemma 4 the proportional (partial) RoPE,
//! the logit soft-cap and the scaled top-k expert router.
//! Scalars are made in the activation's dtype, as Python's weak scalars are.
//!
//! Shapes: B batch, L new tokens, D hidden, F intermediate, E experts,
//! k experts per token.
use crate::Rope;
use mlx_rs::{
    fast,
    ops::{self, clip, tanh},
    Array, Dtype,
};
use rmlx_plugin_api::{
    author::{LinearLayer, Result, Weights},
    PluginError,
};

/// `v` as a 0-d array of `dtype` (a Python scalar next to an mlx array).
fn scalar(v: f32, dtype: Dtype) -> Result<Array> {
    Ok(Array::from_f32(v).as_dtype(dtype)?)
}

/// Gemma's RMSNorm: `rms_norm(x, 1 + weight, eps)`. The checkpoint stores
/// `weight` (zero-centred); `1 + weight` is computed once, in its dtype.
pub struct GemmaNorm {
    weight: Array, // [D], already 1 + weight
    eps: f32,
}

impl GemmaNorm {
    /// Loads `{name}.weight`.
    pub fn load(w: &mut Weights, name: &str, eps: f32) -> Result<Self> {
        let raw = w.tensor(&format!("{name}.weight"))?;
        let weight = raw.add(&scalar(1.0, raw.dtype())?)?;
        weight.eval()?;
        Ok(Self { weight, eps })
    }

    /// x: [..., D] -> [..., D]
    pub fn forward(&self, x: &Array) -> Result<Array> {
        crate::rms_norm(x, &self.weight, self.eps)
    }
}

/// mlx's `nn.gelu_approx`: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))),
/// in x's dtype (HF's `gelu_pytorch_tanh`).
pub fn gelu_approx(x: &Array) -> Result<Array> {
    let dt = x.dtype();
    let c = scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32, dt)?;
    let cube = x.power(&scalar(3.0, dt)?)?;
    let inner = x.add(&cube.multiply(&scalar(0.044715, dt)?)?)?;
    let t = tanh(&inner.multiply(&c)?)?.add(&scalar(1.0, dt)?)?;
    Ok(x.multiply(&scalar(0.5, dt)?)?.multiply(&t)?)
}

/// Gated GELU feed-forward: down(gelu_approx(gate(x)) * up(x)).
pub struct GeluMlp {
    gate_proj: LinearLayer, // [D] -> [F]
    up_proj: LinearLayer,   // [D] -> [F]
    down_proj: LinearLayer, // [F] -> [D]
}

impl GeluMlp {
    pub fn load(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self {
            gate_proj: w.linear(&format!("{p}.gate_proj"))?,
            up_proj: w.linear(&format!("{p}.up_proj"))?,
            down_proj: w.linear(&format!("{p}.down_proj"))?,
        })
    }

    /// x: [B, L, D] -> [B, L, D]
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let g = gelu_approx(&self.gate_proj.forward(x)?)?; // [B, L, F]
        self.down_proj.forward(&g.multiply(&self.up_proj.forward(x)?)?)
    }
}

/// Scales embeddings by sqrt(hidden) rounded to bfloat16 first and then cast
/// to h's dtype, exactly as mlx-lm's Gemma 3 does
/// (`mx.array(hidden ** 0.5, mx.bfloat16).astype(h.dtype)`).
/// h: [B, L, D] -> [B, L, D]
pub fn scale_embeddings(h: &Array, hidden_size: i32) -> Result<Array> {
    let s = Array::from_f32((hidden_size as f64).sqrt() as f32).as_dtype(Dtype::Bfloat16)?.as_dtype(h.dtype())?;
    Ok(h.multiply(&s)?)
}

/// mlx-lm's `clip_residual`: x + y, except in float16, where the sum is
/// taken in float32 and clipped to float16's range before casting back.
pub fn clip_residual(x: &Array, y: &Array) -> Result<Array> {
    if x.dtype() != Dtype::Float16 {
        return Ok(x.add(y)?);
    }
    let bound = 65504.0f32; // float16's largest finite value
    let sum = x.as_dtype(Dtype::Float32)?.add(&y.as_dtype(Dtype::Float32)?)?;
    let (lo, hi) = (Array::from_f32(-bound), Array::from_f32(bound));
    Ok(clip(&sum, (&lo, &hi))?.as_dtype(Dtype::Float16)?)
}

/// mlx-lm's `ProportionalRoPE` (rope type `proportional`, Gemma 4's global
/// layers): the first `rotated_dims` of `dims` rotate with frequencies
/// `factor * base^(i / dims)` (exponents over all `dims`, not the rotated
/// part), the rest keep an infinite period (they do not rotate).
pub fn proportional_rope(dims: i32, rotated_dims: i32, base: f32, factor: f32, traditional: bool) -> Result<Rope> {
    if rotated_dims > dims || rotated_dims < 0 || dims % 2 != 0 {
        return Err(PluginError::config(format!(
            "proportional RoPE rotates {rotated_dims} of {dims} dimensions: needs 0 <= rotated <= dims, dims even"
        )));
    }
    let freqs: Vec<f32> = (0..dims / 2)
        .map(|j| {
            let i = 2 * j;
            if i < rotated_dims {
                factor * base.powf(i as f32 / dims as f32)
            } else {
                f32::INFINITY
            }
        })
        .collect();
    let freqs = Array::from_slice(&freqs, &[dims / 2]);
    Ok(Rope { dims, traditional, base: None, scale: 1.0, freqs: Some(freqs), mscale: 1.0 })
}

/// RMSNorm without a learned scale (mlx-lm's `RMSNormNoScale`).
/// x: [..., D] -> [..., D]
pub fn rms_norm_no_scale(x: &Array, eps: f32) -> Result<Array> {
    Ok(fast::rms_norm(x, None, eps)?)
}

/// mlx-lm's `logit_softcap`: tanh(x / cap) * cap, in x's dtype.
pub fn logit_softcap(x: &Array, cap: f32) -> Result<Array> {
    let c = scalar(cap, x.dtype())?;
    Ok(tanh(&x.divide(&c)?)?.multiply(&c)?)
}

/// Gemma 4's expert router (mlx-lm gemma4_text `Router`): RMSNorm with
/// weight `scale * D^-0.5`, `proj` to expert scores, the top k scores'
/// softmax, each weight times its expert's `per_expert_scale`.
pub struct ScaledRouter {
    norm: Array,             // [D]: scale * D^-0.5
    proj: LinearLayer,       // [D] -> [E]
    per_expert_scale: Array, // [E]
    top_k: i32,
    eps: f32,
}

impl ScaledRouter {
    /// `p`: the router (`...router`): `scale`, `per_expert_scale`, `proj`.
    pub fn load(w: &mut Weights, p: &str, experts: i32, top_k: i32, eps: f32) -> Result<Self> {
        let scale = w.tensor(&format!("{p}.scale"))?;
        let per_expert_scale = w.tensor(&format!("{p}.per_expert_scale"))?;
        let proj = w.linear(&format!("{p}.proj"))?;
        let (d_in, e) = (proj.0.dims().0, proj.0.dims().1);
        if e as i32 != experts || per_expert_scale.shape() != [experts] || scale.shape() != [d_in as i32] {
            return Err(PluginError::config(format!(
                "{p}: num_experts is {experts} but proj has {e} outputs, per_expert_scale shape {:?}, scale shape {:?} for {d_in} inputs",
                per_expert_scale.shape(),
                scale.shape()
            )));
        }
        if !(1..=experts).contains(&top_k) {
            return Err(PluginError::config(format!("{p}: top_k_experts {top_k} is not in 1..={experts}")));
        }
        let norm = scale.multiply(&scalar((d_in as f32).powf(-0.5), scale.dtype())?)?;
        norm.eval()?;
        Ok(Self { norm, proj, per_expert_scale, top_k, eps })
    }

    /// x: [B, L, D] -> (indices uint32 [B, L, k], weights [B, L, k])
    pub fn route(&self, x: &Array) -> Result<(Array, Array)> {
        let x = crate::rms_norm(x, &self.norm, self.eps)?;
        let scores = self.proj.forward(&x)?; // [B, L, E]
        let e = scores.dim(-1);
        // argpartition puts the k largest last; mlx-lm keeps them in that order.
        let part = ops::argpartition_axis(&scores, -self.top_k, -1)?; // [B, L, E]
        let inds = part.split_at_indices(&[e - self.top_k], -1)?.pop().expect("two parts"); // [B, L, k]
        let top = scores.take_along_axis(&inds, -1)?; // [B, L, k]
        let weights = ops::softmax_axis(&top, -1, false)?; // [B, L, k]
        let weights = weights.multiply(self.per_expert_scale.take_axis(&inds, 0)?)?;
        Ok((inds, weights))
    }
}
