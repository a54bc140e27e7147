//! The SigLIP vision tower of Gemma 3 (`vision_config`, model_type
//! `siglip_vision_model`), as mlx-vlm's gemma3/vision.py computes it, from the
//! layout mlx-vlm loads (`vision_tower.vision_model.*`):
//! - patch embedding: a conv with kernel = stride = patch_size and a bias over
//!   the pixels (channels last inside), flattened row-major to P patches,
//!   plus a learned position embedding of P rows (no interpolation: images
//!   must be `image_size` square);
//! - `num_hidden_layers` pre-LN encoder layers: h = x + attn(ln1(x)),
//!   out = h + fc2(gelu_approx(fc1(ln2(h)))); attention with biases on q, k,
//!   v and out, softmax scale head_dim^-0.5, every patch sees every patch;
//! - `post_layernorm`, whose eps is mlx's LayerNorm default 1e-5 (mlx-vlm
//!   does not pass `layer_norm_eps` to it; the encoder layers use it).
//!
//! Attention is computed here with MLX's fast SDPA, not through the host's
//! `attend`: the media forward's tokens are placeholders [N, 1], so the host's
//! cacheless encoder store (host/src/engine/encoder.rs) is sized for one
//! position per image and cannot take the tower's P patches; the tower has
//! no cache and no padding (every image is image_size square), so an
//! unmasked SDPA is exactly the attention it needs.
//!
//! The conv weight is [Dv, P, P, C] (MLX) or [Dv, C, P, P] (PyTorch,
//! transposed at load as mlx-vlm's `sanitize` does).
//!
//! Shapes: N images, C channels, S image side, P patches, Dv vision hidden,
//! F intermediate, H heads, hd head_dim.
use mlx_rs::{
    fast::{layer_norm, scaled_dot_product_attention},
    ops::{arange, conv2d},
    Array,
};
use rmlx_nn::gemma::gelu_approx;
use rmlx_nn::{merge_heads, require_positive, split_heads};
use rmlx_plugin_api::{
    author::{EmbeddingLayer, LinearLayer, Result, Weights},
    PluginError,
};
use serde::Deserialize;

// ---- config ----

/// mlx-vlm's gemma3 `VisionConfig`, plus keys it ignores that would change
/// the computation if they said something else.
#[derive(Deserialize, Debug, Clone)]
pub struct VisionConfig {
    pub model_type: Option<String>,
    pub num_hidden_layers: i32,
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_attention_heads: i32,
    pub patch_size: i32,
    #[serde(default = "d_image_size")]
    pub image_size: i32,
    #[serde(default = "d_channels")]
    pub num_channels: i32,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f32,
    // Not read by mlx-vlm.
    pub hidden_act: Option<String>,
}

fn d_image_size() -> i32 {
    224
}
fn d_channels() -> i32 {
    3
}
fn d_eps() -> f32 {
    1e-6
}

impl VisionConfig {
    /// Patches per side of the (square) image.
    pub fn patches_per_side(&self) -> i32 {
        self.image_size / self.patch_size
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("vision_config: {m}")));
        require_positive(&[
            ("vision_config.num_hidden_layers", self.num_hidden_layers),
            ("vision_config.hidden_size", self.hidden_size),
            ("vision_config.intermediate_size", self.intermediate_size),
            ("vision_config.num_attention_heads", self.num_attention_heads),
            ("vision_config.patch_size", self.patch_size),
            ("vision_config.image_size", self.image_size),
            ("vision_config.num_channels", self.num_channels),
        ])?;
        if let Some(t) = self.model_type.as_deref().filter(|t| !["siglip_vision_model", "gemma3", "gemma3_vision"].contains(t)) {
            return bad(format!("model_type `{t}` is not a SigLIP tower (mlx-vlm takes siglip_vision_model)"));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if self.image_size % self.patch_size != 0 {
            return bad(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
            return bad(format!("hidden_act `{a}` is not supported (mlx-vlm's SigLIP uses the tanh GELU)"));
        }
        Ok(())
    }
}

// ---- layers ----

/// mlx's LayerNorm with weight and bias: (x - mean) / sqrt(var + eps) * w + b.
struct LayerNorm {
    weight: Array, // [Dv]
    bias: Array,   // [Dv]
    eps: f32,
}

impl LayerNorm {
    fn load(w: &mut Weights, p: &str, eps: f32) -> Result<Self> {
        Ok(Self { weight: w.tensor(&format!("{p}.weight"))?, bias: w.tensor(&format!("{p}.bias"))?, eps })
    }

    /// x: [..., Dv] -> [..., Dv]
    fn forward(&self, x: &Array) -> Result<Array> {
        Ok(layer_norm(x, Some(&self.weight), Some(&self.bias), self.eps)?)
    }
}

struct Attention {
    q_proj: LinearLayer,   // [Dv] -> [Dv]
    k_proj: LinearLayer,   // [Dv] -> [Dv]
    v_proj: LinearLayer,   // [Dv] -> [Dv]
    out_proj: LinearLayer, // [Dv] -> [Dv]
    heads: i32,
    scale: f32,
}

