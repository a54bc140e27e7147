//! Unit tests of gated_delta.rs: the composed recurrence's pieces against
//! their reference layouts.
use super::*;
use mlx_rs::random;

fn max_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.subtract(b).unwrap().abs().unwrap().max(None).unwrap().item_cast::<f32>()
}

fn dims(k_heads: i32, v_heads: i32, k_dim: i32, v_dim: i32) -> DeltaDims {
    DeltaDims { hidden: 8, k_heads, v_heads, k_dim, v_dim, conv_kernel: 4, eps: 1e-6 }
}

/// q, k, v split from the conv's channels: with Dk = Dv (one reshape,
/// a split over heads) and without, the same values as a split over
/// channels with each part reshaped to its heads.
#[test]
fn split_qkv_matches_the_channel_split() {
    for d in [dims(2, 4, 3, 3), dims(2, 4, 3, 5)] {
        let (b, l, c) = (2, 3, d.conv_dim());
        let x = Array::from_slice(&(0..b * l * c).map(|v| v as f32).collect::<Vec<_>>(), &[b, l, c]);
        let parts = x.split_at_indices(&[d.key_dim(), 2 * d.key_dim()], -1).unwrap();
        let want = [
            parts[0].reshape(&[b, l, d.k_heads, d.k_dim]).unwrap(),
            parts[1].reshape(&[b, l, d.k_heads, d.k_dim]).unwrap(),
            parts[2].reshape(&[b, l, d.v_heads, d.v_dim]).unwrap(),
        ];
        for (got, want) in split_qkv(&x, &d).unwrap().iter().zip(&want) {
            assert_eq!(got.shape(), want.shape());
            assert!(got.eq_values(want).unwrap(), "{:?}", d); // views: compared by value, not memory
        }
    }
}

/// The gated norm with a gate given as rows [N, Hv*Dv] is the gated norm
/// over [B, L, Hv, Dv] reshaped to rows, bit for bit.
#[test]
fn gated_norm_with_row_gate_equals_the_head_layout() {
    random::seed(3).unwrap();
    let n = |s: &[i32]| random::normal::<f32>(s, None, None, None).unwrap();
    let (b, l, hv, dv) = (2, 3, 4, 5);
    let (y, z, w) = (n(&[b, l, hv, dv]), n(&[b, l, hv, dv]), n(&[dv]));
    let heads = rms_norm_gated(&y, &z, &w, 1e-6).unwrap().reshape(&[b * l, hv * dv]).unwrap();
    let rows = rms_norm_gated(&y, &z.reshape(&[b * l, hv * dv]).unwrap(), &w, 1e-6).unwrap();
    assert_eq!(rows.shape(), [b * l, hv * dv]);
    assert_eq!(rows.as_slice::<f32>(), heads.as_slice::<f32>());
}

