//! What each layer of the paged KV pool stores (ABI 3.3 `Model::layers`):
//! its own keys and values in its own shape (K/V heads and head size per
//! layer: gemma4_text's global layers are wider than its sliding ones),
//! nothing because it reads an earlier layer's (`cache_kind::SHARED`: its
//! attention reads the source layer's blocks, written earlier in the same
//! forward), or nothing at all (a recurrent-state layer, recurrent.rs).
//!
//! Every layer that stores K/V has its slots in the same physical blocks: a
//! block id addresses `block_size` slots in each such layer's arrays, so one
//! block table serves every layer and a block's bytes are the sum over the
//! storing layers of what one slot of that layer takes.
use super::kv_pool::KvSide;
use rmlx_plugin_api::{
    author::kv::{Component, LayerDims},
    cache_kind, LayerCache, PluginError,
};

/// One side (keys or values) of one layer: its dims and the family's
/// component arrays for them.
#[derive(Clone)]
pub struct SideShape {
    pub dims: LayerDims,
    pub comps: Vec<Component>,
}

impl SideShape {
    /// Bytes one slot takes.
    pub fn bytes_per_slot(&self) -> usize {
        self.comps.iter().map(Component::bytes_per_slot).sum()
    }
}

/// What one layer of the pool stores.
#[derive(Clone)]
pub enum LayerLayout {
    /// Its own keys and values.
    Own { k: SideShape, v: SideShape },
    /// Layer `src`'s (an earlier `Own` layer): stores nothing.
    Shared(usize),
    /// No K/V (a recurrent-state layer).
    NoKv,
}

impl LayerLayout {
    /// Bytes one token takes in this layer, keys and values.
    pub fn bytes_per_token(&self) -> usize {
        match self {
            LayerLayout::Own { k, v } => k.bytes_per_slot() + v.bytes_per_slot(),
            _ => 0,
        }
    }
}

/// Every one of `n` layers storing its own K/V in the sides' shape (a model
/// that declares no per-layer caches).
pub fn uniform(n: usize, k: &KvSide, v: &KvSide) -> Vec<LayerLayout> {
    let own = LayerLayout::Own {
        k: SideShape { dims: k.dims, comps: k.comps.clone() },
        v: SideShape { dims: v.dims, comps: v.comps.clone() },
    };
    vec![own; n]
}

