//! The vision encoder of Gemma 4 (`vision_config`, model_type
//! `gemma4_vision`), as mlx-vlm 0.7.10's gemma4/vision.py computes it from
//! pixel values [N, C, H, W] (its `pixel_position_ids is None` path), from
//! the layout mlx-vlm loads (`vision_tower.*`):
//! - patchify: p x p patches, row-major over the (H/p) x (W/p) grid, each
//!   flattened as (row, col, channel), mapped from [0, 1] to [-1, 1], then
//!   `patch_embedder.input_proj` (no bias);
//! - position embedding: `position_embedding_table` [2, S, Dv], row 0
//!   indexed by the patch's column, row 1 by its row, summed;
//! - `num_hidden_layers` blocks with Gemma's four norms (plain RMSNorm,
//!   weight as stored): h = x + post_attn_norm(attn(input_norm(x))),
//!   out = h + post_ff_norm(mlp(pre_ff_norm(h))); the MLP is
//!   down(gelu_approx(gate(x)) * up(x));
//! - attention: q/k RMSNorm per head (weight, eps 1e-6), v RMSNorm without
//!   scale, a 2-D RoPE (first half of each head rotated by the column, second
//!   half by the row, base `rope_parameters.rope_theta`), softmax scale 1,
//!   K/V heads may be fewer (`num_key_value_heads`), every patch sees every
//!   patch (no padding in this path, so no mask);
//! - `use_clipped_linears`: every tower linear clamps its input and output to
//!   the stored scalars `input_min/max`, `output_min/max`;
//! - pooling: k x k blocks of the patch grid averaged (k =
//!   `pooling_kernel_size`), row-major, times sqrt(Dv); then with
//!   `standardize`, (x - std_bias) * std_scale.
//!
//! One size per forward: one [N, C, H, W] array carries N images of one
//! size, so every image gives the same T = (H/p/k) * (W/p/k) soft tokens.
//! The host resizes each image to its own aspect ratio (any H, W multiple of
//! p*k under the processor's patch budget, host/src/media/sizing.rs) and
//! runs one media forward per distinct size (host/src/engine/media.rs).
//! mlx-vlm batches mixed sizes instead, padding patches and passing
//! `pixel_position_ids` [N, Pmax, 2] (-1 for padding) with patchified
//! pixels; that path (and its padding mask) is not implemented.
//!
//! Attention runs inside the plugin with MLX's fast SDPA, as siglip.rs does
//! (the media forward's tokens are placeholders, one per image).
//!
//! Shapes: N images, C channels (3), H x W pixels, p patch side, P patches,
//! Dv vision hidden, F intermediate, H heads, K kv heads, hd head_dim,
//! T pooled tokens.
use mlx_rs::{fast::scaled_dot_product_attention, ops, Array};
use rmlx_nn::gemma::{gelu_approx, rms_norm_no_scale};
use rmlx_nn::{merge_heads, require_positive, rms_norm};
use rmlx_plugin_api::{
    author::{LinearLayer, Result, Weights},
    PluginError,
};
use serde::Deserialize;
use serde_json::Value;

// ---- config ----

/// mlx-vlm's gemma4 `VisionConfig`: the keys that change the computation.
#[derive(Deserialize, Debug, Clone)]
pub struct VisionConfig {
    pub model_type: Option<String>,
    #[serde(default = "d_hidden")]
    pub hidden_size: i32,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i32,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i32,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i32,
    #[serde(default = "d_heads")]
    pub num_key_value_heads: i32,
    #[serde(default = "d_head_dim")]
    pub head_dim: i32,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "d_patch")]
    pub patch_size: i32,
    #[serde(default = "d_pos")]
    pub position_embedding_size: i32,
    #[serde(default = "d_pool")]
    pub pooling_kernel_size: i32,
    #[serde(default)]
    pub use_clipped_linears: bool,
    #[serde(default)]
    pub standardize: bool,
    pub rope_parameters: Option<Value>,
    pub hidden_activation: Option<String>,
}

fn d_hidden() -> i32 {
    768
}
fn d_intermediate() -> i32 {
    3072
}
fn d_layers() -> i32 {
    16
}
fn d_heads() -> i32 {
    12
}
fn d_head_dim() -> i32 {
    64
}
fn d_eps() -> f32 {
    1e-6
}
fn d_patch() -> i32 {
    16
}
fn d_pos() -> i32 {
    10240
}
fn d_pool() -> i32 {
    3
}

/// The q/k/v norms' eps: mlx-vlm builds them with their default, not the config's.
const QKV_NORM_EPS: f32 = 1e-6;
/// Pixel channels the patch projection takes (mlx-vlm's `3 * patch_size**2`).
const CHANNELS: i32 = 3;

