//! Target sizes of the resizing image processors that pick the size from
//! the image: Qwen2-VL's `smart_resize` (a pixel range, multiples of
//! patch * merge) and the patch-budget resize of Gemma 4's processors (the
//! aspect ratio kept, at most `max_patches` patches, sides multiples of
//! patch * pooling kernel). Both follow the Python float arithmetic of the
//! reference step by step so the sizes agree exactly.

/// Qwen2-VL's `smart_resize`: (height, width) rounded to multiples of
/// `factor`, scaled into [min_pixels, max_pixels], aspect ratio at most 200.
/// Python's `round` is round-half-even, kept here.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), String> {
    let (hf, wf, f) = (height as f64, width as f64, factor as f64);
    if height.max(width) as f64 / height.min(width).max(1) as f64 > 200.0 {
        return Err(format!("aspect ratio of {width}x{height} is over 200"));
    }
    // No floor at `factor` here (as in HF): a dimension rounding to 0 lands
    // in the min_pixels branch below.
    let mut h_bar = ((hf / f).round_ties_even() * f) as usize;
    let mut w_bar = ((wf / f).round_ties_even() * f) as usize;
    if h_bar * w_bar > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        h_bar = factor.max(((hf / beta / f).floor() * f) as usize);
        w_bar = factor.max(((wf / beta / f).floor() * f) as usize);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h_bar = ((hf * beta / f).ceil() * f) as usize;
        w_bar = ((wf * beta / f).ceil() * f) as usize;
    }
    Ok((h_bar, w_bar))
}

/// Gemma 4's `get_aspect_ratio_preserving_size` (transformers and mlx-vlm
/// alike): the largest (height, width) with the image's aspect ratio whose
/// `patch`-sided patches number at most `max_patches`, each side a multiple
/// of `side = pool * patch`, rounded down. A side that rounds to 0 becomes
/// one `side` and the other `floor(long / short) * side`, capped at
/// `max_patches / pool^2` sides.
pub fn budget_size(height: usize, width: usize, patch: usize, pool: usize, max_patches: usize) -> Result<(usize, usize), String> {
    let (hf, wf) = (height as f64, width as f64);
    let target_px = (max_patches * patch * patch) as f64;
    let factor = (target_px / (hf * wf)).sqrt();
    let side = pool * patch;
    // factor * height / side, evaluated left to right as in Python.
    let mut th = (factor * hf / side as f64).floor() as usize * side;
    let mut tw = (factor * wf / side as f64).floor() as usize * side;
    if th == 0 && tw == 0 {
        return Err(format!("{width}x{height} resizes to 0x0 under a budget of {max_patches} patches"));
    }
    let max_side = (max_patches / (pool * pool)) * side;
    if th == 0 {
        th = side;
        tw = ((wf / hf).floor() as usize * side).min(max_side);
    } else if tw == 0 {
        tw = side;
        th = ((hf / wf).floor() as usize * side).min(max_side);
    }
    Ok((th, tw))
}

#[cfg(test)]
mod tests {
    use super::budget_size;

    #[test]
    fn budget_sizes_as_gemma4_processors() {
        // Values from mlx-vlm's get_aspect_ratio_preserving_size.
        // Gemma 4's defaults (patch 16, pooling 3, 280 soft tokens): a square
        // photo becomes 768x768 (256 tokens), a 4:3 one 672x912 (266).
        assert_eq!(budget_size(1024, 1024, 16, 3, 280 * 9), Ok((768, 768)));
        assert_eq!(budget_size(480, 640, 16, 3, 280 * 9), Ok((672, 912)));
        // The tiny fixture's processor (patch 4, pooling 2, 6 soft tokens).
        assert_eq!(budget_size(23, 37, 4, 2, 24), Ok((8, 24)));
        assert_eq!(budget_size(61, 50, 4, 2, 24), Ok((16, 16)));
        assert_eq!(budget_size(16, 24, 4, 2, 24), Ok((16, 24)));
        // One side rounds to 0: one side, the other floor(ratio) sides, capped.
        assert_eq!(budget_size(5, 61, 4, 2, 24), Ok((8, 48)));
        assert_eq!(budget_size(300, 2, 4, 2, 24), Ok((48, 8)));
        assert_eq!(budget_size(9, 11, 4, 2, 24), Ok((16, 16)));
    }
}
