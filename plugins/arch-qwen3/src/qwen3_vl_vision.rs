//! The vision tower of Qwen3-VL (`vision_config`, model_type `qwen3_vl`), as
//! mlx-vlm 0.7.10's qwen3_vl/vision.py computes it, from the layout mlx-vlm
//! loads (`vision_tower.*`, HF's `model.visual.*` renamed):
//! - input: pre-patchified pixels [Np, C*T*P*P] and each image's grid
//!   (t, h, w) in patches, in the Qwen2-VL image processor's layout (a still
//!   image repeated T = `temporal_patch_size` times, patches ordered
//!   (t, h/m, w/m, m, m), each flattened (C, T, P, P);
//!   [`TowerConfig::patchify`]; the pieces both Qwen-VL towers share are in
//!   vision_tower.rs);
//! - patch embedding: a Conv3d with kernel = stride = (T, P, P) and a bias,
//!   one matmul on such patches (`patch_embed.proj.weight` in HF's
//!   [D, C, T, P, P] or mlx's [D, T, P, P, C] layout, `.bias` [D]);
//! - learned position embeddings: a G x G table (`pos_embed`,
//!   G^2 = `num_position_embeddings`) bilinearly resampled to each grid's
//!   h x w (sample points `linspace(0, G-1, h)` per axis, corners clamped
//!   at G-1), tiled over the frames, added to the patch embeddings;
//! - 2-D RoPE: the head's first half rotated by the patch row, second by its
//!   column (theta 10000, hd/4 frequencies per axis, duplicated for
//!   rotate_half over the whole head), as in Qwen2.5-VL;
//! - attention: every block attends within its frame (no windows);
//! - blocks: x + attn(ln1(x)), x + fc2(gelu_tanh(fc1(ln2(x)))) (LayerNorms
//!   with bias, eps 1e-6; qkv, proj, fc1, fc2 with biases; scale hd^-0.5);
//! - merger: LayerNorm over D, m*m neighbouring patches concatenated,
//!   Linear -> exact GELU -> Linear to `out_hidden_size`;
//! - deepstack: after each block listed in `deepstack_visual_indexes`, its
//!   output goes through that index's own merger (`deepstack_merger_list.j`,
//!   whose LayerNorm is over the concatenated m*m*D, "post-shuffle"); the
//!   language model adds feature j to its hidden states after decoder
//!   layer j at the image positions.
//!
//! Shapes: Np patches, U = Np / (m*m) merged tokens, D hidden, F
//! intermediate, H heads, hd head_dim, O out_hidden_size, K = C*T*P*P,
//! S = number of deepstack indexes.
use crate::vision_tower::{gelu, positions, qkv_heads, rope_tables, NORM_EPS};
use mlx_rs::{
    fast::{layer_norm, scaled_dot_product_attention},
    ops, Array,
};
use rmlx_nn::gemma::gelu_approx;
use rmlx_plugin_api::{
    author::{EmbeddingLayer, LinearLayer, Result, Weights},
    PluginError,
};
use serde::Deserialize;

pub use crate::vision_tower::{Grid, TowerConfig};

#[path = "qwen3_vl_vision_layout.rs"]
mod layout;
use layout::bilinear;

// ---- config ----

/// mlx-vlm's qwen3_vl `VisionConfig`: the keys that change the computation
/// (defaults are mlx-vlm's; real checkpoints set them all).
#[derive(Deserialize, Debug, Clone)]
pub struct VisionConfig {
    #[serde(flatten)]
    pub tower: TowerConfig,
    #[serde(default = "d_pos")]
    pub num_position_embeddings: i32,
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<i32>,
    pub hidden_act: Option<String>,
}

fn d_pos() -> i32 {
    2304
}

/// The vision model types mlx-vlm builds this tower for.
/// mlx-vlm's list, plus `qwen3_vl_vision` (what transformers writes).
const MODEL_TYPES: [&str; 8] =
    ["qwen3_vl", "qwen3_vl_vision", "qwen3_5", "qwen3_5_moe", "qwen3_5_vision", "qwen3_5_moe_vision", "qwen4_exp", "qwen4_exp_vision"];

impl VisionConfig {
    /// G, the side of the learned position-embedding table.
    pub fn grid_side(&self) -> i32 {
        (self.num_position_embeddings as f64).sqrt().round() as i32
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(PluginError::config(format!("vision_config: {m}")));
        let c = &self.tower;
        c.check("Qwen3-VL", &MODEL_TYPES, &[("vision_config.num_position_embeddings", self.num_position_embeddings)])?;
        let g = self.grid_side();
        if g * g != self.num_position_embeddings {
            return bad(format!("num_position_embeddings {} is not a square (a G x G table)", self.num_position_embeddings));
        }
        let idx = &self.deepstack_visual_indexes;
        if let Some(i) = idx.iter().find(|&&i| i < 0 || i >= c.depth) {
            return bad(format!("deepstack_visual_indexes holds {i}, outside the {} blocks", c.depth));
        }
        if let Some((j, i)) = idx.iter().enumerate().find(|(j, i)| idx[..*j].contains(i)) {
            return bad(format!("deepstack_visual_indexes holds {i} twice (at {j})"));
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
            return bad(format!("hidden_act `{a}` is not supported (mlx-vlm's tower uses the tanh GELU, gelu_pytorch_tanh)"));
        }
        Ok(())
    }
}

