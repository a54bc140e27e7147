//! What the Qwen2.5-VL and Qwen3-VL vision towers (qwen2_5_vl_vision.rs,
//! qwen3_vl_vision.rs) share, as mlx-vlm 0.7.10 computes them:
//! - the sizes and patch geometry of `vision_config` ([`TowerConfig`], each
//!   tower's `VisionConfig` adds its own keys) and the checks on them;
//! - input: pixels [N, C, H, W] (normalised, channels first) cut into the
//!   Qwen2-VL image processor's patches [Np, C*T*P*P] ([`TowerConfig::patchify`]:
//!   a still image repeated T = `temporal_patch_size` times, patches ordered
//!   (t, h/m, w/m, m, m), each flattened (C, T, P, P)) with each image's
//!   [`Grid`];
//! - patch embedding: a Conv3d with kernel = stride = (T, P, P), which on
//!   such patches is one matmul ([`TowerConfig::load_patch_embed`]: HF's
//!   [D, C, T, P, P] or mlx's [D, T, P, P, C] layout);
//! - 2-D RoPE: the head's first half rotated by the patch row, second by
//!   its column (theta 10000, hd/4 frequencies per axis, duplicated for
//!   rotate_half over the whole head; [`rope_tables`], [`qkv_heads`]);
//! - the exact GELU of the mergers ([`gelu`]).
//!
//! Shapes: Np patches, D hidden, H heads, hd head_dim, K = C*T*P*P.
use mlx_rs::{ops, Array};
use rmlx_nn::require_positive;
use rmlx_plugin_api::{
    author::{Result, Weights},
    PluginError,
};
use serde::Deserialize;

/// The towers' RMSNorm / LayerNorm eps (mlx-vlm builds them with 1e-6, not
/// from the config).
pub const NORM_EPS: f32 = 1e-6;
/// The 2-D RoPE base (mlx-vlm's VisionRotaryEmbedding default).
const ROPE_THETA: f32 = 10000.0;

// ---- config ----

/// The `vision_config` keys both towers read (defaults are mlx-vlm's, those
/// of Qwen2.5-VL-7B's tower; real checkpoints set them all).
#[derive(Deserialize, Debug, Clone)]
pub struct TowerConfig {
    pub model_type: Option<String>,
    #[serde(default = "d_depth")]
    pub depth: i32,
    #[serde(default = "d_hidden")]
    pub hidden_size: i32,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i32,
    #[serde(default = "d_out")]
    pub out_hidden_size: i32,
    #[serde(default = "d_heads")]
    pub num_heads: i32,
    #[serde(default = "d_patch")]
    pub patch_size: i32,
    #[serde(default = "d_merge")]
    pub spatial_merge_size: i32,
    #[serde(default = "d_temporal")]
    pub temporal_patch_size: i32,
    #[serde(default = "d_channels", alias = "in_chans")]
    pub in_channels: i32,
}

fn d_depth() -> i32 {
    32
}
fn d_hidden() -> i32 {
    1280
}
fn d_intermediate() -> i32 {
    3420
}
fn d_out() -> i32 {
    1536
}
fn d_heads() -> i32 {
    16
}
fn d_patch() -> i32 {
    14
}
fn d_merge() -> i32 {
    2
}
fn d_temporal() -> i32 {
    2
}
fn d_channels() -> i32 {
    3
}

impl TowerConfig {
    pub fn head_dim(&self) -> i32 {
        self.hidden_size / self.num_heads
    }

