//! The fused decode kernel (`rmlx_kernels::paged_decode`, on a GPU
//! backend) against the composed path on the same compressed blocks: every
//! rotation family without QJL and the affine families, head sizes 64/96/128, GQA, ragged rows with
//! scattered tables and a window, sinks and soft-cap, float32 and bfloat16
//! activations. On the CPU backend `attend` composes, so the two agree
//! exactly; on a GPU this is the kernel's check (run with `--nocapture` to
//! see which ran).
use super::*;
use crate::codec;
use rmlx_plugin_api::author::kv::{composed_attend, max_abs_diff, AttendOpts, KvCodecImpl, Paged};

const BS: i32 = 16;
const POOL_BLOCKS: i32 = 24;
const H: i32 = 8;
const K: i32 = 2;
/// Rows' block tables (scattered, padded with block 0) and lengths.
const TABLES: [[i32; 4]; 3] = [[7, 2, 19, 11], [4, 9, 0, 0], [23, 0, 0, 0]];
const LENS: [i32; 3] = [61, 20, 9];

fn case(name: &str, d: i32, dtype: Dtype, window: i32, sinks: bool, softcap: f32) -> f32 {
    let c: Box<dyn KvCodecImpl> = codec(name).unwrap();
    let dm = dims(K, d, dtype);
    let slots = POOL_BLOCKS * BS;
    let enc = |seed| {
        let x = gaussian(slots, K, d, seed).as_dtype(dtype).unwrap();
        c.encode(&x, &dm).unwrap()
    };
    let (kp, vp) = (enc(21), enc(22));
    let ctx = *LENS.iter().max().unwrap();
    let nblk = (ctx + BS - 1) / BS;
    let tables = Array::from_iter(TABLES.iter().flat_map(|t| t[..nblk as usize].to_vec()), &[3, nblk]);
    // Decode: row b's one query sits at LENS[b] - 1.
    let mut m = Vec::new();
    for len in LENS {
        let pos = len - 1;
        m.extend((0..ctx).map(|j| j <= pos && (window == 0 || j > pos - window)));
    }
    let mask = Array::from_slice(&m, &[3, 1, 1, ctx]);
    let q = gaussian(3 * H, 1, d, 23).reshape(&[3, H, 1, d]).unwrap().as_dtype(dtype).unwrap();
    let sk = Array::from_iter((0..H).map(|i| 0.3 * i as f32 - 1.0), &[H]);
    let mut opts = AttendOpts::plain(1.0 / (d as f32).sqrt());
    opts.softcap = softcap;
    if sinks {
        opts.sinks = Some(&sk);
    }
    let paged = Paged { tables: &tables, block_size: BS, ctx, mask: Some(&mask), opts };
    let fused = c.attend(&q, &kp, &vp, &paged, &dm, &dm).unwrap();
    let composed = composed_attend(c.as_ref(), c.as_ref(), &q, &kp, &vp, &paged, &dm, &dm).unwrap();
    assert_eq!(fused.shape(), composed.shape());
    max_abs_diff(&fused.as_dtype(Dtype::Float32).unwrap(), &composed.as_dtype(Dtype::Float32).unwrap()).unwrap()
}

#[test]
fn fused_decode_equals_composed() {
    let gpu = rmlx_kernels::enabled();
    eprintln!("fused kernels: {:?} ({})", rmlx_kernels::backend(), if gpu { "fused path checked" } else { "composed on both sides" });
    let mut worst = 0f32;
    for name in ["turbo4", "turbo3", "turbo2", "planar4", "iso3", "rotor3", "q8", "q4", "q2", "fp8"] {
        for d in [64, 128, 96] {
            for (dtype, tol) in [(Dtype::Float32, 2e-4), (Dtype::Bfloat16, 2e-2)] {
                for &(window, sinks, cap) in &[(0, false, 0.0), (17, true, 0.0), (0, false, 30.0)] {
                    let e = case(name, d, dtype, window, sinks, cap);
                    worst = worst.max(e);
                    if name == "fp8" && gpu {
                        eprintln!("fp8 d={d} {dtype:?} window={window} sinks={sinks} cap={cap}: max |fused - composed| = {e}");
                    }
                    assert!(e <= tol, "{name} d={d} {dtype:?} window={window} sinks={sinks} cap={cap}: max |fused - composed| = {e}");
                }
            }
        }
    }
    eprintln!("worst |fused - composed| = {worst}");
    // On a GPU, `attend` checks each kernel's first output against the
    // composed path and turns it off when they differ: it must have stayed on.
    if gpu {
        for key in ["paged_decode/rotated", "paged_decode/affine", "paged_decode/fp8"] {
            assert!(rmlx_kernels::usable(key), "{key} was turned off by its first check");
        }
    }
}
