//! Host-side index arithmetic of the Qwen3-VL vision tower
//! (qwen3_vl_vision.rs): the bilinear resampling of the learned position
//! table (mlx-vlm's `fast_pos_embed_interpolate`; each patch's position in
//! its frame and the 2-D RoPE tables are vision_tower.rs's).
use super::Grid;

/// `mx.linspace(0, g - 1, num)` as mlx computes it in float32.
fn linspace(g: i32, num: i32) -> Vec<f32> {
    if num == 1 {
        return vec![0.0];
    }
    let stop = (g - 1) as f32;
    (0..num).map(|i| (i as f32 / (num - 1) as f32) * stop).collect()
}

/// mlx-vlm's `fast_pos_embed_interpolate` bookkeeping for all grids: the
/// table rows of the four bilinear corners and their weights, [4, sum h*w]
/// each (row-major over every grid's h x w), and the gather that puts the
/// blended rows into the patch order, tiled over frames ([Np]).
pub(super) fn bilinear(grids: &[Grid], g: i32, m: i32) -> (Vec<i32>, Vec<f32>, Vec<i32>) {
    let total: usize = grids.iter().map(|x| (x.h * x.w) as usize).sum();
    let (mut idx, mut wts) = (vec![Vec::with_capacity(total); 4], vec![Vec::with_capacity(total); 4]);
    let mut order = Vec::new();
    let mut base = 0;
    for gr in grids {
        let (hs, ws) = (linspace(g, gr.h), linspace(g, gr.w));
        for &hv in &hs {
            let (hf, dh) = (hv as i32, hv - (hv as i32) as f32);
            let hc = (hf + 1).min(g - 1);
            for &wv in &ws {
                let (wf, dw) = (wv as i32, wv - (wv as i32) as f32);
                let wc = (wf + 1).min(g - 1);
                let corners = [
                    (hf * g + wf, (1.0 - dh) * (1.0 - dw)),
                    (hf * g + wc, (1.0 - dh) * dw),
                    (hc * g + wf, dh * (1.0 - dw)),
                    (hc * g + wc, dh * dw),
                ];
                for (k, (i, wt)) in corners.into_iter().enumerate() {
                    idx[k].push(i);
                    wts[k].push(wt);
                }
            }
        }
        for _ in 0..gr.t {
            for a in 0..gr.h / m {
                for b in 0..gr.w / m {
                    for i in 0..m {
                        for j in 0..m {
                            order.push(base + (a * m + i) * gr.w + b * m + j);
                        }
                    }
                }
            }
        }
        base += gr.h * gr.w;
    }
    (idx.concat(), wts.concat(), order)
}
