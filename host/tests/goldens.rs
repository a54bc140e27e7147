//! Level 1: every tiny model mlx-lm made (llama, qwen2, qwen3, qwen3_moe, bitnet, gemma3_text; float32 and affine
//! 2-8 bit, group 32/64, mixed recipes, tied/untied, sharded; mxfp4, mxfp8,
//! nvfp4 and a recipe mixing modes per layer) against the logits and greedy
//! tokens mlx-lm recorded (tests/goldens/make_goldens.py, make_fp_goldens.py).
mod common;

use common::golden::{compare, Golden, Tally};
use rmlx::engine::LoadedModel;

#[test]
fn tiny_models_match_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut paths: Vec<_> = std::fs::read_dir(common::fixture("goldens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        // real-*.json: real models' greedy tokens (tests/real_*.rs), no logits
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("real-")))
        .collect();
    paths.sort();
    assert!(paths.len() >= 43, "expected the golden fixtures, found {}", paths.len());
    for arch in ["llama", "llama-tied", "qwen3"] {
        for mode in ["mxfp4", "mxfp8", "nvfp4", "mixed-fp"] {
            let name = format!("{arch}-{mode}.json");
            assert!(paths.iter().any(|p| p.ends_with(&name)), "missing golden {name} (make_fp_goldens.py)");
        }
    }
    // BitNet: packed ternary BitLinear (f32; options: untied BitLinear lm_head,
    // biases, traditional + linear RoPE; bf16 as the checkpoints ship).
    // Ternary Bonsai: qwen3 in MLX affine 2-bit g128 with float16 scales.
    for name in ["bitnet-f32", "bitnet-options-f32", "bitnet-bf16", "qwen3-bonsai-q2-g128"] {
        assert!(paths.iter().any(|p| p.ends_with(format!("{name}.json"))), "missing golden {name} (make_goldens.py bitnet)");
    }
    // Gemma 3: local (8-token window, shorter than the prompts) and global
    // layers, tied and untied head, float32 and affine 4/8 bits.
    for name in ["gemma3_text-f32", "gemma3_text-q4-g64", "gemma3_text-q8-g64", "gemma3_text-untied-f32"] {
        assert!(paths.iter().any(|p| p.ends_with(format!("{name}.json"))), "missing golden {name} (make_goldens.py gemma3_text)");
    }
    // Qwen3-MoE: sparse (8 experts, top-2 renormalised / top-3 not) and
    // dense layers, expert (switch) layers in float32, affine 4/8 bits and
    // mxfp4; a 40-token prompt whose prefill sorts the tokens by expert.
    for name in ["qwen3_moe-f32", "qwen3_moe-q4-g64", "qwen3_moe-q8-g64", "qwen3_moe-mxfp4", "qwen3_moe-nonorm-f32"] {
        assert!(paths.iter().any(|p| p.ends_with(format!("{name}.json"))), "missing golden {name} (make_goldens.py qwen3_moe)");
    }
    let mut tally = Tally::default();
    for path in &paths {
        let golden: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut model = LoadedModel::load(&common::fixture(&format!("models/{}", golden.model)), &reg)
            .unwrap_or_else(|e| panic!("{}: {e:#}", golden.model));
        assert!(model.unused.is_empty(), "{}: unused tensors {:?}", golden.model, model.unused);
        compare(&mut model, &golden, &mut tally);
    }
    let Tally { failures, worst, compared } = tally;
    eprintln!("{compared} steps compared over {} models, worst relative error {worst:e}", paths.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}