    /// K = C*T*P*P, one patch's values.
    fn patch_dim(&self) -> i32 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The checks both towers make: every size positive (with the tower's
    /// own `sizes`), `model_type` (when given) one of `model_types` (the
    /// tower of `name`), and a head_dim that splits into four rotary parts.
    pub fn check(&self, name: &str, model_types: &[&str], sizes: &[(&str, i32)]) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("vision_config: {m}")));
        let mut all = vec![
            ("vision_config.depth", self.depth),
            ("vision_config.hidden_size", self.hidden_size),
            ("vision_config.intermediate_size", self.intermediate_size),
            ("vision_config.out_hidden_size", self.out_hidden_size),
            ("vision_config.num_heads", self.num_heads),
            ("vision_config.patch_size", self.patch_size),
            ("vision_config.spatial_merge_size", self.spatial_merge_size),
            ("vision_config.temporal_patch_size", self.temporal_patch_size),
            ("vision_config.in_channels", self.in_channels),
        ];
        all.extend_from_slice(sizes);
        require_positive(&all)?;
        if let Some(t) = self.model_type.as_deref().filter(|t| !model_types.contains(t)) {
            return bad(format!("model_type `{t}` is not a {name} vision tower ({})", model_types.join(", ")));
        }
        if self.hidden_size % self.num_heads != 0 || self.head_dim() % 4 != 0 {
            return bad(format!(
                "hidden_size {} / num_heads {} must give a head_dim that is a multiple of 4 (two rotary halves per spatial axis)",
                self.hidden_size, self.num_heads
            ));
        }
        Ok(())
    }

    /// Refuses pixel values the tower cannot take, saying what it wants
    /// (`model`: the model_type the message names).
    pub fn check_pixels(&self, pixels: &Array, model: &str) -> Result<()> {
        let s = pixels.shape();
        let side = self.patch_size * self.spatial_merge_size;
        let ok = s.len() == 4 && s[0] >= 1 && s[1] == self.in_channels && s[2] > 0 && s[3] > 0 && s[2] % side == 0 && s[3] % side == 0;
        if !ok {
            return Err(PluginError::other(format!(
                "{model} media forward: pixel values must be [N, {}, H, W] (channels first, normalised) with H and W \
                 multiples of {side} (patch_size {} x spatial_merge_size {}), got {s:?}",
                self.in_channels, self.patch_size, self.spatial_merge_size
            )));
        }
        Ok(())
    }

    /// Refuses patches that are not [Np, K] for `grids` (each h and w a
    /// positive multiple of m); returns Np.
    pub fn check_patches(&self, patches: &Array, grids: &[Grid], model: &str) -> Result<i32> {
        let (m, k) = (self.spatial_merge_size, self.patch_dim());
        let np: i32 = grids.iter().map(Grid::patches).sum();
        let grids_ok = !grids.is_empty() && grids.iter().all(|g| g.t > 0 && g.h > 0 && g.w > 0 && g.h % m == 0 && g.w % m == 0);
        if !grids_ok || patches.shape() != [np, k] {
            return Err(PluginError::other(format!(
                "{model} vision: patches must be [{np}, {k}] for grids {grids:?} (each h and w a positive multiple of {m}), got {:?}",
                patches.shape()
            )));
        }
        Ok(np)
    }

    /// Pixels [N, C, H, W] (normalised, channels first; H, W multiples of
    /// P*m) -> patches [N*h*w, C*T*P*P] in the Qwen2-VL image processor's
    /// layout and N grids (1, H/P, W/P): each image repeated T times as T
    /// frames.
    pub fn patchify(&self, pixels: &Array) -> Result<(Array, Vec<Grid>)> {
        let (ch, t, p, m) = (self.in_channels, self.temporal_patch_size, self.patch_size, self.spatial_merge_size);
        let (n, h, w) = (pixels.dim(0), pixels.dim(2) / p, pixels.dim(3) / p);
        let x = pixels.expand_dims(1)?; // [N, 1, C, H, W]
        let x = ops::broadcast_to(&x, &[n, t, ch, h * p, w * p])?; // [N, T, C, H, W]
        let x = x.reshape(&[n, t, ch, h / m, m, p, w / m, m, p])?;
        let x = x.transpose_axes(&[0, 3, 6, 4, 7, 2, 1, 5, 8])?; // [N, h/m, w/m, m, m, C, T, P, P]
        let x = x.reshape(&[n * h * w, ch * t * p * p])?; // [Np, K]
        Ok((x, vec![Grid { t: 1, h, w }; n as usize]))
    }

    /// The Conv3d patch embedding `{p}.patch_embed.proj.weight` as the
    /// matrix [K, D] that patches multiply.
    pub fn load_patch_embed(&self, w: &mut Weights, p: &str) -> Result<Array> {
        let (o, ch, t, ps) = (self.hidden_size, self.in_channels, self.temporal_patch_size, self.patch_size);
        let name = format!("{p}.patch_embed.proj.weight");
        let pe = w.tensor(&name)?;
        // mlx's Conv3d layout [O, T, P, P, C], or HF's [O, C, T, P, P].
        let pe = if pe.shape() == [o, t, ps, ps, ch] {
            pe.transpose_axes(&[0, 4, 1, 2, 3])?
        } else if pe.shape() == [o, ch, t, ps, ps] {
            pe
        } else {
            return Err(PluginError::config(format!(
                "{name} is {:?}, expected [{o}, {ch}, {t}, {ps}, {ps}] or [{o}, {t}, {ps}, {ps}, {ch}]",
                pe.shape()
            )));
        };
        Ok(pe.reshape(&[o, -1])?.transpose()?) // [K, D]
    }
}

