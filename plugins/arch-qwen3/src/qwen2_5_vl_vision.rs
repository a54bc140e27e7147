//! The vision tower of Qwen2.5-VL (`vision_config`, model_type
//! `qwen2_5_vl`), as mlx-vlm 0.7.10's qwen2_5_vl/vision.py computes it, from
//! the layout mlx-vlm loads (`vision_tower.*`, HF's `visual.*` renamed):
//! - input: pre-patchified pixels [Np, C*T*P*P] and each image's grid
//!   (t, h, w) in patches; the Qwen2-VL image processor repeats a still image
//!   T = `temporal_patch_size` times and orders its patches
//!   (t, h/m, w/m, m, m), each flattened (C, T, P, P) ([`patchify`]);
//! - patch embedding: a Conv3d with kernel = stride = (T, P, P) and no bias,
//!   which on such patches is one matmul (`patch_embed.proj.weight`, taken in
//!   HF's [O, C, T, P, P] or mlx's [O, T, P, P, C] layout);
//! - 2-D RoPE: the head's first half rotated by the patch row, second by
//!   its column (theta 10000, rotary dim hd/2 split as hd/4 + hd/4, each
//!   duplicated for rotate_half over the whole head);
//! - window attention: the m x m merge units are regrouped into windows of
//!   `window_size / m / P` units a side (edge windows smaller), every block
//!   attends within its window except `fullatt_block_indexes`, which attend
//!   within their image (frame); the merged output is put back in the
//!   original order;
//! - blocks: x + attn(rms(x)), x + down(silu(gate(rms(x))) * up(rms(x)))
//!   (RMSNorm eps 1e-6, qkv and proj with biases, softmax scale hd^-0.5);
//! - merger: RMSNorm (`ln_q`), m*m neighbouring patches concatenated,
//!   Linear -> exact GELU -> Linear to `out_hidden_size`.
//!
//! Attention runs inside the plugin with MLX's fast SDPA over the whole
//! sequence with a block-diagonal boolean mask (one mask per attention kind).
//!
//! Shapes: Np patches, U = Np / (m*m) merge units, D hidden, F intermediate,
//! H heads, hd head_dim, O out_hidden_size, K = C*T*P*P.
use mlx_rs::{fast::scaled_dot_product_attention, ops, Array};
use rmlx_nn::{require_positive, rms_norm, swiglu};
use rmlx_plugin_api::{
    author::{LinearLayer, Linears, Result, Weights},
    PluginError,
};
use serde::Deserialize;

// ---- config ----

/// mlx-vlm's qwen2_5_vl `VisionConfig`: the keys that change the computation.
#[derive(Deserialize, Debug, Clone)]
pub struct VisionConfig {
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
    #[serde(default = "d_window")]
    pub window_size: i32,
    #[serde(default = "d_fullatt")]
    pub fullatt_block_indexes: Vec<i32>,
    pub hidden_act: Option<String>,
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
fn d_window() -> i32 {
    112
}
fn d_fullatt() -> Vec<i32> {
    vec![7, 15, 23, 31]
}

/// The tower's RMSNorm eps (mlx-vlm builds them with 1e-6, not from the config).
const NORM_EPS: f32 = 1e-6;
/// The 2-D RoPE base (mlx-vlm's VisionRotaryEmbedding default).
const ROPE_THETA: f32 = 10000.0;

impl VisionConfig {
    pub fn head_dim(&self) -> i32 {
        self.hidden_size / self.num_heads
    }

    /// Merge units a window side (mlx-vlm's `vit_merger_window_size`).
    pub fn window_units(&self) -> i32 {
        self.window_size / self.spatial_merge_size / self.patch_size
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("vision_config: {m}")));
        require_positive(&[
            ("vision_config.depth", self.depth),
            ("vision_config.hidden_size", self.hidden_size),
            ("vision_config.intermediate_size", self.intermediate_size),
            ("vision_config.out_hidden_size", self.out_hidden_size),
            ("vision_config.num_heads", self.num_heads),
            ("vision_config.patch_size", self.patch_size),
            ("vision_config.spatial_merge_size", self.spatial_merge_size),
            ("vision_config.temporal_patch_size", self.temporal_patch_size),
            ("vision_config.in_channels", self.in_channels),
            ("vision_config.window_size", self.window_size),
        ])?;
        // mlx-vlm writes `qwen2_5_vl`, transformers 5 `qwen2_5_vl_vision`.
        if let Some(t) = self.model_type.as_deref().filter(|t| !matches!(*t, "qwen2_5_vl" | "qwen2_5_vl_vision")) {
            return bad(format!("model_type `{t}` is not a Qwen2.5-VL vision tower (qwen2_5_vl, qwen2_5_vl_vision)"));
        }
        if self.hidden_size % self.num_heads != 0 || self.head_dim() % 4 != 0 {
            return bad(format!(
                "hidden_size {} / num_heads {} must give a head_dim that is a multiple of 4 (two rotary halves per spatial axis)",
                self.hidden_size, self.num_heads
            ));
        }
        if self.window_units() < 1 {
            return bad(format!(
                "window_size {} is smaller than one merge unit (spatial_merge_size {} x patch_size {})",
                self.window_size, self.spatial_merge_size, self.patch_size
            ));
        }
        if let Some(i) = self.fullatt_block_indexes.iter().find(|&&i| i < 0 || i >= self.depth) {
            return bad(format!("fullatt_block_indexes holds {i}, outside the {} blocks", self.depth));
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return bad(format!("hidden_act `{a}` is not supported (mlx-vlm's tower uses SiLU)"));
        }
        Ok(())
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
    fn patches(&self) -> i32 {
        self.t * self.h * self.w
    }
}

