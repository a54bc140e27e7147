//! The gated DeltaNet recurrence: the fused kernel (`rmlx_kernels::gated_delta`,
//! on a GPU backend) against the composed path (`gated_delta_ops`) on random
//! inputs, and both against a plain scalar loop: batch 1 and 3, 1 and 37
//! tokens, GQA (Hv = 2 Hk), Dk 128 / Dv 64, float32 and bfloat16, a nonzero
//! initial state, with and without a padding mask. On the CPU (CI) the
//! kernel does not serve, and the composed path is checked against the
//! scalar loop. On the GPU machine: `gdn-test --nocapture` from the bundle
//! (scripts/gpu/bundle.sh), which prints the worst differences.
use mlx_rs::{random, Array, Dtype};
use rmlx_nn::gated_delta::{
    compute_g, gated_delta, gated_delta_fused, gated_delta_ops, gated_delta_ops_masked, normalize_qk,
};

const HK: i32 = 2;
const HV: i32 = 4;
const DK: i32 = 128;
const DV: i32 = 64;

struct Case {
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    state: Array,
    mask: Array,
}

fn case(b: i32, t: i32, dtype: Dtype, seed: u64) -> Case {
    let normal = |i: u64, shape: &[i32]| {
        let key = random::key(seed * 16 + i).unwrap();
        random::normal::<f32>(shape, None, None, Some(&key)).unwrap()
    };
    let cast = |x: Array| x.as_dtype(dtype).unwrap();
    let (q, k) = (cast(normal(0, &[b, t, HK, DK])), cast(normal(1, &[b, t, HK, DK])));
    let (q, k) = normalize_qk(&q, &k, (DK as f32).powf(-0.5), 1e-6).unwrap();
    let v = cast(normal(2, &[b, t, HV, DV]));
    let a = cast(normal(3, &[b, t, HV]));
    let bb = cast(normal(4, &[b, t, HV]));
    let a_log = cast(normal(5, &[HV]).multiply(Array::from_f32(0.5)).unwrap());
    let dt = cast(normal(6, &[HV]));
    let g = compute_g(&a_log, &a, &dt).unwrap(); // [B, T, Hv] float32
    let beta = mlx_rs::nn::sigmoid(&bb).unwrap(); // [B, T, Hv]
    let state = normal(7, &[b, HV, DV, DK]).multiply(Array::from_f32(0.3)).unwrap(); // float32
    // Row r masks its first r tokens (left padding): row 0 is whole.
    let m: Vec<bool> = (0..b).flat_map(|r| (0..t).map(move |j| j >= r.min(t - 1))).collect();
    let mask = Array::from_slice(&m, &[b, t]);
    Case { q, k, v, g, beta, state, mask }
}

fn f32s(x: &Array) -> Vec<f32> {
    x.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec()
}

/// The recurrence as a scalar loop in float64 over the inputs' values:
/// (y [B, T, Hv, Dv], state [B, Hv, Dv, Dk]).
fn scalar(c: &Case, masked: bool) -> (Vec<f32>, Vec<f32>) {
    let (b, t) = (c.q.dim(0) as usize, c.q.dim(1) as usize);
    let (hk, hv, dk, dv) = (HK as usize, HV as usize, DK as usize, DV as usize);
    let (q, k, v, g, beta, m) = (f32s(&c.q), f32s(&c.k), f32s(&c.v), f32s(&c.g), f32s(&c.beta), c.mask.as_slice::<bool>());
    let mut s: Vec<f64> = f32s(&c.state).iter().map(|&x| x as f64).collect();
    let mut y = vec![0f32; b * t * hv * dv];
    for bi in 0..b {
        for ti in 0..t {
            if masked && !m[bi * t + ti] {
                continue; // state as it is, y 0
            }
            for h in 0..hv {
                let gh = (bi * t + ti) * hv + h;
                let kq = ((bi * t + ti) * hk + h / (hv / hk)) * dk;
                let (gt, bt) = (g[gh] as f64, beta[gh] as f64);
                for i in 0..dv {
                    let row = &mut s[((bi * hv + h) * dv + i) * dk..][..dk];
                    row.iter_mut().for_each(|x| *x *= gt);
                    let mem: f64 = row.iter().zip(&k[kq..kq + dk]).map(|(x, &kk)| x * kk as f64).sum();
                    let delta = (v[gh * dv + i] as f64 - mem) * bt;
                    row.iter_mut().zip(&k[kq..kq + dk]).for_each(|(x, &kk)| *x += kk as f64 * delta);
                    y[gh * dv + i] = row.iter().zip(&q[kq..kq + dk]).map(|(x, &qq)| x * qq as f64).sum::<f64>() as f32;
                }
            }
        }
    }
    (y, s.iter().map(|&x| x as f32).collect())
}