impl VisionConfig {
    /// The 2-D RoPE base (mlx-vlm's default 100).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|r| r.get("rope_theta")).and_then(Value::as_f64).unwrap_or(100.0)
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("vision_config: {m}")));
        require_positive(&[
            ("vision_config.hidden_size", self.hidden_size),
            ("vision_config.intermediate_size", self.intermediate_size),
            ("vision_config.num_hidden_layers", self.num_hidden_layers),
            ("vision_config.num_attention_heads", self.num_attention_heads),
            ("vision_config.num_key_value_heads", self.num_key_value_heads),
            ("vision_config.head_dim", self.head_dim),
            ("vision_config.patch_size", self.patch_size),
            ("vision_config.position_embedding_size", self.position_embedding_size),
            ("vision_config.pooling_kernel_size", self.pooling_kernel_size),
        ])?;
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "gemma4_vision") {
            return bad(format!("model_type `{t}` is not a Gemma 4 vision encoder (gemma4_vision)"));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 4 != 0 {
            return bad(format!("head_dim {} must be a multiple of 4 (two rotary halves per spatial axis)", self.head_dim));
        }
        if let Some(a) = self.hidden_activation.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
            return bad(format!("hidden_activation `{a}` is not supported (mlx-vlm's tower uses the tanh GELU)"));
        }
        if let Some(t) = self.rope_parameters.as_ref().and_then(|r| r.get("rope_type")).and_then(Value::as_str).filter(|t| *t != "default") {
            return bad(format!("rope_parameters.rope_type `{t}` is not supported (mlx-vlm's tower uses the default 2-D RoPE)"));
        }
        Ok(())
    }
}

// ---- layers ----

/// mlx-vlm's `ClippableLinear`: a bias-free linear, its input and output
/// clamped to stored scalars when `use_clipped_linears`.
struct ClipLinear {
    linear: LinearLayer,
    clip: Option<[Array; 4]>, // input_min, input_max, output_min, output_max
}

impl ClipLinear {
    fn load(w: &mut Weights, p: &str, clipped: bool) -> Result<Self> {
        let linear = w.linear(&format!("{p}.linear"))?;
        let clip = if clipped {
            let mut t = |n: &str| w.tensor(&format!("{p}.{n}"));
            Some([t("input_min")?, t("input_max")?, t("output_min")?, t("output_max")?])
        } else {
            None
        };
        Ok(Self { linear, clip })
    }

    /// x: [..., in] -> [..., out]
    fn forward(&self, x: &Array) -> Result<Array> {
        let clamp = |x: &Array, lo: &Array, hi: &Array| -> Result<Array> {
            let (lo, hi) = (lo.as_dtype(x.dtype())?, hi.as_dtype(x.dtype())?);
            Ok(ops::minimum(&ops::maximum(x, &lo)?, &hi)?)
        };
        match &self.clip {
            None => self.linear.forward(x),
            Some([imin, imax, omin, omax]) => clamp(&self.linear.forward(&clamp(x, imin, imax)?)?, omin, omax),
        }
    }
}

