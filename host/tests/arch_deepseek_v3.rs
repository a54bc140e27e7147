//! model_type `deepseek_v3` (plugins/arch-deepseek: deepseek_v3.rs, mla.rs,
//! moe.rs): the tiny random model tests/goldens/deepseek_v3_goldens.py built
//! with mlx-lm 0.32.2's own class (MLA with a low-rank query and
//! qk_head_dim 12 != v_head_dim 8, YaRN RoPE with both scales, a dense
//! layer then a MoE layer routed by sigmoid scores with a correction bias
//! over 2 groups, a shared expert), against mlx-lm's logits and greedy
//! tokens:
//! - as mlx-lm saves it (`deepseek_v3-f32`: per-head `embed_q` /
//!   `unembed_out`, experts stacked);
//! - the same weights in Hugging Face's layout (`deepseek_v3-mtp-f32`:
//!   `kv_b_proj`, experts one by one), whose MTP module (layer 2) the plain
//!   model leaves unused;
//! - quantized by mlx-lm (`deepseek_v3-q4-g32`, a wider tiny model so that
//!   group size 32 divides every projection's input);
//! - the KV cache is the latent: one KV head of kv_lora_rank + qk_rope per
//!   layer;
//! - configs it does not implement are refused by name.
mod common;

use common::golden::{compare, Golden, Tally};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Loads `name` and compares it with golden `want`.
fn check_against(name: &str, want: &str, reg: &rmlx::plugins::Registry) -> LoadedModel {
    let mut model = LoadedModel::load_with(&common::fixture(&format!("models/{name}")), reg, LoadPolicy::default())
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mut tally = Tally::default();
    compare(&mut model, &golden(want), &mut tally);
    eprintln!("{name}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
    model
}

#[test]
fn deepseek_v3_matches_mlx_lm_in_both_layouts() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let model = check_against("deepseek_v3-f32", "deepseek_v3-f32", &reg);
    assert_eq!(model.architecture_plugin, "arch-deepseek");
    assert!(model.unused.is_empty(), "unused tensors {:?}", model.unused);
    // The cache holds the latent (16) and the RoPE key (4) in one KV head.
    assert_eq!((model.spec.num_layers, model.spec.num_kv_heads, model.spec.head_dim), (2, 1, 20));
    assert!(model.layers.contains_key("model.layers.1.self_attn.embed_q"), "mlx-lm's per-head layers");
    assert!(model.layers.contains_key("model.layers.1.mlp.switch_mlp.gate_proj"));
    assert!(model.layers.contains_key("model.layers.0.mlp.gate_proj"), "layer 0 is dense");

    let model = check_against("deepseek_v3-mtp-f32", "deepseek_v3-f32", &reg);
    assert!(model.layers.contains_key("model.layers.1.self_attn.kv_b_proj"), "Hugging Face's kv_b_proj");
    assert!(!model.unused.is_empty() && model.unused.iter().all(|t| t.starts_with("model.layers.2.")), "only the MTP module is unused: {:?}", model.unused);
}

/// mlx-lm's affine 4-bit g32 (`quantize_model`): every projection, the
/// experts' switch layers and the per-head `embed_q` / `unembed_out`
/// quantized (switch layers of the affine plugin), the router left float.
#[test]
fn quantized_deepseek_v3_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let model = check_against("deepseek_v3-q4-g32", "deepseek_v3-q4-g32", &reg);
    assert!(model.unused.is_empty(), "unused tensors {:?}", model.unused);
    let q = |path: &str| {
        let l = model.layers.get(path).unwrap_or_else(|| panic!("no layer {path}"));
        (l.mode.clone(), l.bits, l.group_size)
    };
    let affine = ("affine".to_string(), 4, 32);
    for path in ["model.layers.1.self_attn.embed_q", "model.layers.1.self_attn.unembed_out", "model.layers.1.self_attn.q_b_proj", "model.layers.1.mlp.switch_mlp.down_proj", "lm_head"] {
        assert_eq!(q(path), affine, "{path}");
    }
    assert_eq!(q("model.layers.1.mlp.gate").0, "none", "the router stays float");
}

/// config.json of deepseek_v3-f32 with `edit` applied.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = common::fixture("models/deepseek_v3-f32/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut c);
    c.to_string()
}

#[test]
fn deepseek_v3_configs_are_refused_by_name() {
    let reg = common::registry();
    assert!(reg.check_config("deepseek_v3", &config_with(|_| ())).is_ok());
    let cases: Vec<(Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        (Box::new(|c| c["topk_method"] = "group_limited_greedy".into()), "topk_method `group_limited_greedy`"),
        (Box::new(|c| c["scoring_func"] = "softmax".into()), "scoring_func `softmax`"),
        (Box::new(|c| c["n_group"] = 3.into()), "not a multiple of n_group 3"),
        (Box::new(|c| c["num_experts_per_tok"] = 3.into()), "num_experts_per_tok 3"),
        (Box::new(|c| c["qk_rope_head_dim"] = 5.into()), "qk_rope_head_dim must be even"),
        (Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0})), "rope_scaling type `dynamic`"),
    ];
    for (edit, want) in cases {
        let e = format!("{:#}", reg.check_config("deepseek_v3", &config_with(edit)).expect_err(want));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

/// Shapes in the checkpoint that disagree with the config are named.
#[test]
fn a_checkpoint_that_disagrees_with_its_config_is_refused() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        std::fs::copy(common::fixture(&format!("models/deepseek_v3-f32/{f}")), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("config.json"), config_with(|c| c["v_head_dim"] = 4.into())).unwrap();
    let e = format!("{:#}", LoadedModel::load_with(dir.path(), &reg, LoadPolicy::default()).err().expect("v_head_dim 4"));
    assert!(e.contains("embed_q is") && e.contains("unembed_out"), "{e}");
}