/// One image's (or video's) grid in patches: t frames of h x w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub t: i32,
    pub h: i32,
    pub w: i32,
}

impl Grid {
    pub fn patches(&self) -> i32 {
        self.t * self.h * self.w
    }
}

// ---- 2-D RoPE ----

/// Each patch's (row, col) in its frame, in the patch order (per frame
/// (h/m, w/m, m, m)).
pub fn positions(grids: &[Grid], m: i32) -> Vec<(i32, i32)> {
    let mut pos = Vec::new();
    for g in grids {
        for _ in 0..g.t {
            for a in 0..g.h / m {
                for b in 0..g.w / m {
                    for i in 0..m {
                        for j in 0..m {
                            pos.push((a * m + i, b * m + j));
                        }
                    }
                }
            }
        }
    }
    pos
}

/// cos, sin [Np, 1, hd] for the patches at `pos` (row, col).
pub fn rope_tables(pos: &[(i32, i32)], hd: i32, dtype: mlx_rs::Dtype) -> Result<(Array, Array)> {
    let dim = hd / 2; // rotary dim; hd/4 frequencies per axis
    let inv: Vec<f32> = (0..dim / 2).map(|k| 1.0 / ROPE_THETA.powf(2.0 * k as f32 / dim as f32)).collect();
    let (mut cos, mut sin) = (Vec::with_capacity(pos.len() * hd as usize), Vec::with_capacity(pos.len() * hd as usize));
    for &(r, c) in pos {
        // (row freqs, col freqs) twice: rotate_half pairs channel i with i + hd/2.
        for _ in 0..2 {
            for p in [r, c] {
                for f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
    }
    let shape = [pos.len() as i32, 1, hd];
    Ok((Array::from_slice(&cos, &shape).as_dtype(dtype)?, Array::from_slice(&sin, &shape).as_dtype(dtype)?))
}

/// x * cos + rotate_half(x) * sin; x: [Np, H, hd], halves (a, b) -> (-b, a).
fn rope(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let h = x.split_equal(2, -1)?; // 2 x [Np, H, hd/2]
    let rot = ops::concatenate(&[h[1].negative()?, h[0].clone()], -1)?; // [Np, H, hd]
    Ok(x.multiply(cos)?.add(&rot.multiply(sin)?)?)
}

/// A block's qkv projection [Np, 3D] -> q, k, v [1, H, Np, hd], q and k
/// rotated by `rope_cs` (cos, sin) [Np, 1, hd].
pub fn qkv_heads(qkv: &Array, heads: i32, rope_cs: &(Array, Array)) -> Result<[Array; 3]> {
    let n = qkv.dim(0);
    let qkv = qkv.reshape(&[n, 3, heads, -1])?; // [Np, 3, H, hd]
    let parts = qkv.split_equal(3, 1)?; // 3 x [Np, 1, H, hd]
    let t = |a: &Array| -> Result<Array> { Ok(a.transpose_axes(&[1, 2, 0, 3])?) }; // -> [1, H, Np, hd]
    let q = t(&rope(&parts[0].squeeze_axes(&[1])?, &rope_cs.0, &rope_cs.1)?.expand_dims(1)?)?;
    let k = t(&rope(&parts[1].squeeze_axes(&[1])?, &rope_cs.0, &rope_cs.1)?.expand_dims(1)?)?;
    let v = t(&parts[2])?;
    Ok([q, k, v])
}

/// The exact (erf) GELU of mlx.nn.GELU.
pub fn gelu(x: &Array) -> Result<Array> {
    let dt = x.dtype();
    let k = Array::from_f32(std::f32::consts::FRAC_1_SQRT_2).as_dtype(dt)?;
    let half = Array::from_f32(0.5).as_dtype(dt)?;
    let one = Array::from_f32(1.0).as_dtype(dt)?;
    Ok(x.multiply(&half)?.multiply(&ops::erf(&x.multiply(&k)?)?.add(&one)?)?)
}