// ---- layers ----

/// mlx's LayerNorm with weight and bias, eps 1e-6.
struct LayerNorm {
    weight: Array, // [N]
    bias: Array,   // [N]
}

impl LayerNorm {
    fn load(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self { weight: w.tensor(&format!("{p}.weight"))?, bias: w.tensor(&format!("{p}.bias"))? })
    }

    /// x: [..., N] -> [..., N]
    fn forward(&self, x: &Array) -> Result<Array> {
        Ok(layer_norm(x, Some(&self.weight), Some(&self.bias), NORM_EPS)?)
    }
}

struct Block {
    norm1: LayerNorm, // [D]
    norm2: LayerNorm, // [D]
    qkv: LinearLayer, // [D] -> [3D], bias
    proj: LinearLayer, // [D] -> [D], bias
    fc1: LinearLayer, // [D] -> [F], bias
    fc2: LinearLayer, // [F] -> [D], bias
    heads: i32,
    scale: f32,
}

impl Block {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(w, &format!("{p}.norm1"))?,
            norm2: LayerNorm::load(w, &format!("{p}.norm2"))?,
            qkv: w.linear(&format!("{p}.attn.qkv"))?,
            proj: w.linear(&format!("{p}.attn.proj"))?,
            fc1: w.linear(&format!("{p}.mlp.linear_fc1"))?,
            fc2: w.linear(&format!("{p}.mlp.linear_fc2"))?,
            heads: c.tower.num_heads,
            scale: (c.tower.head_dim() as f32).powf(-0.5),
        })
    }

    /// x: [Np, D], rope (cos, sin) [Np, 1, hd], `cuts`: where each frame
    /// after the first starts (attention stays within a frame) -> [Np, D]
    fn forward(&self, x: &Array, rope_cs: &(Array, Array), cuts: &[i32]) -> Result<Array> {
        let n = x.dim(0);
        let [q, k, v] = qkv_heads(&self.qkv.forward(&self.norm1.forward(x)?)?, self.heads, rope_cs)?; // 3 x [1, H, Np, hd]
        let o = if cuts.is_empty() {
            scaled_dot_product_attention(&q, &k, &v, self.scale, None, None)? // [1, H, Np, hd]
        } else {
            let (qs, ks, vs) = (q.split_at_indices(cuts, 2)?, k.split_at_indices(cuts, 2)?, v.split_at_indices(cuts, 2)?);
            let outs = (0..qs.len())
                .map(|i| scaled_dot_product_attention(&qs[i], &ks[i], &vs[i], self.scale, None, None))
                .collect::<std::result::Result<Vec<_>, _>>()?; // each [1, H, Nf, hd]
            ops::concatenate(&outs, 2)? // [1, H, Np, hd]
        };
        let o = o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[n, -1])?; // [Np, D]
        let h = x.add(&self.proj.forward(&o)?)?; // [Np, D]
        let m = gelu_approx(&self.fc1.forward(&self.norm2.forward(&h)?)?)?; // [Np, F]
        Ok(h.add(&self.fc2.forward(&m)?)?)
    }
}

/// mlx-vlm's PatchMerger: the main one normalises each patch over D before
/// the m*m concatenation, a deepstack one ("post-shuffle") after it.
struct Merger {
    norm: LayerNorm,  // [D] or [m*m*D]
    fc1: LinearLayer, // [m*m*D] -> [m*m*D]
    fc2: LinearLayer, // [m*m*D] -> [O]
    post_shuffle: bool,
    width: i32, // m*m*D
}

impl Merger {
    fn load(w: &mut Weights, p: &str, c: &VisionConfig, post_shuffle: bool) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::load(w, &format!("{p}.norm"))?,
            fc1: w.linear(&format!("{p}.linear_fc1"))?,
            fc2: w.linear(&format!("{p}.linear_fc2"))?,
            post_shuffle,
            width: c.tower.hidden_size * c.tower.spatial_merge_size * c.tower.spatial_merge_size,
        })
    }

    /// x: [Np, D] -> [U, O]
    fn forward(&self, x: &Array) -> Result<Array> {
        let x = if self.post_shuffle {
            self.norm.forward(&x.reshape(&[-1, self.width])?)?
        } else {
            self.norm.forward(x)?.reshape(&[-1, self.width])?
        }; // [U, m*m*D]
        self.fc2.forward(&gelu(&self.fc1.forward(&x)?)?)
    }
}

// ---- the tower ----

pub struct Qwen3VlVision {
    config: VisionConfig,
    patch_w: Array, // [K, D]
    patch_b: Array, // [D]
    pos_embed: EmbeddingLayer, // [G*G, D]
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<Merger>, // one per deepstack_visual_indexes entry, in its order
}