/// cos and sin [1, P, 1, hd] of the 2-D RoPE for a pH x pW grid.
fn rope_tables(ph: i32, pw: i32, hd: i32, base: f64, dtype: mlx_rs::Dtype) -> Result<(Array, Array)> {
    let cpd = hd / 2; // channels per spatial axis
    let half = cpd / 2;
    let timescale: Vec<f32> = (0..half).map(|j| (base as f32).powf(2.0 * j as f32 / cpd as f32)).collect();
    let (mut cos, mut sin) = (Vec::with_capacity((ph * pw * hd) as usize), Vec::with_capacity((ph * pw * hd) as usize));
    for y in 0..ph {
        for x in 0..pw {
            // Axis 0 is the column (x), axis 1 the row (y); each half duplicated.
            for pos in [x, y] {
                for _ in 0..2 {
                    for t in &timescale {
                        let a = pos as f32 / t;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
    }
    let shape = [1, ph * pw, 1, hd];
    Ok((Array::from_slice(&cos, &shape).as_dtype(dtype)?, Array::from_slice(&sin, &shape).as_dtype(dtype)?))
}

/// x * cos + rotate_half(x) * sin, rotate_half within each axis' half of
/// the head: x: [N, P, H, hd] with quarters (a, b, c, d) -> (-b, a, -d, c).
fn rope_2d(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let q = x.split_equal(4, -1)?; // 4 x [N, P, H, hd/4]
    let rot = ops::concatenate(&[q[1].negative()?, q[0].clone(), q[3].negative()?, q[2].clone()], -1)?; // [N, P, H, hd]
    Ok(x.multiply(cos)?.add(&rot.multiply(sin)?)?)
}

struct Attention {
    q_proj: ClipLinear, // [Dv] -> [H*hd]
    k_proj: ClipLinear, // [Dv] -> [K*hd]
    v_proj: ClipLinear, // [Dv] -> [K*hd]
    o_proj: ClipLinear, // [H*hd] -> [Dv]
    q_norm: Array,      // [hd]
    k_norm: Array,      // [hd]
    heads: i32,
    kv_heads: i32,
}

impl Attention {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig) -> Result<Self> {
        let l = |w: &mut Weights, n: &str| ClipLinear::load(w, &format!("{p}.{n}"), c.use_clipped_linears);
        Ok(Self {
            q_proj: l(w, "q_proj")?,
            k_proj: l(w, "k_proj")?,
            v_proj: l(w, "v_proj")?,
            o_proj: l(w, "o_proj")?,
            q_norm: w.tensor(&format!("{p}.q_norm.weight"))?,
            k_norm: w.tensor(&format!("{p}.k_norm.weight"))?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
        })
    }

    /// x: [N, P, Dv], rope (cos, sin) [1, P, 1, hd] -> [N, P, Dv]
    fn forward(&self, x: &Array, rope: &(Array, Array)) -> Result<Array> {
        let (n, l) = (x.dim(0), x.dim(1));
        let q = self.q_proj.forward(x)?.reshape(&[n, l, self.heads, -1])?; // [N, P, H, hd]
        let k = self.k_proj.forward(x)?.reshape(&[n, l, self.kv_heads, -1])?; // [N, P, K, hd]
        let v = self.v_proj.forward(x)?.reshape(&[n, l, self.kv_heads, -1])?; // [N, P, K, hd]
        let q = rope_2d(&rms_norm(&q, &self.q_norm, QKV_NORM_EPS)?, &rope.0, &rope.1)?;
        let k = rope_2d(&rms_norm(&k, &self.k_norm, QKV_NORM_EPS)?, &rope.0, &rope.1)?;
        let v = rms_norm_no_scale(&v, QKV_NORM_EPS)?;
        let t = |a: &Array| a.transpose_axes(&[0, 2, 1, 3]); // -> [N, H|K, P, hd]
        let o = scaled_dot_product_attention(&t(&q)?, &t(&k)?, &t(&v)?, 1.0, None, None)?; // [N, H, P, hd]
        self.o_proj.forward(&merge_heads(&o)?)
    }
}

struct Block {
    self_attn: Attention,
    gate_proj: ClipLinear,             // [Dv] -> [F]
    up_proj: ClipLinear,               // [Dv] -> [F]
    down_proj: ClipLinear,             // [F] -> [Dv]
    input_layernorm: Array,            // [Dv]
    post_attention_layernorm: Array,   // [Dv]
    pre_feedforward_layernorm: Array,  // [Dv]
    post_feedforward_layernorm: Array, // [Dv]
    eps: f32,
}

impl Block {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig) -> Result<Self> {
        let l = |w: &mut Weights, n: &str| ClipLinear::load(w, &format!("{p}.mlp.{n}"), c.use_clipped_linears);
        let norm = |w: &mut Weights, n: &str| w.tensor(&format!("{p}.{n}.weight"));
        Ok(Self {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), c)?,
            gate_proj: l(w, "gate_proj")?,
            up_proj: l(w, "up_proj")?,
            down_proj: l(w, "down_proj")?,
            input_layernorm: norm(w, "input_layernorm")?,
            post_attention_layernorm: norm(w, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
            eps: c.rms_norm_eps,
        })
    }

    /// x: [N, P, Dv] -> [N, P, Dv]
    fn forward(&self, x: &Array, rope: &(Array, Array)) -> Result<Array> {
        let norm = |x: &Array, w: &Array| rms_norm(x, w, self.eps);
        let a = self.self_attn.forward(&norm(x, &self.input_layernorm)?, rope)?;
        let h = x.add(&norm(&a, &self.post_attention_layernorm)?)?; // [N, P, Dv]
        let m = norm(&h, &self.pre_feedforward_layernorm)?;
        let g = gelu_approx(&self.gate_proj.forward(&m)?)?.multiply(&self.up_proj.forward(&m)?)?; // [N, P, F]
        let f = self.down_proj.forward(&g)?; // [N, P, Dv]
        Ok(h.add(&norm(&f, &self.post_feedforward_layernorm)?)?)
    }
}

// ---- the tower ----

pub struct Gemma4Vision {
    config: VisionConfig,
    input_proj: LinearLayer, // [C*p*p] -> [Dv]
    pos_x: Array,            // [S, Dv], indexed by the patch's column
    pos_y: Array,            // [S, Dv], indexed by the patch's row
    layers: Vec<Block>,
    standardize: Option<(Array, Array)>, // std_bias, std_scale [Dv]
}

impl Gemma4Vision {
    /// Loads the tower under `p` (`vision_tower`).
    pub fn load(c: &VisionConfig, w: &mut Weights, p: &str) -> Result<Self> {
        c.check()?;
        let input_proj = w.linear(&format!("{p}.patch_embedder.input_proj"))?;
        let name = format!("{p}.patch_embedder.position_embedding_table");
        let table = w.tensor(&name)?; // [2, S, Dv]
        let want = [2, c.position_embedding_size, c.hidden_size];
        if table.shape() != want {
            return Err(PluginError::config(format!("{name} is {:?}, expected {want:?}", table.shape())));
        }
        let axes = table.split_equal(2, 0)?; // 2 x [1, S, Dv]
        let (pos_x, pos_y) = (axes[0].squeeze_axes(&[0])?, axes[1].squeeze_axes(&[0])?);
        let layers = (0..c.num_hidden_layers)
            .map(|i| Block::load(w, &format!("{p}.encoder.layers.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let standardize = if c.standardize {
            Some((w.tensor(&format!("{p}.std_bias"))?, w.tensor(&format!("{p}.std_scale"))?))
        } else {
            None
        };
        Ok(Self { config: c.clone(), input_proj, pos_x, pos_y, layers, standardize })
    }

    /// Refuses pixel values the tower cannot take, saying what it wants.
    pub fn check_pixels(&self, pixels: &Array) -> Result<()> {
        let c = &self.config;
        let s = pixels.shape();
        let side = c.patch_size * c.pooling_kernel_size;
        let max = c.position_embedding_size * c.patch_size;
        let ok = s.len() == 4
            && s[0] >= 1
            && s[1] == CHANNELS
            && s[2] > 0
            && s[3] > 0
            && s[2] % side == 0
            && s[3] % side == 0
            && s[2] <= max
            && s[3] <= max;
        if !ok {
            return Err(PluginError::other(format!(
                "gemma4 media forward: pixel values must be [N, 3, H, W] (channels first, in [0, 1]) with H and W \
                 multiples of {side} (patch_size {} x pooling_kernel_size {}) and at most {max} \
                 (position_embedding_size {} patches), got {s:?}",
                c.patch_size, c.pooling_kernel_size, c.position_embedding_size
            )));
        }
        Ok(())
    }

    /// pixels: [N, 3, H, W] in [0, 1] -> pooled, standardized [N, T, Dv].
    pub fn forward(&self, pixels: &Array) -> Result<Array> {
        self.check_pixels(pixels)?;
        let c = &self.config;
        let (n, h, w, p, k, dv) = (pixels.dim(0), pixels.dim(2), pixels.dim(3), c.patch_size, c.pooling_kernel_size, c.hidden_size);
        let (ph, pw) = (h / p, w / p);
        let dtype = self.pos_x.dtype();
        let x = pixels.as_dtype(dtype)?.reshape(&[n, CHANNELS, ph, p, pw, p])?; // [N, C, pH, p, pW, p]
        let x = x.transpose_axes(&[0, 2, 4, 3, 5, 1])?.reshape(&[n, ph * pw, p * p * CHANNELS])?; // [N, P, p*p*C]
        let two = Array::from_f32(2.0).as_dtype(dtype)?;
        let half = Array::from_f32(0.5).as_dtype(dtype)?;
        let x = self.input_proj.forward(&x.subtract(&half)?.multiply(&two)?)?; // [N, P, Dv]
        let cols: Vec<i32> = (0..ph * pw).map(|i| i % pw).collect();
        let rows: Vec<i32> = (0..ph * pw).map(|i| i / pw).collect();
        let pos = self.pos_x.take_axis(Array::from_slice(&cols, &[ph * pw]), 0)?
            .add(&self.pos_y.take_axis(Array::from_slice(&rows, &[ph * pw]), 0)?)?; // [P, Dv]
        let mut x = x.add(&pos)?; // [N, P, Dv]
        let rope = rope_tables(ph, pw, c.head_dim, c.rope_theta(), x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &rope)?;
        }
        // Average k x k blocks of the grid, row-major: [N, pH/k, k, pW/k, k, Dv].
        let g = x.reshape(&[n, ph / k, k, pw / k, k, dv])?;
        let pooled = g.mean_axes(&[2, 4], false)?.reshape(&[n, -1, dv])?; // [N, T, Dv]
        let root = Array::from_f32((dv as f64).sqrt() as f32).as_dtype(pooled.dtype())?;
        let pooled = pooled.multiply(&root)?;
        match &self.standardize {
            None => Ok(pooled),
            Some((bias, scale)) => Ok(pooled.subtract(bias)?.multiply(scale)?),
        }
    }
}