/// Pixels [N, C, H, W] (normalised, channels first; H, W multiples of P*m)
/// -> patches [N*h*w, C*T*P*P] in the Qwen2-VL image processor's layout and
/// N grids (1, H/P, W/P): each image repeated T times as T frames.
pub fn patchify(c: &VisionConfig, pixels: &Array) -> Result<(Array, Vec<Grid>)> {
    let (ch, t, p, m) = (c.in_channels, c.temporal_patch_size, c.patch_size, c.spatial_merge_size);
    let (n, h, w) = (pixels.dim(0), pixels.dim(2) / p, pixels.dim(3) / p);
    let x = pixels.expand_dims(1)?; // [N, 1, C, H, W]
    let x = ops::broadcast_to(&x, &[n, t, ch, h * p, w * p])?; // [N, T, C, H, W]
    let x = x.reshape(&[n, t, ch, h / m, m, p, w / m, m, p])?;
    let x = x.transpose_axes(&[0, 3, 6, 4, 7, 2, 1, 5, 8])?; // [N, h/m, w/m, m, m, C, T, P, P]
    let x = x.reshape(&[n * h * w, ch * t * p * p])?; // [Np, K]
    Ok((x, vec![Grid { t: 1, h, w }; n as usize]))
}

// ---- layout: rope tables, windows, masks (host-side arithmetic) ----

/// The tower's index bookkeeping for one call, in the window order.
struct Layout {
    /// Merge units in window order: window_index[j] = original unit index.
    window_index: Vec<i32>,
    /// Per patch (window order): window number, image-frame number.
    window_seg: Vec<i32>,
    full_seg: Vec<i32>,
}

impl Layout {
    fn new(c: &VisionConfig, grids: &[Grid]) -> Self {
        let (m, win) = (c.spatial_merge_size, c.window_units());
        let mm = (m * m) as usize;
        let (mut window_index, mut window_seg, mut full_seg) = (Vec::new(), Vec::new(), Vec::new());
        let (mut base, mut window, mut frame) = (0, 0, 0);
        for g in grids {
            let (lh, lw) = (g.h / m, g.w / m);
            for t in 0..g.t {
                for wr in 0..(lh + win - 1) / win {
                    for wc in 0..(lw + win - 1) / win {
                        for r in wr * win..((wr + 1) * win).min(lh) {
                            for col in wc * win..((wc + 1) * win).min(lw) {
                                window_index.push(base + t * lh * lw + r * lw + col);
                                window_seg.extend(std::iter::repeat(window).take(mm));
                                full_seg.extend(std::iter::repeat(frame).take(mm));
                            }
                        }
                        window += 1;
                    }
                }
                frame += 1;
            }
            base += g.t * lh * lw;
        }
        Layout { window_index, window_seg, full_seg }
    }

    /// Each patch's (row, col) in its image, in window order.
    fn positions(&self, c: &VisionConfig, grids: &[Grid]) -> Vec<(i32, i32)> {
        let m = c.spatial_merge_size;
        // Original order: per frame, (h/m, w/m, m, m).
        let mut orig = Vec::new();
        for g in grids {
            for _ in 0..g.t {
                for a in 0..g.h / m {
                    for b in 0..g.w / m {
                        for i in 0..m {
                            for j in 0..m {
                                orig.push((a * m + i, b * m + j));
                            }
                        }
                    }
                }
            }
        }
        let mm = (m * m) as usize;
        self.window_index.iter().flat_map(|&u| orig[u as usize * mm..(u as usize + 1) * mm].iter().copied()).collect()
    }

    /// Position j of the merged output takes row inverse[j] of the
    /// window-ordered merge (mlx-vlm's argsort(window_index)).
    fn inverse(&self) -> Vec<i32> {
        let mut inv = vec![0i32; self.window_index.len()];
        for (j, &u) in self.window_index.iter().enumerate() {
            inv[u as usize] = j as i32;
        }
        inv
    }
}

