//! The vision tower of Qwen2.5-VL (`vision_config`, model_type
//! `qwen2_5_vl`), as mlx-vlm 0.7.10's qwen2_5_vl/vision.py computes it, from
//! the layout mlx-vlm loads (`vision_tower.*`, HF's `visual.*` renamed):
//! - input: pre-patchified pixels [Np, C*T*P*P] and each image's grid
//!   (t, h, w) in patches; the Qwen2-VL image processor repeats a still image
//!   T = `temporal_patch_size` times and orders its patches
//!   (t, h/m, w/m, m, m), each flattened (C, T, P, P)
//!   ([`TowerConfig::patchify`]; the pieces both Qwen-VL towers share are in
//!   vision_tower.rs);
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
use crate::vision_tower::{gelu, positions, qkv_heads, rope_tables, NORM_EPS};
use mlx_rs::{fast::scaled_dot_product_attention, Array};
use rmlx_nn::{rms_norm, swiglu};
use rmlx_plugin_api::{
    author::{LinearLayer, Linears, Result, Weights},
    PluginError,
};
use serde::Deserialize;

pub use crate::vision_tower::{Grid, TowerConfig};

// ---- config ----

/// mlx-vlm's qwen2_5_vl `VisionConfig`: the keys that change the computation.
#[derive(Deserialize, Debug, Clone)]
pub struct VisionConfig {
    #[serde(flatten)]
    pub tower: TowerConfig,
    #[serde(default = "d_window")]
    pub window_size: i32,
    #[serde(default = "d_fullatt")]
    pub fullatt_block_indexes: Vec<i32>,
    pub hidden_act: Option<String>,
}

fn d_window() -> i32 {
    112
}
fn d_fullatt() -> Vec<i32> {
    vec![7, 15, 23, 31]
}

/// The vision model types of this tower: mlx-vlm writes `qwen2_5_vl`,
/// transformers 5 `qwen2_5_vl_vision`.
const MODEL_TYPES: [&str; 2] = ["qwen2_5_vl", "qwen2_5_vl_vision"];

impl VisionConfig {
    /// Merge units a window side (mlx-vlm's `vit_merger_window_size`).
    pub fn window_units(&self) -> i32 {
        self.window_size / self.tower.spatial_merge_size / self.tower.patch_size
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("vision_config: {m}")));
        let c = &self.tower;
        c.check("Qwen2.5-VL", &MODEL_TYPES, &[("vision_config.window_size", self.window_size)])?;
        if self.window_units() < 1 {
            return bad(format!(
                "window_size {} is smaller than one merge unit (spatial_merge_size {} x patch_size {})",
                self.window_size, c.spatial_merge_size, c.patch_size
            ));
        }
        if let Some(i) = self.fullatt_block_indexes.iter().find(|&&i| i < 0 || i >= c.depth) {
            return bad(format!("fullatt_block_indexes holds {i}, outside the {} blocks", c.depth));
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return bad(format!("hidden_act `{a}` is not supported (mlx-vlm's tower uses SiLU)"));
        }
        Ok(())
    }
}

// ---- layout: windows, masks (host-side arithmetic) ----

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
        let (m, win) = (c.tower.spatial_merge_size, c.window_units());
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
    fn positions(&self, grids: &[Grid], m: i32) -> Vec<(i32, i32)> {
        let orig = positions(grids, m); // original order: per frame, (h/m, w/m, m, m)
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

/// True where patches i and j share a segment: [Np, Np].
fn segment_mask(seg: &[i32]) -> Array {
    let n = seg.len();
    let mut m = Vec::with_capacity(n * n);
    for a in seg {
        m.extend(seg.iter().map(|b| a == b));
    }
    Array::from_slice(&m, &[n as i32, n as i32])
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
            heads: c.tower.num_heads,
            scale: (c.tower.head_dim() as f32).powf(-0.5),
            full: c.fullatt_block_indexes.contains(&i),
        })
    }

    /// x: [Np, D] (window order), rope (cos, sin) [Np, 1, hd], masks [Np, Np]
    /// (window, full) -> [Np, D]
    fn forward(&self, x: &Array, rope_cs: &(Array, Array), masks: &(Array, Array)) -> Result<Array> {
        let n = x.dim(0);
        let [q, k, v] = qkv_heads(&self.qkv.forward(&rms_norm(x, &self.norm1, NORM_EPS)?)?, self.heads, rope_cs)?; // 3 x [1, H, Np, hd]
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
        let patch_embed = c.tower.load_patch_embed(w, p)?; // [K, D]
        let blocks = (0..c.tower.depth).map(|i| Block::load(w, &format!("{p}.blocks.{i}"), c, i)).collect::<Result<Vec<_>>>()?;
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
        self.config.tower.check_pixels(pixels, "qwen2_5_vl")
    }

    /// The MEDIA shape: pixels [N, C, H, W] -> [N, T, O], T = (H/P/m)*(W/P/m).
    pub fn forward(&self, pixels: &Array) -> Result<Array> {
        self.check_pixels(pixels)?;
        let n = pixels.dim(0);
        let (patches, grids) = self.config.tower.patchify(&pixels.as_dtype(self.patch_embed.dtype())?)?;
        Ok(self.forward_patches(&patches, &grids)?.reshape(&[n, -1, self.config.tower.out_hidden_size])?)
    }

    /// mlx-vlm's `VisionModel.__call__`: patches [Np, K] of `grids` (in
    /// order) -> merged features [U, O], each image's rows in its own order.
    pub fn forward_patches(&self, patches: &Array, grids: &[Grid]) -> Result<Array> {
        let c = &self.config;
        let np = c.tower.check_patches(patches, grids, "qwen2_5_vl")?;
        let m = c.tower.spatial_merge_size;
        let mm = m * m;
        let layout = Layout::new(c, grids);
        let x = patches.as_dtype(self.patch_embed.dtype())?.matmul(&self.patch_embed)?; // [Np, D]
        let d = x.dim(1);
        let order = Array::from_slice(&layout.window_index, &[np / mm]);
        let mut x = x.reshape(&[np / mm, mm, d])?.take_axis(&order, 0)?.reshape(&[np, d])?; // [Np, D], window order
        let rope_cs = rope_tables(&layout.positions(grids, m), c.tower.head_dim(), x.dtype())?;
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