impl Qwen3VlVision {
    /// Loads the tower under `p` (`vision_tower`).
    pub fn load(c: &VisionConfig, w: &mut Weights, p: &str) -> Result<Self> {
        c.check()?;
        let patch_w = c.tower.load_patch_embed(w, p)?; // [K, D]
        let patch_b = w.tensor(&format!("{p}.patch_embed.proj.bias"))?;
        let pos_embed = w.embedding(&format!("{p}.pos_embed"))?;
        let blocks = (0..c.tower.depth).map(|i| Block::load(w, &format!("{p}.blocks.{i}"), c)).collect::<Result<Vec<_>>>()?;
        let merger = Merger::load(w, &format!("{p}.merger"), c, false)?;
        let deepstack = (0..c.deepstack_visual_indexes.len())
            .map(|j| Merger::load(w, &format!("{p}.deepstack_merger_list.{j}"), c, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config: c.clone(), patch_w, patch_b, pos_embed, blocks, merger, deepstack })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Refuses pixel values the tower cannot take, saying what it wants.
    pub fn check_pixels(&self, pixels: &Array) -> Result<()> {
        self.config.tower.check_pixels(pixels, "qwen3_vl")
    }

    /// Pixels [N, C, H, W] -> (main [N, T, O], S deepstack features
    /// [N, T, O]), T = (H/P/m)*(W/P/m).
    pub fn forward(&self, pixels: &Array) -> Result<(Array, Vec<Array>)> {
        self.check_pixels(pixels)?;
        let n = pixels.dim(0);
        let (patches, grids) = self.config.tower.patchify(&pixels.as_dtype(self.patch_w.dtype())?)?;
        let (main, deep) = self.forward_patches(&patches, &grids)?;
        let o = self.config.tower.out_hidden_size;
        let deep = deep.iter().map(|d| Ok(d.reshape(&[n, -1, o])?)).collect::<Result<Vec<_>>>()?;
        Ok((main.reshape(&[n, -1, o])?, deep))
    }

    /// One way to carry the deepstack features through a single MEDIA
    /// output: pixels [N, C, H, W] -> [N, T, (1+S)*O], the main features
    /// then each deepstack feature in order, concatenated on the last axis.
    pub fn forward_stacked(&self, pixels: &Array) -> Result<Array> {
        let (main, deep) = self.forward(pixels)?;
        let mut all = vec![main];
        all.extend(deep);
        Ok(ops::concatenate(&all, -1)?)
    }

    /// mlx-vlm's `VisionModel.__call__`: patches [Np, K] of `grids` (in
    /// order) -> (merged features [U, O], deepstack features S x [U, O], in
    /// block order), each image's rows in its own patch order.
    pub fn forward_patches(&self, patches: &Array, grids: &[Grid]) -> Result<(Array, Vec<Array>)> {
        let c = &self.config;
        c.tower.check_patches(patches, grids, "qwen3_vl")?;
        let m = c.tower.spatial_merge_size;
        let x = patches.as_dtype(self.patch_w.dtype())?.matmul(&self.patch_w)?.add(&self.patch_b)?; // [Np, D]
        let mut x = x.add(&self.position_embeddings(grids)?.as_dtype(x.dtype())?)?; // [Np, D]
        let rope_cs = rope_tables(&positions(grids, m), c.tower.head_dim(), x.dtype())?;
        let mut cuts = Vec::new();
        let mut at = 0;
        for g in grids {
            for _ in 0..g.t {
                at += g.h * g.w;
                cuts.push(at);
            }
        }
        cuts.pop(); // the last frame ends at Np
        let mut deep = Vec::with_capacity(self.deepstack.len());
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x, &rope_cs, &cuts)?;
            if let Some(j) = c.deepstack_visual_indexes.iter().position(|&d| d == i as i32) {
                deep.push(self.deepstack[j].forward(&x)?); // [U, O]
            }
        }
        Ok((self.merger.forward(&x)?, deep))
    }

    /// The learned position embeddings resampled to every grid, in the
    /// patch order: [Np, D].
    fn position_embeddings(&self, grids: &[Grid]) -> Result<Array> {
        let c = &self.config;
        let (idx, wts, order) = bilinear(grids, c.grid_side(), c.tower.spatial_merge_size);
        let hw = (idx.len() / 4) as i32;
        let rows = self.pos_embed.lookup(&Array::from_slice(&idx, &[4, hw]))?; // [4, hw, D]
        let wts = Array::from_slice(&wts, &[4, hw, 1]).as_dtype(rows.dtype())?;
        let p = rows.multiply(&wts)?.split_equal(4, 0)?; // 4 x [1, hw, D]
        let blended = p[0].add(&p[1])?.add(&p[2])?.add(&p[3])?.squeeze_axes(&[0])?; // [hw, D]
        Ok(blended.take_axis(&Array::from_slice(&order, &[order.len() as i32]), 0)?) // [Np, D]
    }
}

#[cfg(test)]
#[path = "qwen3_vl_vision_tests.rs"]
mod tests;