/// cos, sin [Np, 1, hd] for the patches at `pos` (row, col).
fn rope_tables(pos: &[(i32, i32)], hd: i32, dtype: mlx_rs::Dtype) -> Result<(Array, Array)> {
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

/// True where patches i and j share a segment: [Np, Np].
fn segment_mask(seg: &[i32]) -> Array {
    let n = seg.len();
    let mut m = Vec::with_capacity(n * n);
    for a in seg {
        m.extend(seg.iter().map(|b| a == b));
    }
    Array::from_slice(&m, &[n as i32, n as i32])
}

/// x * cos + rotate_half(x) * sin; x: [Np, H, hd], halves (a, b) -> (-b, a).
fn rope(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let h = x.split_equal(2, -1)?; // 2 x [Np, H, hd/2]
    let rot = ops::concatenate(&[h[1].negative()?, h[0].clone()], -1)?; // [Np, H, hd]
    Ok(x.multiply(cos)?.add(&rot.multiply(sin)?)?)
}

/// The exact (erf) GELU of mlx.nn.GELU.
fn gelu(x: &Array) -> Result<Array> {
    let dt = x.dtype();
    let k = Array::from_f32(std::f32::consts::FRAC_1_SQRT_2).as_dtype(dt)?;
    let half = Array::from_f32(0.5).as_dtype(dt)?;
    let one = Array::from_f32(1.0).as_dtype(dt)?;
    Ok(x.multiply(&half)?.multiply(&ops::erf(&x.multiply(&k)?)?.add(&one)?)?)
}

// ---- layers ----

struct Block {
    norm1: Array,       // [D]
    norm2: Array,       // [D]
    qkv: LinearLayer,   // [D] -> [3D], bias
    proj: LinearLayer,  // [D] -> [D], bias
    gate_up: Linears,   // [D] -> [F], [F]
    down: LinearLayer,  // [F] -> [D]
    heads: i32,
    scale: f32,
    full: bool,
}

impl Block {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig, i: i32) -> Result<Self> {
        Ok(Self {
            norm1: w.tensor(&format!("{p}.norm1.weight"))?,
            norm2: w.tensor(&format!("{p}.norm2.weight"))?,
            qkv: w.linear(&format!("{p}.attn.qkv"))?,
            proj: w.linear(&format!("{p}.attn.proj"))?,
            gate_up: w.linears(&[&format!("{p}.mlp.gate_proj"), &format!("{p}.mlp.up_proj")])?,
            down: w.linear(&format!("{p}.mlp.down_proj"))?,
            heads: c.num_heads,
            scale: (c.head_dim() as f32).powf(-0.5),
            full: c.fullatt_block_indexes.contains(&i),
        })
    }

    /// x: [Np, D] (window order), rope (cos, sin) [Np, 1, hd], masks [Np, Np]
    /// (window, full) -> [Np, D]
    fn forward(&self, x: &Array, rope_cs: &(Array, Array), masks: &(Array, Array)) -> Result<Array> {
        let n = x.dim(0);
        let qkv = self.qkv.forward(&rms_norm(x, &self.norm1, NORM_EPS)?)?.reshape(&[n, 3, self.heads, -1])?; // [Np, 3, H, hd]
        let parts = qkv.split_equal(3, 1)?; // 3 x [Np, 1, H, hd]
        let t = |a: &Array| -> Result<Array> { Ok(a.transpose_axes(&[1, 2, 0, 3])?) }; // -> [1, H, Np, hd]
        let q = t(&rope(&parts[0].squeeze_axes(&[1])?, &rope_cs.0, &rope_cs.1)?.expand_dims(1)?)?;
        let k = t(&rope(&parts[1].squeeze_axes(&[1])?, &rope_cs.0, &rope_cs.1)?.expand_dims(1)?)?;
        let v = t(&parts[2])?;
        let mask = if self.full { &masks.1 } else { &masks.0 };
        let o = scaled_dot_product_attention(&q, &k, &v, self.scale, mask, None)?; // [1, H, Np, hd]
        let o = o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[n, -1])?; // [Np, D]
        let h = x.add(&self.proj.forward(&o)?)?; // [Np, D]
        let m = rms_norm(&h, &self.norm2, NORM_EPS)?;
        let gu = self.gate_up.forward(&m)?; // [Np, F] x 2
        Ok(h.add(&self.down.forward(&swiglu(&gu[0], &gu[1])?)?)?)
    }
}

// ---- the tower ----

