//! The dense family's decode attention (`attend`: the fused paged kernel on
//! a GPU backend, MLX's sdpa on the gathered blocks on the CPU) against the
//! composed path on the same blocks: scattered tables, ragged rows, GQA, a
//! window, sinks and soft-cap, head sizes 64/128, float32 and bfloat16.
use mlx_rs::{random, Array, Dtype};
use rmlx_kv_dense::codec;
use rmlx_plugin_api::author::kv::{composed_attend, max_abs_diff, AttendOpts, KvCodecImpl, LayerDims, Paged};

const BS: i32 = 16;
const H: i32 = 8;
const K: i32 = 2;
const TABLES: [[i32; 4]; 3] = [[7, 2, 19, 11], [4, 9, 0, 0], [23, 0, 0, 0]];
const LENS: [i32; 3] = [61, 20, 9];

fn case(family: &str, d: i32, window: i32, sinks: bool, softcap: f32) -> f32 {
    let c = codec(family).unwrap();
    let dtype = c.dtype;
    let dm = LayerDims { kv_heads: K, head_dim: d, dtype };
    let slots = 24 * BS;
    let key = random::key(7).unwrap();
    let ks = random::split(&key, 3).unwrap();
    let normal = |k: &Array, shape: &[i32]| random::normal::<f32>(shape, None, None, Some(k)).unwrap().as_dtype(dtype).unwrap();
    let kp = c.encode(&normal(&ks.0, &[slots, K, d]), &dm).unwrap();
    let vp = c.encode(&normal(&ks.1, &[slots, K, d]), &dm).unwrap();
    let q = normal(&key, &[3, H, 1, d]);
    let ctx = *LENS.iter().max().unwrap();
    let nblk = (ctx + BS - 1) / BS;
    let tables = Array::from_iter(TABLES.iter().flat_map(|t| t[..nblk as usize].to_vec()), &[3, nblk]);
    let mut m = Vec::new();
    for len in LENS {
        let pos = len - 1;
        m.extend((0..ctx).map(|j| j <= pos && (window == 0 || j > pos - window)));
    }
    let mask = Array::from_slice(&m, &[3, 1, 1, ctx]);
    let sk = Array::from_iter((0..H).map(|i| 0.3 * i as f32 - 1.0), &[H]);
    let mut opts = AttendOpts::plain(1.0 / (d as f32).sqrt());
    opts.softcap = softcap;
    if sinks {
        opts.sinks = Some(&sk);
    }
    let paged = Paged { tables: &tables, block_size: BS, ctx, mask: Some(&mask), opts };
    let fused = c.attend(&q, &kp, &vp, &paged, &dm, &dm).unwrap();
    let composed = composed_attend(&c, &c, &q, &kp, &vp, &paged, &dm, &dm).unwrap();
    max_abs_diff(&fused.as_dtype(Dtype::Float32).unwrap(), &composed.as_dtype(Dtype::Float32).unwrap()).unwrap()
}

#[test]
fn dense_decode_equals_composed() {
    eprintln!("fused kernels: {:?}, enabled: {}", rmlx_kernels::backend(), rmlx_kernels::enabled());
    for (family, tol) in [("f32", 2e-4), ("bf16", 3e-2)] {
        for d in [64, 128] {
            for &(window, sinks, cap) in &[(0, false, 0.0), (17, true, 0.0), (0, false, 30.0)] {
                let e = case(family, d, window, sinks, cap);
                assert!(e <= tol, "{family} d={d} window={window} sinks={sinks} cap={cap}: {e}");
            }
        }
    }
    if rmlx_kernels::enabled() {
        assert!(rmlx_kernels::usable("paged_decode/dense"), "the dense kernel was turned off by its first check");
    }
}

/// `rmlx_kernels::contiguous_decode` (the compiled step's attention on a
/// GPU: buffers [B, K, CTX, D] with a `valid` mask as data) against MLX's
/// sdpa with the same mask. On the CPU it declines (None).
#[test]
fn contiguous_decode_equals_sdpa() {
    use mlx_rs::fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask};
    let (b, ctx) = (2, 80);
    for (dtype, tol) in [(Dtype::Float32, 2e-4), (Dtype::Bfloat16, 3e-2)] {
        for d in [64, 128] {
            let key = random::key(11).unwrap();
            let ks = random::split(&key, 3).unwrap();
            let normal = |k: &Array, shape: &[i32]| random::normal::<f32>(shape, None, None, Some(k)).unwrap().as_dtype(dtype).unwrap();
            let keys = normal(&ks.0, &[b, K, ctx, d]);
            let values = normal(&ks.1, &[b, K, ctx, d]);
            let q = normal(&key, &[b, H, 1, d]);
            // Row 0 sees slots 0..=40, row 1 slots 0..=6.
            let m: Vec<bool> = [40, 6].iter().flat_map(|&p| (0..ctx).map(move |j| j <= p)).collect();
            let valid = Array::from_slice(&m, &[b, ctx]);
            let scale = 1.0 / (d as f32).sqrt();
            let Some(fused) = rmlx_kernels::contiguous_decode(&q, &keys, &values, &valid, None, scale, 0.0).unwrap() else {
                assert!(!rmlx_kernels::enabled(), "a GPU backend declined the contiguous decode kernel");
                return;
            };
            assert_eq!(fused.shape(), q.shape());
            assert_eq!(fused.dtype(), dtype);
            let mask = valid.reshape(&[b, 1, 1, ctx]).unwrap();
            let reference = scaled_dot_product_attention(&q, &keys, &values, scale, ScaledDotProductAttentionMask::Array(&mask), None).unwrap();
            let e = max_abs_diff(&fused.as_dtype(Dtype::Float32).unwrap(), &reference.as_dtype(Dtype::Float32).unwrap()).unwrap();
            assert!(e <= tol, "{dtype:?} d={d}: {e}");
        }
    }
}
