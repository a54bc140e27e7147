//! Pieces the Gemma family shares (mlx-lm's gemma, gemma2, gemma3_text):
//! RMSNorm with the `1 + weight` convention, the tanh-approximated GELU and
//! its gated MLP, the embedding scale, and the float16-safe residual add.
//! Scalars are made in the activation's dtype, as Python's weak scalars are.
//!
//! Shapes: B batch, L new tokens, D hidden, F intermediate.
use mlx_rs::{
    ops::{clip, tanh},
    Array, Dtype,
};
use rmlx_plugin_api::author::{LinearLayer, Result, Weights};

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
