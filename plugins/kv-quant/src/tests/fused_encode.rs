//! The fused encode kernel (`rmlx_kernels::rotated_encode`, on a GPU
//! backend) against the composed encode on the same vectors: every rotation
//! family (Hadamard and dense turbo, planar, iso, rotor, with and without
//! QJL, group norms), head sizes 64/128/96/80 (a dense rotation, rotor and
//! bit-plane tails), float32 and bfloat16 inputs, zero vectors included.
//! Codes must agree except in a neighbouring cell at float-rounding ties
//! (dense rotation and QJL: MLX's CUDA matmul runs TF32 by default), norms
//! within bf16 rounding. On the CPU the fused path is absent and `encode`
//! is the composed path exactly. Run with `--nocapture` to see the worst
//! differences per family.
use super::*;
use crate::{
    iso::iso,
    planar::{givens, planar},
    quant::NormMode,
    rotated::RotatedCodec,
    rotated_gpu::compare_encoded,
    rotor::rotor,
    turbo::turbo,
};
use rmlx_plugin_api::author::kv::KvCodecImpl;

fn families() -> Vec<RotatedCodec> {
    vec![
        turbo("turbo4", 4, false),
        turbo("turbo3", 3, false),
        turbo("turbo2", 2, false),
        turbo("turbo4q", 4, true),
        turbo("turbo3q", 3, true),
        planar("planar4", 4),
        planar("planar3", 3),
        iso("iso4", 4),
        iso("iso3", 3),
        rotor("rotor4", 4, false),
        rotor("rotor3", 3, false),
        rotor("rotor4q", 4, true),
        rotor("rotor3q", 3, true),
        RotatedCodec::new("planar3-g16", 3, false, NormMode::Preserve, 5, givens).with_group(16),
    ]
}

/// [n, k, d]: outlier channels as real keys have, and vector 0 all zeros.
fn input(n: i32, k: i32, d: i32, seed: u64, dtype: Dtype) -> Array {
    let x = with_outliers(n, k, d, seed, &[1, d / 2 + 3], 8.0);
    let keep = Array::from_iter((0..n * k * d).map(|i| if i < k * d { 0f32 } else { 1f32 }), &[n, k, d]);
    x.multiply(&keep).unwrap().as_dtype(dtype).unwrap()
}

fn eq_exact(a: &Array, b: &Array) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype() && a.eq_values(b).unwrap()
}

#[test]
fn fused_encode_equals_composed() {
    let gpu = crate::rotated_gpu::encode_enabled();
    eprintln!("fused encode: {:?} ({})", rmlx_kernels::backend(), if gpu { "kernel checked" } else { "composed only" });
    let (mut codes, mut code_mism, mut signs, mut sign_mism, mut worst_norm) = (0usize, 0usize, 0usize, 0usize, 0f32);
    for c in families() {
        let (mut fam_codes, mut fam_mism, mut fam_step, mut fam_signs, mut fam_smism, mut fam_norm) = (0, 0, 0, 0, 0, 0f32);
        for d in [64, 128, 96, 80] {
            for (i, dtype) in [Dtype::Float32, Dtype::Bfloat16].into_iter().enumerate() {
                let dm = dims(3, d, dtype);
                let x = input(37, 3, d, 40 + d as u64 + i as u64, dtype);
                let composed = c.composed_encode(&x, &dm).unwrap();
                // `encode` is what the pool stores: the composed path on the CPU
                let stored = c.encode(&x, &dm).unwrap();
                assert_eq!(stored.len(), composed.len());
                let Some(fused) = c.fused_encode(&x, &dm).unwrap() else {
                    assert!(!gpu, "{} d={d}: no fused encode on a GPU", c.name);
                    for (a, b) in stored.iter().zip(&composed) {
                        assert!(eq_exact(a, b), "{} d={d} {dtype:?}: encode is not the composed path", c.name);
                    }
                    // the comparison itself: composed against composed is exact
                    let s = compare_encoded(&c, &composed, &composed, d).unwrap();
                    assert_eq!((s.code_mismatch, s.sign_mismatch, s.norm_rel), (0, 0, 0.0));
                    assert!(s.failure().is_none());
                    continue;
                };
                let s = compare_encoded(&c, &fused, &composed, d).unwrap();
                if s.code_mismatch + s.sign_mismatch > 0 {
                    eprintln!("  {} d={d} {dtype:?}: {s:?}", c.name);
                }
                assert!(s.failure().is_none(), "{} d={d} {dtype:?}: {s:?}", c.name);
                let hadamard_or_blocks = !c.name.starts_with("turbo") || d & (d - 1) == 0;
                if hadamard_or_blocks && !c.qjl {
                    // Hadamard and block rotations follow the composed arithmetic
                    assert!(s.code_mismatch <= 2, "{} d={d} {dtype:?}: {s:?}", c.name);
                }
                fam_codes += s.codes;
                fam_mism += s.code_mismatch;
                fam_step = fam_step.max(s.code_max_step);
                fam_signs += s.signs;
                fam_smism += s.sign_mismatch;
                fam_norm = fam_norm.max(s.norm_rel);
            }
        }
        if gpu {
            eprintln!(
                "{:12} codes {fam_mism}/{fam_codes} differ (max step {fam_step}), QJL signs {fam_smism}/{fam_signs}, norms rel {fam_norm:.2e}",
                c.name
            );
            // the runtime check of `encode` kept the kernel on
            for d in [64, 96] {
                assert!(rmlx_kernels::usable(c.encode_key(d).unwrap()), "{} d={d}: turned off by its check", c.name);
            }
        }
        codes += fam_codes;
        code_mism += fam_mism;
        signs += fam_signs;
        sign_mism += fam_smism;
        worst_norm = worst_norm.max(fam_norm);
    }
    if gpu {
        eprintln!("worst: codes {code_mism}/{codes} differ, QJL signs {sign_mism}/{signs}, norms rel {worst_norm:.2e}");
    }
}