impl Attention {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig) -> Result<Self> {
        let hd = c.hidden_size / c.num_attention_heads;
        Ok(Self {
            q_proj: w.linear(&format!("{p}.q_proj"))?,
            k_proj: w.linear(&format!("{p}.k_proj"))?,
            v_proj: w.linear(&format!("{p}.v_proj"))?,
            out_proj: w.linear(&format!("{p}.out_proj"))?,
            heads: c.num_attention_heads,
            scale: (hd as f32).powf(-0.5),
        })
    }

    /// x: [N, P, Dv] -> [N, P, Dv]; every patch attends to every patch.
    fn forward(&self, x: &Array) -> Result<Array> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?; // [N, H, P, hd]
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?; // [N, H, P, hd]
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?; // [N, H, P, hd]
        let o = scaled_dot_product_attention(&q, &k, &v, self.scale, None, None)?; // [N, H, P, hd]
        self.out_proj.forward(&merge_heads(&o)?)
    }
}

struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm, // [Dv]
    fc1: LinearLayer,       // [Dv] -> [F]
    fc2: LinearLayer,       // [F] -> [Dv]
    layer_norm2: LayerNorm, // [Dv]
}

impl EncoderLayer {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), c)?,
            layer_norm1: LayerNorm::load(w, &format!("{p}.layer_norm1"), c.layer_norm_eps)?,
            fc1: w.linear(&format!("{p}.mlp.fc1"))?,
            fc2: w.linear(&format!("{p}.mlp.fc2"))?,
            layer_norm2: LayerNorm::load(w, &format!("{p}.layer_norm2"), c.layer_norm_eps)?,
        })
    }

    /// x: [N, P, Dv] -> [N, P, Dv]
    fn forward(&self, x: &Array) -> Result<Array> {
        let h = x.add(&self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let m = gelu_approx(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?; // [N, P, F]
        Ok(h.add(&self.fc2.forward(&m)?)?)
    }
}

// ---- the tower ----

pub struct SiglipVision {
    config: VisionConfig,
    patch_weight: Array,                   // [Dv, patch, patch, C]
    patch_bias: Array,                     // [Dv]
    position_embedding: EmbeddingLayer,    // [P, Dv]
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,             // [Dv]
}

/// mlx's `nn.LayerNorm` default eps, which mlx-vlm's `post_layernorm` keeps.
const POST_LN_EPS: f32 = 1e-5;

impl SiglipVision {
    /// Loads the tower under `p` (e.g. `vision_tower.vision_model`).
    pub fn load(c: &VisionConfig, w: &mut Weights, p: &str) -> Result<Self> {
        c.check()?;
        let patch_weight = conv_weight(w.tensor(&format!("{p}.embeddings.patch_embedding.weight"))?, c)?;
        let patch_bias = w.tensor(&format!("{p}.embeddings.patch_embedding.bias"))?;
        let position_embedding = w.embedding(&format!("{p}.embeddings.position_embedding"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(w, &format!("{p}.encoder.layers.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::load(w, &format!("{p}.post_layernorm"), POST_LN_EPS)?;
        Ok(Self { config: c.clone(), patch_weight, patch_bias, position_embedding, layers, post_layernorm })
    }

    /// Refuses pixel values the tower cannot take, naming the shape it wants.
    pub fn check_pixels(&self, pixels: &Array) -> Result<()> {
        let c = &self.config;
        let want = [c.num_channels, c.image_size, c.image_size];
        let shape = pixels.shape();
        if shape.len() != 4 || shape[1..] != want || shape[0] < 1 {
            return Err(PluginError::other(format!(
                "gemma3 media forward: pixel values must be [N, {}, {}, {}] (channels first, vision_config.image_size {}), got {:?}",
                want[0], want[1], want[2], c.image_size, shape
            )));
        }
        Ok(())
    }

    /// pixels: [N, C, S, S] (normalised, channels first) -> [N, P, Dv], the
    /// last hidden states after `post_layernorm`.
    pub fn forward(&self, pixels: &Array) -> Result<Array> {
        self.check_pixels(pixels)?;
        let n = pixels.dim(0);
        let x = pixels.transpose_axes(&[0, 2, 3, 1])?.as_dtype(self.patch_weight.dtype())?; // [N, S, S, C]
        let p = self.config.patch_size;
        let x = conv2d(&x, &self.patch_weight, (p, p), (0, 0), (1, 1), 1)?.add(&self.patch_bias)?; // [N, S/p, S/p, Dv]
        let x = x.reshape(&[n, -1, self.config.hidden_size])?; // [N, P, Dv]
        let pos = arange::<_, i32>(0, x.dim(1), None)?.reshape(&[1, -1])?; // [1, P]
        let mut x = x.add(&self.position_embedding.lookup(&pos)?)?; // [N, P, Dv]
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// The patch conv's weight as MLX wants it, [Dv, patch, patch, C]: kept
/// when it already is, transposed from PyTorch's [Dv, C, patch, patch].
fn conv_weight(w: Array, c: &VisionConfig) -> Result<Array> {
    let (d, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
    let s = w.shape().to_vec();
    if s == [d, p, p, ch] {
        Ok(w)
    } else if s == [d, ch, p, p] {
        Ok(w.transpose_axes(&[0, 2, 3, 1])?)
    } else {
        Err(PluginError::config(format!(
            "patch_embedding.weight is {s:?}, expected [{d}, {p}, {p}, {ch}] (MLX) or [{d}, {ch}, {p}, {p}] (PyTorch)"
        )))
    }
}
