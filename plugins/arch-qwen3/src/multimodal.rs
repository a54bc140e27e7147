//! What the Qwen-VL models (qwen2_5_vl.rs, qwen3_vl.rs) share around their
//! vision towers, as mlx-vlm 0.7.10 computes it: the tower loaded when the
//! checkpoint has one (else a text-only build), the media forward's input,
//! and multimodal RoPE (M-RoPE): each token has
//! three positions (temporal, height, width; ABI 3.7 `positions()`, or
//! `offsets()[b] + l` on all three for text), `rope_scaling`'s
//! `mrope_section` [s_t, s_h, s_w] says which of the hd/2 inverse
//! frequencies rotate by which (each model lays the sections out its own
//! way), applied with rotate_half over the whole head; and the media
//! forward hands the host each feature's (t, h, w) relative to its image's
//! first (`arch::MEDIA_POSITIONS`: t = 0, h and w its row and column in the
//! merged grid), from which the host lays out the prompt's positions and
//! each sequence's rope delta.
//!
//! Shapes: B batch, L new tokens, hd head_dim, N images, T features per
//! image.
use crate::vision_tower::TowerConfig;
use mlx_rs::{ops, Array, Dtype};
use rmlx_plugin_api::{
    author::{Attend, Result, Weights},
    PluginError, MEDIA_POSITIONS,
};

/// The vision tower under `tower` built by `load`, when the config has a
/// `vision_config` and the checkpoint its weights; None (text only) else.
pub fn load_tower<C, T>(w: &mut Weights, config: Option<&C>, tower: &str, load: impl FnOnce(&C, &mut Weights, &str) -> Result<T>) -> Result<Option<T>> {
    match config {
        Some(c) if w.contains(&format!("{tower}.patch_embed.proj.weight")) => Ok(Some(load(c, w, tower)?)),
        _ => Ok(None),
    }
}

/// Refuses a tower whose features (`out_hidden_size`) are not the width
/// of the language model's embeddings (config key `key`: `hidden_size`).
pub fn check_feature_width(tower: &TowerConfig, hidden_size: i32, key: &str) -> Result<()> {
    if tower.out_hidden_size != hidden_size {
        return Err(PluginError::config(format!(
            "vision_config.out_hidden_size {} differs from {key} {hidden_size}: the image features could not replace token embeddings",
            tower.out_hidden_size
        )));
    }
    Ok(())
}

/// A media forward's pixels [N, C, H, W] (the host's input_embeddings())
/// and the tower that takes them; refused, naming `model`, without either.
pub fn media_input<'a, T>(attn: &dyn Attend, vision: Option<&'a T>, model: &str) -> Result<(Array, &'a T)> {
    let Some((pixels, _)) = attn.input_embeddings() else {
        return Err(PluginError::other(format!("{model} media forward: no pixel values in input_embeddings()")));
    };
    let Some(vision) = vision else {
        return Err(PluginError::unsupported(format!(
            "this {model} checkpoint has no vision tower (vision_config or its weights are missing): it takes text only"
        )));
    };
    Ok((pixels, vision))
}

/// The new tokens' positions [3, B, L]: the host's, or offsets[b] + l on
/// every axis (`model`: the model_type an error names).
pub fn positions(attn: &dyn Attend, l: i32, model: &str) -> Result<Array> {
    if let Some(p) = attn.positions() {
        let b = attn.batch() as i32;
        if p.shape() != [3, b, l] {
            return Err(PluginError::other(format!("{model}: positions() is {:?}, want [3, {b}, {l}]", p.shape())));
        }
        return Ok(p.as_dtype(Dtype::Int32)?);
    }
    let offsets = attn.offsets().as_dtype(Dtype::Int32)?.expand_dims(-1)?; // [B, 1]
    let p = offsets.add(&ops::arange::<_, i32>(0, l, 1)?)?; // [B, L]
    let b = p.dim(0);
    Ok(ops::broadcast_to(&p.expand_dims(0)?, &[3, b, l])?)
}

/// [hd/2]: 1 / theta^(2i/hd), computed in f32 as mlx-vlm.
pub fn inv_freq(hd: i32, theta: f32) -> Result<Array> {
    let exps = ops::arange::<_, f32>(0, hd, 2)?.divide(Array::from_f32(hd as f32))?; // [hd/2]
    Ok(Array::from_f32(1.0).divide(&Array::from_f32(theta).power(&exps)?)?)
}

/// Angles f [B, L, hd/2] -> (cos, sin) [B, 1, L, hd], each half repeated
/// for rotate_half.
pub fn cos_sin(f: Array) -> Result<(Array, Array)> {
    let emb = ops::concatenate(&[f.clone(), f], -1)?.expand_dims(1)?; // [B, 1, L, hd]
    Ok((emb.cos()?, emb.sin()?))
}

/// `rope_scaling`'s (config key `key`) [s_t, s_h, s_w], mlx-vlm's default
/// [24, 20, 20] when absent or null: an object whose type (`type` or
/// `rope_type`) is `mrope` or `default`, with no key outside `keys`, and
/// `mrope_section`, when there, three integers. The caller checks the
/// section against its head_dim.
pub fn section(rope_scaling: Option<&serde_json::Value>, key: &str, model: &str, keys: &[&str]) -> Result<[i32; 3]> {
    let bad = |m: String| Err(PluginError::config(format!("{key}: {m}")));
    let Some(rs) = rope_scaling.filter(|v| !v.is_null()) else {
        return Ok([24, 20, 20]);
    };
    let Some(obj) = rs.as_object() else {
        return bad(format!("must be an object, got {rs}"));
    };
    let kind = obj.get("type").or_else(|| obj.get("rope_type")).and_then(|v| v.as_str()).unwrap_or("default");
    if !matches!(kind, "mrope" | "default") {
        return bad(format!("type `{kind}` is not supported for {model} (mrope or default)"));
    }
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return bad(format!("key `{k}` is not supported for {model} ({})", keys.join(", ")));
    }
    let Some(s) = obj.get("mrope_section") else {
        return Ok([24, 20, 20]);
    };
    let v: Vec<i32> = s.as_array().into_iter().flatten().filter_map(|x| x.as_i64()).map(|x| x as i32).collect();
    if v.len() != 3 || s.as_array().map_or(0, |a| a.len()) != 3 {
        return bad(format!("mrope_section must be three integers, got {s}"));
    }
    Ok([v[0], v[1], v[2]])
}

/// When the host asks (`MEDIA_POSITIONS`), hands it the relative positions
/// [N, T, 3] of the features of pixels [N, C, H, W]: (0, row, column) in
/// the merged grid (H / P / m) x (W / P / m), row-major.
pub fn put_media_positions(attn: &mut dyn Attend, pixels: &Array, tower: &TowerConfig) -> Result<()> {
    if !attn.wants_hidden(MEDIA_POSITIONS) {
        return Ok(());
    }
    let side = tower.patch_size * tower.spatial_merge_size;
    let (n, gh, gw) = (pixels.dim(0), pixels.dim(2) / side, pixels.dim(3) / side);
    let mut rel = Vec::with_capacity((gh * gw * 3) as usize);
    for r in 0..gh {
        for col in 0..gw {
            rel.extend_from_slice(&[0, r, col]);
        }
    }
    let rel = Array::from_slice(&rel, &[1, gh * gw, 3]);
    let rel = ops::broadcast_to(&rel, &[n, gh * gw, 3])?; // [N, T, 3]
    attn.put_hidden(MEDIA_POSITIONS, &rel)
}