/// max |a - b| over the largest |b| (at least 1).
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let mag = b.iter().map(|y| y.abs()).fold(1f32, f32::max);
    assert!(err.is_finite(), "non-finite difference");
    err / mag
}

#[test]
fn fused_gated_delta_equals_composed() {
    let gpu = rmlx_kernels::enabled();
    eprintln!(
        "fused kernels: {:?}, enabled: {gpu} ({})",
        rmlx_kernels::backend(),
        if gpu { "fused checked against composed" } else { "composed checked against the scalar loop" }
    );
    let (mut worst_y, mut worst_s, mut worst_ref) = (0f32, 0f32, 0f32);
    for (dtype, tol_y) in [(Dtype::Float32, 1e-4f32), (Dtype::Bfloat16, 2e-2)] {
        for b in [1, 3] {
            for t in [1, 37] {
                for masked in [false, true] {
                    let c = case(b, t, dtype, (b * 100 + t) as u64);
                    let what = format!("{dtype:?} B={b} T={t} masked={masked}");
                    let (yc, sc) = if masked {
                        gated_delta_ops_masked(&c.q, &c.k, &c.v, &c.g, &c.beta, c.state.clone(), &c.mask).unwrap()
                    } else {
                        gated_delta_ops(&c.q, &c.k, &c.v, &c.g, &c.beta, c.state.clone()).unwrap()
                    };
                    assert_eq!(yc.shape(), [b, t, HV, DV], "{what}");
                    assert_eq!(yc.dtype(), dtype, "{what}");
                    assert_eq!(sc.dtype(), Dtype::Float32, "{what}");
                    // The composed path against the scalar loop (the state in
                    // float32 both ways; y rounded to the input dtype).
                    let (ys, ss) = scalar(&c, masked);
                    let (ey, es) = (rel(&f32s(&yc), &ys), rel(&f32s(&sc), &ss));
                    assert!(ey <= tol_y && es <= 1e-4, "{what}: composed vs scalar: y {ey}, state {es}");
                    worst_ref = worst_ref.max(ey).max(es);
                    let mask = if masked { Some(&c.mask) } else { None };
                    let fused = gated_delta_fused(&c.q, &c.k, &c.v, &c.g, &c.beta, &c.state, mask).unwrap();
                    let Some((yf, sf)) = fused else {
                        assert!(!gpu, "{what}: the kernel did not serve on a GPU backend");
                        continue;
                    };
                    assert_eq!(yf.shape(), yc.shape(), "{what}");
                    assert_eq!(yf.dtype(), dtype, "{what}");
                    assert_eq!(sf.shape(), sc.shape(), "{what}");
                    assert_eq!(sf.dtype(), Dtype::Float32, "{what}");
                    let (ey, es) = (rel(&f32s(&yf), &f32s(&yc)), rel(&f32s(&sf), &f32s(&sc)));
                    eprintln!("{what}: |fused - composed| / max|composed|: y {ey:.3e}, state {es:.3e}");
                    assert!(ey <= tol_y && es <= 1e-4, "{what}: fused vs composed: y {ey}, state {es}");
                    worst_y = worst_y.max(ey);
                    worst_s = worst_s.max(es);
                }
            }
        }
    }
    // The dispatching entry point (what the hybrids run): its first output
    // is checked against the composed path and must leave the kernel on.
    let c = case(3, 37, Dtype::Bfloat16, 5);
    let (y, s) = gated_delta(&c.q, &c.k, &c.v, &c.g, &c.beta, c.state.clone()).unwrap();
    let (yc, sc) = gated_delta_ops(&c.q, &c.k, &c.v, &c.g, &c.beta, c.state.clone()).unwrap();
    assert!(rel(&f32s(&y), &f32s(&yc)) <= 2e-2 && rel(&f32s(&s), &f32s(&sc)) <= 1e-4);
    if gpu {
        assert!(rmlx_kernels::usable("gated_delta"), "the gated delta kernel was turned off by its first check");
        eprintln!("gated delta worst |fused - composed| (relative): y {worst_y:.3e}, state {worst_s:.3e}");
    }
    eprintln!("gated delta worst |composed - scalar| (relative): {worst_ref:.3e}");
}