/// Running L tokens at once equals running them in two pieces with the
/// state carried over, and equals a per-element scalar reference.
#[test]
fn recurrence_carries_state_across_pieces() {
    random::seed(7).unwrap();
    let n = |s: &[i32]| random::normal::<f32>(s, None, None, None).unwrap();
    let (b, l, hk, hv, dk, dv) = (1, 5, 1, 2, 4, 3);
    let (q, k) = normalize_qk(&n(&[b, l, hk, dk]), &n(&[b, l, hk, dk]), 0.5, 1e-6).unwrap();
    let (v, a, bb) = (n(&[b, l, hv, dv]), n(&[b, l, hv]), n(&[b, l, hv]));
    let (a_log, dt) = (n(&[hv]), n(&[hv]));
    let (y, s) = gated_delta_update(&q, &k, &v, &a, &bb, &a_log, &dt, None).unwrap();
    let cut = |x: &Array| x.split_at_indices(&[2], 1).unwrap();
    let (qs, ks, vs, as_, bs) = (cut(&q), cut(&k), cut(&v), cut(&a), cut(&bb));
    let (y0, s0) = gated_delta_update(&qs[0], &ks[0], &vs[0], &as_[0], &bs[0], &a_log, &dt, None).unwrap();
    let (y1, s1) = gated_delta_update(&qs[1], &ks[1], &vs[1], &as_[1], &bs[1], &a_log, &dt, Some(s0)).unwrap();
    assert!(max_diff(&y, &ops::concatenate(&[y0, y1], 1).unwrap()) < 1e-6);
    assert!(max_diff(&s, &s1) < 1e-6);

    // scalar reference: S <- g S; S += k (beta (v - S k))^T; y = S q
    let f = |x: &Array| x.as_slice::<f32>().to_vec();
    let (qv, kv, vv) = (f(&q), f(&k), f(&v));
    let (av, bv, al, dtv) = (f(&a), f(&bb), f(&a_log), f(&dt));
    let mut st = vec![0f32; (hv * dv * dk) as usize];
    let yv = f(&y);
    for t in 0..l as usize {
        for h in 0..hv as usize {
            let x = av[t * hv as usize + h] + dtv[h];
            let g = (-al[h].exp() * (x.exp().ln_1p())).exp();
            let beta = 1.0 / (1.0 + (-bv[t * hv as usize + h]).exp());
            let kh = &kv[t * (hk * dk) as usize..][..dk as usize]; // hk = 1: every value head reads key head 0
            let qh = &qv[t * (hk * dk) as usize..][..dk as usize];
            for i in 0..dv as usize {
                let row = &mut st[(h * dv as usize + i) * dk as usize..][..dk as usize];
                row.iter_mut().for_each(|s| *s *= g);
                let mem: f32 = row.iter().zip(kh).map(|(s, k)| s * k).sum();
                let delta = (vv[(t * hv as usize + h) * dv as usize + i] - mem) * beta;
                row.iter_mut().zip(kh).for_each(|(s, k)| *s += k * delta);
                let out: f32 = row.iter().zip(qh).map(|(s, q)| s * q).sum();
                let got = yv[(t * hv as usize + h) * dv as usize + i];
                assert!((out - got).abs() < 1e-5, "t {t} h {h} i {i}: {out} vs {got}");
            }
        }
    }
}

/// q/k normalisation with the readout scales as the RMSNorm's weight is
/// mlx-lm's `scale * rms_norm(x, None)` bit for bit, in each float dtype.
#[test]
fn qk_scales_as_norm_weight_equal_a_scaled_norm() {
    random::seed(11).unwrap();
    let (dk, eps) = (16, 1e-6);
    let inv = (dk as f32).powf(-0.5);
    for dt in [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16] {
        let x = random::normal::<f32>(&[2, 3, 4, dk], None, None, None).unwrap().as_dtype(dt).unwrap();
        let y = random::normal::<f32>(&[2, 3, 4, dk], None, None, None).unwrap().as_dtype(dt).unwrap();
        let (q, k) = normalize_qk(&x, &y, inv, eps).unwrap();
        let scaled = |x: &Array, s: f32| {
            let n = fast::rms_norm(x, None, eps * inv * inv).unwrap();
            n.multiply(Array::from_f32(s).as_dtype(dt).unwrap()).unwrap()
        };
        let bits = |a: &Array| a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(q.dtype(), dt);
        assert_eq!(bits(&q), bits(&scaled(&x, inv * inv)), "q {dt:?}");
        assert_eq!(bits(&k), bits(&scaled(&y, inv)), "k {dt:?}");
    }
}

/// The compiled precise SwiGLU of the gated norm rounds as the steps it
/// fuses: cast to float32, SiLU, product, cast back (bf16, f16, f32).
#[test]
fn precise_swiglu_equals_the_steps() {
    random::seed(5).unwrap();
    for dt in [Dtype::Bfloat16, Dtype::Float16, Dtype::Float32] {
        let n = |s: &[i32]| random::normal::<f32>(s, None, None, None).unwrap().multiply(Array::from_f32(4.0)).unwrap().as_dtype(dt).unwrap();
        let (gate, x) = (n(&[3, 512]), n(&[3, 512]));
        let steps = nn::silu(gate.as_dtype(Dtype::Float32).unwrap()).unwrap();
        let steps = steps.multiply(x.as_dtype(Dtype::Float32).unwrap()).unwrap().as_dtype(dt).unwrap();
        let fused = precise_swiglu(&gate, &x, dt).unwrap();
        assert_eq!(fused.dtype(), dt);
        let bits = |a: &Array| a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused), bits(&steps), "{dt:?}");
    }
}

