//! Layers of BERT-family encoders: LayerNorm with a bias, and the erf GELU.
use mlx_rs::{fast, Array};
use rmlx_plugin_api::author::{Result, Weights};

/// torch.nn.LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias.
pub struct LayerNorm {
    weight: Array, // [D]
    bias: Array,   // [D]
    eps: f32,
}

impl LayerNorm {
    /// `p.weight` and `p.bias`, or the TF-era names `p.gamma` and `p.beta`.
    pub fn load(w: &mut Weights, p: &str, eps: f32) -> Result<Self> {
        let (wn, bn) = if w.contains(&format!("{p}.gamma")) { ("gamma", "beta") } else { ("weight", "bias") };
        Ok(Self { weight: w.tensor(&format!("{p}.{wn}"))?, bias: w.tensor(&format!("{p}.{bn}"))?, eps })
    }

    /// x: [..., D] -> [..., D]
    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::layer_norm(x, Some(&self.weight), Some(&self.bias), self.eps)?)
    }
}

/// GELU with the exact erf, x * (1 + erf(x / sqrt 2)) / 2 (HF's `gelu`).
pub fn gelu(x: &Array) -> Result<Array> {
    Ok(mlx_rs::nn::gelu(x)?)
}
