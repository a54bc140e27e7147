//! Attention over compressed, paged blocks against a reference that decodes
//! the same blocks and runs MLX's dense `scaled_dot_product_attention`:
//! scattered block tables, ragged rows (masks), GQA (H = 4, K = 2), a
//! sliding window, and asymmetric K/V pairs through `composed_attend`.
use super::*;
use crate::{codec, FAMILIES};
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::indexing::take_axis,
};
use rmlx_plugin_api::author::kv::{composed_attend, gqa_matmul, max_abs_diff, AttendOpts, KvCodecImpl, Paged};

const BS: i32 = 4; // block size
const POOL_BLOCKS: i32 = 12;
const H: i32 = 4;
const K: i32 = 2;
const L: i32 = 3;
const WINDOW: i32 = 5;
/// Row b's blocks (scattered; row 1's third block is padding).
const TABLES: [[i32; 3]; 2] = [[7, 2, 10], [4, 9, 0]];
const LENS: [i32; 2] = [11, 6];
const CTX: i32 = 11;

struct Batch {
    q: Array,      // [B, H, L, D]
    tables: Array, // int32 [B, nblk]
    mask: Array,   // bool [B, 1, L, CTX]
    xk: Array,     // the whole pool's keys [slots, K, D]
    xv: Array,
}

fn batch(d: i32, dtype: Dtype, outliers: bool) -> Batch {
    let slots = POOL_BLOCKS * BS;
    let xk = if outliers { with_outliers(slots, K, d, 11, &[1, 9, d - 3], 15.0) } else { gaussian(slots, K, d, 11) };
    let xv = gaussian(slots, K, d, 12);
    let q = gaussian(2 * H, L, d, 13).reshape(&[2, H, L, d]).unwrap();
    // Query i of row b sits at position LENS[b] - L + i and sees the last
    // WINDOW positions up to itself.
    let mut m = Vec::new();
    for len in LENS {
        for i in 0..L {
            let pos = len - L + i;
            m.extend((0..CTX).map(|j| j <= pos && j > pos - WINDOW));
        }
    }
    Batch {
        q: q.as_dtype(dtype).unwrap(),
        tables: Array::from_iter(TABLES.iter().flatten().copied(), &[2, 3]),
        mask: Array::from_slice(&m, &[2, 1, L, CTX]),
        xk: xk.as_dtype(dtype).unwrap(),
        xv: xv.as_dtype(dtype).unwrap(),
    }
}

/// The slots of positions 0..CTX of every row, [B * CTX] (independent of
/// `gather_blocks`).
fn slots() -> Array {
    let s: Vec<i32> = TABLES.iter().flat_map(|t| (0..CTX).map(move |j| t[(j / BS) as usize] * BS + j % BS)).collect();
    Array::from_slice(&s, &[2 * CTX])
}

/// Decode the rows' blocks and run dense sdpa.
fn reference(kc: &dyn KvCodecImpl, vc: &dyn KvCodecImpl, b: &Batch, kp: &[Array], vp: &[Array], d: &LayerDims) -> Array {
    let gather = |pools: &[Array]| -> Vec<Array> {
        pools
            .iter()
            .map(|p| {
                let mut shape = vec![2, CTX];
                shape.extend(&p.shape()[1..]);
                take_axis(p, slots(), 0).unwrap().reshape(&shape).unwrap()
            })
            .collect()
    };
    // In float32 whatever the model's dtype: the reference is exact math on
    // the decoded blocks.
    let f32 = |a: Array| a.as_dtype(Dtype::Float32).unwrap();
    let k = f32(kc.decode(&gather(kp), d).unwrap()); // [B, K, CTX, D]
    let v = f32(vc.decode(&gather(vp), d).unwrap());
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    scaled_dot_product_attention(f32(b.q.clone()), &k, &v, scale, ScaledDotProductAttentionMask::Array(&b.mask), None).unwrap()
}

fn paged<'a>(b: &'a Batch, d: i32) -> Paged<'a> {
    Paged { tables: &b.tables, block_size: BS, ctx: CTX, mask: Some(&b.mask), opts: AttendOpts::plain(1.0 / (d as f32).sqrt()) }
}

fn check_pair(kname: &str, vname: &str, hd: i32, dtype: Dtype, outliers: bool, tol: f32) {
    let (kc, vc) = (codec(kname).unwrap(), codec(vname).unwrap());
    let d = dims(K, hd, dtype);
    let b = batch(hd, dtype, outliers);
    let kp = kc.encode(&b.xk, &d).unwrap();
    let vp = vc.encode(&b.xv, &d).unwrap();
    let want = reference(kc.as_ref(), vc.as_ref(), &b, &kp, &vp, &d);
    let got = if kname == vname {
        kc.attend(&b.q, &kp, &vp, &paged(&b, hd), &d, &d).unwrap()
    } else {
        composed_attend(kc.as_ref(), vc.as_ref(), &b.q, &kp, &vp, &paged(&b, hd), &d, &d).unwrap()
    };
    assert_eq!(got.shape(), &[2, H, L, hd]);
    assert_eq!(got.dtype(), dtype);
    let diff = max_abs_diff(&got, &want).unwrap();
    assert!(diff < tol, "{kname}/{vname} D {hd} {dtype:?}: max diff {diff}");
}