/// mlx-lm's `gated_delta_ops` op for op (a token taken at a time, its
/// `_gated_delta_step_ops` with the casts left to MLX's type promotion, y
/// cast per token, `mx.where` on the state; y 0 at masked tokens as the
/// kernel): the reference the composed path must equal bit for bit.
fn mlx_lm_ops(q: &Array, k: &Array, v: &Array, g: &Array, beta: &Array, state: Array, mask: Option<&Array>) -> (Array, Array) {
    let (hk, hv) = (q.dim(2), v.dim(2));
    let (q, k) = (Array::repeat_axis::<f32>(q.clone(), hv / hk, -2).unwrap(), Array::repeat_axis::<f32>(k.clone(), hv / hk, -2).unwrap());
    let at = |x: &Array, t: i32| x.take_axis(Array::from_int(t), 1).unwrap();
    let mut state = state;
    let mut ys = vec![];
    for t in 0..q.dim(1) {
        let (qt, kt, vt, gt, bt) = (at(&q, t), at(&k, t), at(v, t), at(g, t), at(beta, t));
        let old = state.clone();
        let s = state.multiply(gt.expand_dims_axes(&[-1, -2]).unwrap()).unwrap();
        let kv_mem = s.multiply(kt.expand_dims(-2).unwrap()).unwrap().sum_axis(-1, false).unwrap();
        let delta = vt.subtract(&kv_mem).unwrap().multiply(bt.expand_dims(-1).unwrap()).unwrap();
        let s = s.add(kt.expand_dims(-2).unwrap().multiply(delta.expand_dims(-1).unwrap()).unwrap()).unwrap();
        let mut y = s.multiply(qt.expand_dims(-2).unwrap()).unwrap().sum_axis(-1, false).unwrap().as_dtype(q.dtype()).unwrap();
        state = s;
        if let Some(m) = mask {
            let m = at(m, t);
            let zero = Array::from_f32(0.0).as_dtype(y.dtype()).unwrap();
            y = ops::select(m.expand_dims_axes(&[-1, -2]).unwrap(), &y, &zero).unwrap();
            state = ops::select(m.expand_dims_axes(&[-1, -2, -3]).unwrap(), &state, &old).unwrap();
        }
        ys.push(y);
    }
    (ops::stack(&ys, 1).unwrap(), state)
}

/// The composed recurrence (its inputs cast once, laid out per token, the
/// sums keeping their axis) equals mlx-lm's op-for-op loop bit for bit:
/// 1 and 5 tokens, GQA, float32 and bf16 inputs, with and without a mask.
#[test]
fn composed_recurrence_equals_mlx_lm_ops_bit_for_bit() {
    random::seed(13).unwrap();
    let (b, hk, hv, dk, dv) = (2, 2, 4, 8, 6);
    let bits = |a: &Array| a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for dt in [Dtype::Float32, Dtype::Bfloat16] {
        for l in [1, 5] {
            let n = |s: &[i32]| random::normal::<f32>(s, None, None, None).unwrap();
            let (q, k) = normalize_qk(&n(&[b, l, hk, dk]).as_dtype(dt).unwrap(), &n(&[b, l, hk, dk]).as_dtype(dt).unwrap(), 0.35, 1e-6).unwrap();
            let v = n(&[b, l, hv, dv]).as_dtype(dt).unwrap();
            let g = compute_g(&n(&[hv]), &n(&[b, l, hv]).as_dtype(dt).unwrap(), &n(&[hv]).as_dtype(dt).unwrap()).unwrap();
            let beta = nn::sigmoid(n(&[b, l, hv]).as_dtype(dt).unwrap()).unwrap();
            let state = n(&[b, hv, dv, dk]).multiply(Array::from_f32(0.3)).unwrap();
            let m: Vec<bool> = (0..b).flat_map(|r| (0..l).map(move |j| j >= r.min(l - 1))).collect();
            let mask = Array::from_slice(&m, &[b, l]);
            let (y, s) = gated_delta_ops(&q, &k, &v, &g, &beta, state.clone()).unwrap();
            let (yr, sr) = mlx_lm_ops(&q, &k, &v, &g, &beta, state.clone(), None);
            assert_eq!((y.shape(), y.dtype()), (yr.shape(), yr.dtype()));
            assert_eq!(bits(&y), bits(&yr), "{dt:?} L {l}");
            assert_eq!(bits(&s), bits(&sr), "{dt:?} L {l}");
            let (y, s) = gated_delta_ops_masked(&q, &k, &v, &g, &beta, state.clone(), &mask).unwrap();
            let (yr, sr) = mlx_lm_ops(&q, &k, &v, &g, &beta, state, Some(&mask));
            assert_eq!(bits(&y), bits(&yr), "{dt:?} L {l} masked");
            assert_eq!(bits(&s), bits(&sr), "{dt:?} L {l} masked");
        }
    }
}