pub struct Qwen25Vision {
    config: VisionConfig,
    patch_embed: Array, // [K, D]
    blocks: Vec<Block>,
    ln_q: Array,        // [D]
    mlp0: LinearLayer,  // [m*m*D] -> [m*m*D]
    mlp2: LinearLayer,  // [m*m*D] -> [O]
}

impl Qwen25Vision {
    /// Loads the tower under `p` (`vision_tower`).
    pub fn load(c: &VisionConfig, w: &mut Weights, p: &str) -> Result<Self> {
        c.check()?;
        let (o, ch, t, ps) = (c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size);
        let name = format!("{p}.patch_embed.proj.weight");
        let pe = w.tensor(&name)?;
        // HF's Conv3d layout [O, C, T, P, P], or mlx's [O, T, P, P, C].
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
        let patch_embed = pe.reshape(&[o, -1])?.transpose()?; // [K, D]
        let blocks = (0..c.depth).map(|i| Block::load(w, &format!("{p}.blocks.{i}"), c, i)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: c.clone(),
            patch_embed,
            blocks,
            ln_q: w.tensor(&format!("{p}.merger.ln_q.weight"))?,
            mlp0: w.linear(&format!("{p}.merger.mlp.0"))?,
            mlp2: w.linear(&format!("{p}.merger.mlp.2"))?,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Refuses pixel values the tower cannot take, saying what it wants.
    pub fn check_pixels(&self, pixels: &Array) -> Result<()> {
        let c = &self.config;
        let s = pixels.shape();
        let side = c.patch_size * c.spatial_merge_size;
        let ok = s.len() == 4 && s[0] >= 1 && s[1] == c.in_channels && s[2] > 0 && s[3] > 0 && s[2] % side == 0 && s[3] % side == 0;
        if !ok {
            return Err(PluginError::other(format!(
                "qwen2_5_vl media forward: pixel values must be [N, {}, H, W] (channels first, normalised) with H and W \
                 multiples of {side} (patch_size {} x spatial_merge_size {}), got {s:?}",
                c.in_channels, c.patch_size, c.spatial_merge_size
            )));
        }
        Ok(())
    }

    /// The MEDIA shape: pixels [N, C, H, W] -> [N, T, O], T = (H/P/m)*(W/P/m).
    pub fn forward(&self, pixels: &Array) -> Result<Array> {
        self.check_pixels(pixels)?;
        let n = pixels.dim(0);
        let (patches, grids) = patchify(&self.config, &pixels.as_dtype(self.patch_embed.dtype())?)?;
        Ok(self.forward_patches(&patches, &grids)?.reshape(&[n, -1, self.config.out_hidden_size])?)
    }

    /// mlx-vlm's `VisionModel.__call__`: patches [Np, K] of `grids` (in
    /// order) -> merged features [U, O], each image's rows in its own order.
    pub fn forward_patches(&self, patches: &Array, grids: &[Grid]) -> Result<Array> {
        let c = &self.config;
        let (m, k) = (c.spatial_merge_size, self.patch_embed.dim(0));
        let np: i32 = grids.iter().map(Grid::patches).sum();
        let grids_ok = !grids.is_empty() && grids.iter().all(|g| g.t > 0 && g.h > 0 && g.w > 0 && g.h % m == 0 && g.w % m == 0);
        if !grids_ok || patches.shape() != [np, k] {
            return Err(PluginError::other(format!(
                "qwen2_5_vl vision: patches must be [{np}, {k}] for grids {grids:?} (each h and w a positive multiple of {m}), got {:?}",
                patches.shape()
            )));
        }
        let mm = m * m;
        let layout = Layout::new(c, grids);
        let x = patches.as_dtype(self.patch_embed.dtype())?.matmul(&self.patch_embed)?; // [Np, D]
        let d = x.dim(1);
        let order = Array::from_slice(&layout.window_index, &[np / mm]);
        let mut x = x.reshape(&[np / mm, mm, d])?.take_axis(&order, 0)?.reshape(&[np, d])?; // [Np, D], window order
        let rope_cs = rope_tables(&layout.positions(c, grids), c.head_dim(), x.dtype())?;
        let masks = (segment_mask(&layout.window_seg), segment_mask(&layout.full_seg));
        for b in &self.blocks {
            x = b.forward(&x, &rope_cs, &masks)?;
        }
        let x = rms_norm(&x, &self.ln_q, NORM_EPS)?.reshape(&[np / mm, mm * d])?; // [U, m*m*D]
        let x = self.mlp2.forward(&gelu(&self.mlp0.forward(&x)?)?)?; // [U, O], window order
        let inv = layout.inverse();
        Ok(x.take_axis(&Array::from_slice(&inv, &[np / mm]), 0)?) // [U, O]
    }
}

#[cfg(test)]
#[path = "qwen2_5_vl_vision_tests.rs"]
mod tests;