#[test]
fn every_family_attends_like_decode_then_sdpa() {
    for name in FAMILIES {
        for hd in [64, 128] {
            check_pair(name, name, hd, Dtype::Float32, true, 2e-5);
        }
    }
}

#[test]
fn non_power_of_two_head_dim() {
    // 96: turbo's dense rotation, rotor's 32 groups of 3, affine's group 32.
    for name in ["turbo3", "turbo4q", "rotor3", "planar4", "iso3", "q4", "fp8"] {
        check_pair(name, name, 96, Dtype::Float32, false, 2e-5);
    }
}

#[test]
fn asymmetric_pairs() {
    for (k, v) in [("q8", "turbo3"), ("turbo4q", "turbo3"), ("fp8", "q4"), ("turbo4", "rotor3"), ("iso4", "planar3"), ("q4", "fp8")] {
        check_pair(k, v, 64, Dtype::Float32, true, 2e-5);
    }
}

#[test]
fn bfloat16_models() {
    // bf16 activations: norms/scales stored in bf16 (the reference decodes
    // the same stored values). Affine scores come from quantized_matmul in
    // bf16, as in mlx-lm: unscaled scores up to ~30 round by ~0.1, which
    // moves probabilities by ~1.5% and outputs by up to ~0.035.
    for (k, v) in [("turbo3", "turbo3"), ("q4", "q4"), ("q8", "turbo3"), ("fp8", "fp8"), ("rotor4q", "iso4")] {
        check_pair(k, v, 64, Dtype::Bfloat16, false, 5e-2);
    }
}

/// `scores` and `mix` of the rotation families (query rotated, output
/// un-rotated once) equal decode-then-matmul.
#[test]
fn rotated_scores_and_mix_equal_decode_then_matmul() {
    for name in ["turbo4", "turbo3", "turbo2", "turbo4q", "turbo3q", "planar3", "iso4", "rotor3", "rotor4q", "q4", "fp8"] {
        for hd in [64, 96] {
            let c = codec(name).unwrap();
            let d = dims(K, hd, Dtype::Float32);
            let x = with_outliers(2 * 9, K, hd, 21, &[0, 5], 10.0);
            let comps: Vec<Array> = c
                .encode(&x, &d)
                .unwrap()
                .iter()
                .map(|a| {
                    let mut s = vec![2, 9];
                    s.extend(&a.shape()[1..]);
                    a.reshape(&s).unwrap()
                })
                .collect(); // [B=2, T=9, ..]
            let kk = c.decode(&comps, &d).unwrap(); // [2, K, 9, D]
            let q = gaussian(2 * H, L, hd, 22).reshape(&[2, H, L, hd]).unwrap();
            let s = c.scores(&q, &comps, &d).unwrap();
            let s_ref = gqa_matmul(&q, &kk.transpose_axes(&[0, 1, 3, 2]).unwrap()).unwrap();
            assert_eq!(s.shape(), &[2, H, L, 9]);
            let tol = 1e-4 * to_vec(&s_ref.abs().unwrap().max(None).unwrap())[0].max(1.0);
            assert!(max_abs_diff(&s, &s_ref).unwrap() < tol, "{name} D {hd} scores");
            let p = mlx_rs::ops::softmax_axis(s_ref.multiply(Array::from_f32(0.05)).unwrap(), -1, true).unwrap();
            let m = c.mix(&p, &comps, &d).unwrap();
            let m_ref = gqa_matmul(&p, &kk).unwrap();
            assert_eq!(m.shape(), &[2, H, L, hd]);
            assert!(max_abs_diff(&m, &m_ref).unwrap() < 1e-4, "{name} D {hd} mix");
        }
    }
}

/// No mask (L = 1 decode: every gathered position) on one row.
#[test]
fn unmasked_decode_step() {
    for name in ["turbo3", "q4", "rotor4"] {
        let c = codec(name).unwrap();
        let d = dims(K, 64, Dtype::Float32);
        let b = batch(64, Dtype::Float32, false);
        let (kp, vp) = (c.encode(&b.xk, &d).unwrap(), c.encode(&b.xv, &d).unwrap());
        let tables = Array::from_slice(&[3, 8], &[1, 2]);
        let q = gaussian(H, 1, 64, 5).reshape(&[1, H, 1, 64]).unwrap();
        let pg = Paged { tables: &tables, block_size: BS, ctx: 8, mask: None, opts: AttendOpts::plain(0.125) };
        let got = c.attend(&q, &kp, &vp, &pg, &d, &d).unwrap();
        let idx = Array::from_iter([12, 13, 14, 15, 32, 33, 34, 35], &[8]);
        let g = |pools: &[Array]| -> Vec<Array> { pools.iter().map(|p| take_axis(p, &idx, 0).unwrap().expand_dims(0).unwrap()).collect() };
        let (k, v) = (c.decode(&g(&kp), &d).unwrap(), c.decode(&g(&vp), &d).unwrap());
        let want = scaled_dot_product_attention(&q, &k, &v, 0.125, None, None).unwrap();
        assert!(max_abs_diff(&got, &want).unwrap() < 2e-5, "{name}");
    }
}
