//! Fused projections (ABI 3.4): q/k/v and gate/up load as one linear each
//! where the weight format's tensors are per output row (dense, affine, the
//! MX/NV float formats), and stay apart where they are not (BitNet's packed
//! ternary weights) or where the layers' formats differ (a mixed recipe).
//! The goldens (tests/goldens.rs, wquant_models.rs) check the numbers.
mod common;

use rmlx::engine::LoadedModel;

fn fused(model: &str) -> (usize, usize) {
    let reg = common::registry();
    let m = LoadedModel::load(&common::fixture(&format!("models/{model}")), &reg).unwrap();
    (m.fused_linears, m.spec.num_layers as usize)
}

#[test]
fn stacking_formats_fuse_qkv_and_gate_up() {
    let _g = common::mlx_lock();
    for model in ["llama-f32", "llama-q4-g64", "llama-mxfp4", "llama-nvfp4", "qwen3-f32"] {
        let (n, layers) = fused(model);
        assert_eq!(n, 2 * layers, "{model}: q/k/v and gate/up fused in every layer");
    }
}

#[test]
fn other_formats_and_mixed_recipes_stay_apart() {
    let _g = common::mlx_lock();
    let (n, _) = fused("bitnet-f32");
    assert_eq!(n, 0, "BitNet's packed ternary weights do not stack by rows");
    let (n, layers) = fused("llama-mixed-3-6");
    assert_eq!(n, 2 * layers - 1, "llama-mixed-3-6: layer 1's v_proj (6 bits) stays apart from q/k (3 bits) ({n} of {})", 2 * layers);
}
