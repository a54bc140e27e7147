//! model_type `bitnet` (plugins/arch-llama/src/bitnet.rs) and Ternary Bonsai
//! (qwen3 in MLX affine 2-bit g128, float16 scales): the tiny models
//! tests/goldens/make_goldens.py built with mlx-lm's own classes, against the
//! logits and greedy tokens mlx-lm recorded; which plugin builds each layer;
//! and the bitnet configs that are refused by name.
mod common;

use common::golden::{compare, Golden, Tally};
use rmlx::engine::LoadedModel;
use std::path::Path;

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(name: &str, reg: &rmlx::plugins::Registry) -> LoadedModel {
    let mut model = LoadedModel::load(&common::fixture(&format!("models/{name}")), reg)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
    let mut tally = Tally::default();
    compare(&mut model, &golden(name), &mut tally);
    eprintln!("{name}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
    model
}

const PROJ: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[test]
fn bitnet_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    for name in ["bitnet-f32", "bitnet-options-f32", "bitnet-bf16"] {
        let model = check(name, &reg);
        assert_eq!(model.architecture_plugin, "arch-llama");
        // Every projection is BitLinear (autobitlinear: y = x·W · weight_scale),
        // the embedding dense; the untied head of the options model is BitLinear too.
        for i in 0..2 {
            for p in PROJ {
                let q = &model.layers[&format!("model.layers.{i}.{p}")];
                assert_eq!(q.mode, "bitnet-autobitlinear", "{name} layer {i} {p}");
            }
        }
        assert_eq!(model.layers["model.embed_tokens"].mode, "none", "{name}");
        let head = model.layers.get("lm_head").map(|q| q.mode.as_str());
        let want = if name == "bitnet-options-f32" { Some("bitnet-autobitlinear") } else { None };
        assert_eq!(head, want, "{name} lm_head");
    }
}

#[test]
fn ternary_bonsai_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let model = check("qwen3-bonsai-q2-g128", &reg);
    assert_eq!(model.architecture_plugin, "arch-qwen3");
    assert_eq!(model.layers.len(), 15, "{:?}", model.layers.keys().collect::<Vec<_>>());
    for (path, q) in &model.layers {
        assert_eq!((q.mode.as_str(), q.bits, q.group_size), ("affine", 2, 128), "{path}");
    }
}

/// config.json of bitnet-f32 with `edit` applied.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = common::fixture("models/bitnet-f32/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut c);
    c.to_string()
}

fn refused(reg: &rmlx::plugins::Registry, config: &str) -> String {
    let e = reg.check_config("bitnet", config).expect_err("config should be refused");
    format!("{e:#}")
}

#[test]
fn bitnet_configs_are_refused_by_name() {
    let reg = common::registry();
    assert!(reg.check_config("bitnet", &config_with(|_| ())).is_ok());
    let cases: Vec<(Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        (Box::new(|c| c["quantization_config"]["linear_class"] = "bitlinear".into()), "linear_class `bitlinear`"),
        (Box::new(|c| c["quantization_config"].as_object_mut().unwrap().clear()), "quant_method ``"),
        (Box::new(|c| c["quantization_config"]["quant_method"] = "awq".into()), "quant_method `awq`"),
        (Box::new(|c| drop(c.as_object_mut().unwrap().remove("quantization_config"))), "quantization_config is missing"),
        (Box::new(|c| c["quantization"] = serde_json::json!({"group_size": 64, "bits": 4})), "`quantization`"),
        (
            Box::new(|c| c["quantization_config"]["modules_to_not_convert"] = serde_json::json!(["model.layers.0.mlp.up_proj"])),
            "modules_to_not_convert lists `model.layers.0.mlp.up_proj`",
        ),
        (Box::new(|c| c["head_dim"] = 32.into()), "attn_sub_norm"),
        (Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 2.0})), "rope_scaling type `yarn`"),
        (Box::new(|c| drop(c.as_object_mut().unwrap().remove("num_key_value_heads"))), "num_key_value_heads"),
    ];
    for (edit, want) in cases {
        let e = refused(&reg, &config_with(edit));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

/// bitnet-f32 copied to a temporary directory with its config.json edited.
fn edited_copy(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("models/bitnet-f32");
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("config.json"), config_with(edit)).unwrap();
    dir
}

fn load_err(path: &Path, reg: &rmlx::plugins::Registry) -> String {
    match LoadedModel::load(path, reg) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bitnet_weights_must_fit_the_config() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // attention_bias says q/k/v/o carry a bias; the checkpoint has none.
    let dir = edited_copy(|c| c["attention_bias"] = true.into());
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("attention_bias is true but model.layers.0.self_attn.q_proj.bias is missing"), "{e}");
    // ffn_sub_norm is RMSNorm(intermediate_size).
    let dir = edited_copy(|c| c["intermediate_size"] = 64.into());
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("ffn_sub_norm.weight has shape [128], expected [intermediate_size = 64]"), "{e}");
}
