//! The scalar quantizer of the rotation families: a per-vector L2 norm and a
//! Lloyd-Max codebook per coordinate of the rotated unit vector.
//!
//! `x` [.., D] -> `norm = ||x||`, `y = rotate(x / norm)`, `code_i` = the
//! codebook cell of `y_i`; decoding gives `ĉ_i = levels[code_i]` and
//! `x̂ = stored_norm * rotate⁻¹(ĉ)`. What `stored_norm` is, see [`NormMode`].
use crate::codebook::Codebook;
use mlx_rs::{ops::maximum, Array, Dtype};
use rmlx_plugin_api::author::Result;

/// What the per-vector norm component holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormMode {
    /// `||x||`, as in the paper. Lloyd-Max cells shrink vectors on average
    /// (`E||ĉ||² = 1 - distortion`), so inner products with decoded vectors
    /// shrink by about `1 - distortion` (b = 2: 12%, b = 3: 3.4%).
    Raw,
    /// `||x|| / ||ĉ||`: the decoded vector has exactly the norm of `x`
    /// (llama.cpp turbo's "norm correction"); inner products shrink by only
    /// about `sqrt(1 - distortion)` and the attention logits keep their scale.
    Preserve,
}

/// float32 `y` [.., D] -> (codes uint32 [.., D], levels float32 [.., D]).
pub fn quantize(y: &Array, book: &Codebook) -> Result<(Array, Array)> {
    let mids = Array::from_slice(&book.mids, &[book.mids.len() as i32]);
    // code = number of boundaries below y: [.., D, 2^b - 1] -> [.., D]
    let codes = y.expand_dims(-1)?.gt(&mids)?.sum_axis(-1, false)?.as_dtype(Dtype::Uint32)?;
    let values = levels(&codes, book)?;
    Ok((codes, values))
}

/// codes uint32 [..] -> float32 levels [..].
pub fn levels(codes: &Array, book: &Codebook) -> Result<Array> {
    let lv = Array::from_slice(&book.levels, &[book.levels.len() as i32]);
    Ok(lv.take(codes)?)
}

/// L2 norm over the last axis, keeping it: [.., D] -> [.., 1].
pub fn norm_keep(x: &Array) -> Result<Array> {
    Ok(x.square()?.sum_axis(-1, true)?.sqrt()?)
}

/// `x / max(n, tiny)`: zero vectors stay zero.
pub fn safe_div(x: &Array, n: &Array) -> Result<Array> {
    Ok(x.divide(maximum(n, Array::from_f32(1e-30))?)?)
}