/// The layout of `n` layers declared as `layers` (empty: uniform), with
/// each storing layer's components asked of its own codec for its own
/// dims. Refuses a shared layer whose source is not an earlier storing
/// layer, a kind this host does not know, and dims a family cannot store
/// (e.g. a calibration made for another head size).
pub fn for_layers(n: usize, k: &KvSide, v: &KvSide, layers: &[LayerCache]) -> Result<Vec<LayerLayout>, PluginError> {
    if layers.is_empty() {
        return Ok(uniform(n, k, v));
    }
    if layers.len() != n {
        return Err(PluginError::config(format!("{} layer caches declared for {n} layers", layers.len())));
    }
    let side = |s: &KvSide, i: usize, l: &LayerCache| -> Result<SideShape, PluginError> {
        let dims = LayerDims { kv_heads: l.kv_heads as i32, head_dim: l.head_dim as i32, dtype: s.dims.dtype };
        if dims == s.dims {
            return Ok(SideShape { dims, comps: s.comps.clone() });
        }
        let codec = s.codec_for(i);
        codec.check(&dims)?;
        let comps = codec.components(&dims);
        if comps.is_empty() {
            return Err(PluginError::config(format!(
                "KV family `{}` cannot store layer {i}'s K/V ({} heads of {})",
                s.family, dims.kv_heads, dims.head_dim
            )));
        }
        Ok(SideShape { dims, comps })
    };
    let mut out = Vec::with_capacity(n);
    for (i, l) in layers.iter().enumerate() {
        let layout = match l.kind {
            cache_kind::FULL | cache_kind::WINDOW => LayerLayout::Own { k: side(k, i, l)?, v: side(v, i, l)? },
            cache_kind::SHARED => {
                let src = l.shared_with as usize;
                if src >= i || !matches!(out.get(src), Some(LayerLayout::Own { .. })) {
                    return Err(PluginError::config(format!(
                        "layer {i} is declared shared with layer {src}, which is not an earlier full or window layer"
                    )));
                }
                LayerLayout::Shared(src)
            }
            cache_kind::STATE => LayerLayout::NoKv,
            other => return Err(PluginError::config(format!("layer {i} caches as kind {other}, which this host does not know"))),
        };
        out.push(layout);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::attend::KvStore;
    use super::super::kv_pool::test_pool;
    use super::super::paged::{PagedForward, Row};
    use mlx_rs::fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask};
    use mlx_rs::{ops::concatenate, random, Array};
    use rmlx_plugin_api::{author::AttendOpts, cache_kind, LayerCache};

    fn lc(kind: u32, window: u32, kv_heads: u32, head_dim: u32, shared_with: u32) -> LayerCache {
        LayerCache { kind, window, kv_heads, head_dim, shared_with }
    }

    /// q [1, H, l, hd] at the end of k/v [1, K, t, hd], causal within `window`.
    fn reference(q: &Array, k: &Array, v: &Array, window: u32) -> Array {
        let (l, t) = (q.dim(2), k.dim(2));
        let m: Vec<bool> = (0..l)
            .flat_map(|i| {
                let pos = (t - l + i) as u32;
                (0..t as u32).map(move |j| j <= pos && (window == 0 || j + window > pos))
            })
            .collect();
        let m = Array::from_slice(&m, &[l, t]);
        scaled_dot_product_attention(q, k, v, 0.5, ScaledDotProductAttentionMask::Array(&m), None).unwrap()
    }

    /// Layer 0: 2 K/V heads of 8; layer 1: 1 head of 16, windowed; layer
    /// 2 SHARED with layer 1; layer 3 a state layer. A block holds layers
    /// 0 and 1 only; the shared layer attends, with its own queries, over
    /// what layer 1 wrote in the same forward (and errs before it wrote).
    #[test]
    fn per_layer_shapes_and_a_shared_layer() {
        let layers = [lc(cache_kind::FULL, 0, 2, 8, 0), lc(cache_kind::WINDOW, 3, 1, 16, 1), lc(cache_kind::SHARED, 3, 1, 16, 1), lc(cache_kind::STATE, 0, 0, 0, 3)];
        let mut pool = test_pool(4, 2, 8, 4, 16).with_layers(&layers).unwrap();
        assert_eq!(pool.bytes_per_token(), (2 * 2 * 8 + 2 * 16) * 4);
        let table = vec![3u32, 5, 1];
        let r = |h: i32, l: i32, d: i32| random::normal::<f32>(&[1, h, l, d], None, None, None).unwrap();
        let mut hist: Option<(Array, Array)> = None;
        let mut offset = 0;
        for n in [6, 1, 1, 2] {
            let rows = [Row { table: &table, offset }];
            let mut f = PagedForward::new(&mut pool, &rows, n as usize).unwrap();
            let opts = |w| AttendOpts::plain(0.5).window(w);
            let none = r(1, 0, 16);
            let e = f.attend(2, r(4, n, 16), none.clone(), none.clone(), &opts(3)).unwrap_err();
            assert!(e.message.contains("shares layer 1"), "{}", e.message);
            f.attend(0, r(4, n, 8), r(2, n, 8), r(2, n, 8), &opts(0)).unwrap();
            let bad = f.attend(1, r(4, n, 16), r(2, n, 8), r(2, n, 8), &opts(3)).unwrap_err();
            assert!(bad.message.contains("layer 1"), "{}", bad.message);
            let (k, v) = (r(1, n, 16), r(1, n, 16));
            let q1 = r(4, n, 16);
            let got1 = f.attend(1, q1.clone(), k.clone(), v.clone(), &opts(3)).unwrap();
            let q2 = r(4, n, 16);
            let got2 = f.attend(2, q2.clone(), none.clone(), none, &opts(3)).unwrap();
            assert!(f.attend(3, q2.clone(), q2.clone(), q2.clone(), &opts(0)).is_err(), "a state layer has no K/V");
            drop(f);
            let (hk, hv) = match hist.take() {
                Some((hk, hv)) => (concatenate(&[hk, k], 2).unwrap(), concatenate(&[hv, v], 2).unwrap()),
                None => (k, v),
            };
            for (got, q) in [(got1, q1), (got2, q2)] {
                let d = (&got - reference(&q, &hk, &hv, 3)).abs().unwrap().max(None).unwrap().item_exact::<f32>();
                assert!(d < 1e-5, "max diff {d}");
            }
            hist = Some((hk, hv));
            offset += n as usize;
        }
        // A block's data: layers 0 and 1 (keys, values), in their shapes.
        let data = pool.read_block(5).unwrap();
        let shapes: Vec<_> = data.iter().map(|a| a.shape().to_vec()).collect();
        assert_eq!(shapes, [vec![4, 2, 8], vec![4, 2, 8], vec![4, 1, 16], vec![4, 1, 16]]);
        pool.write_block(9, &data).unwrap();
        assert!(pool.write_block(9, &data[..2]).is_err());
    }

    #[test]
    fn bad_declarations_are_refused() {
        let pool = || test_pool(2, 2, 8, 4, 16);
        let e = pool().with_layers(&[lc(cache_kind::SHARED, 0, 2, 8, 1), lc(cache_kind::FULL, 0, 2, 8, 0)]).err().unwrap();
        assert!(e.message.contains("not an earlier full or window layer"), "{}", e.message);
        let e = pool().with_layers(&[lc(cache_kind::FULL, 0, 2, 8, 0), lc(99, 0, 2, 8, 1)]).err().unwrap();
        assert!(e.message.contains("kind 99"), "{}", e.message);
        assert!(pool().with_layers(&[lc(cache_kind::FULL, 0, 2, 8, 0)]).is_err(), "one declaration for two layers");
    }
}
