//! model_type `qwen3_moe` (plugins/arch-qwen3/src/qwen3_moe.rs) and the
//! expert (switch) layers of the weight formats: the tiny models
//! tests/goldens/moe_goldens.py built with mlx-lm's own classes, against the
//! logits and greedy tokens mlx-lm recorded; which plugin builds each layer;
//! `--dequantize` on affine experts; the Hugging Face layout (experts one by
//! one) giving the same numbers; and the configs and checkpoints that are
//! refused by name.
mod common;

use common::golden::{compare, Golden, Tally};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::{ComputeDtype, LoadPolicy};
use std::path::Path;

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(name: &str, reg: &rmlx::plugins::Registry, policy: LoadPolicy) -> LoadedModel {
    let mut model = LoadedModel::load_with(&common::fixture(&format!("models/{name}")), reg, policy)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
    let mut tally = Tally::default();
    compare(&mut model, &golden(name), &mut tally);
    eprintln!("{name}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
    model
}

const EXPERTS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// (mode, bits, group size) of a module as loaded.
fn format(model: &LoadedModel, path: &str) -> (String, i32, i32) {
    let q = model.layers.get(path).unwrap_or_else(|| panic!("no layer {path}"));
    (q.mode.clone(), q.bits, q.group_size)
}

#[test]
fn qwen3_moe_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // (name, sparse layers, dense layers, experts' format, router's format)
    let cases = [
        ("qwen3_moe-f32", vec![0, 2], vec![1], ("none", 0, 0), ("none", 0, 0)),
        ("qwen3_moe-q4-g64", vec![0, 2], vec![1], ("affine", 4, 64), ("affine", 8, 64)),
        ("qwen3_moe-q8-g64", vec![0, 2], vec![1], ("affine", 8, 64), ("affine", 8, 64)),
        ("qwen3_moe-mxfp4", vec![0, 2], vec![1], ("mxfp4", 4, 32), ("affine", 8, 64)),
        ("qwen3_moe-nonorm-f32", vec![1, 3], vec![0, 2], ("none", 0, 0), ("none", 0, 0)),
    ];
    for (name, sparse, dense, experts, router) in cases {
        let model = check(name, &reg, LoadPolicy::default());
        assert_eq!(model.architecture_plugin, "arch-qwen3");
        let own = |f: (&str, i32, i32)| (f.0.to_string(), f.1, f.2);
        for i in sparse {
            for p in EXPERTS {
                let path = format!("model.layers.{i}.mlp.switch_mlp.{p}");
                let got = format(&model, &path);
                // f32 layers are recorded with the dense mode's (0, 0) or their own numbers
                assert_eq!(got.0, experts.0, "{name} {path}");
                if experts.0 != "none" {
                    assert_eq!(got, own(experts), "{name} {path}");
                }
            }
            let got = format(&model, &format!("model.layers.{i}.mlp.gate"));
            assert_eq!(got.0, router.0, "{name} layer {i} router");
            if router.0 != "none" {
                assert_eq!(got, own(router), "{name} layer {i} router");
            }
        }
        for i in dense {
            assert!(model.layers.contains_key(&format!("model.layers.{i}.mlp.gate_proj")), "{name}: layer {i} dense");
            assert!(!model.layers.contains_key(&format!("model.layers.{i}.mlp.switch_mlp.gate_proj")), "{name}");
        }
    }
}

/// `--dequantize`: affine experts become dense [E, out, in] at load and still
/// match mlx-lm's quantized goldens.
#[test]
fn dequantized_affine_experts_match_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let policy = LoadPolicy { dtype: ComputeDtype::Model, dequantize: true };
    for name in ["qwen3_moe-q4-g64", "qwen3_moe-q8-g64"] {
        let model = check(name, &reg, policy);
        assert!(model.layers.values().all(|l| l.mode == "none"), "{name}: every affine layer dequantized");
    }
}

/// config.json of qwen3_moe-f32 with `edit` applied.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = common::fixture("models/qwen3_moe-f32/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut c);
    c.to_string()
}

#[test]
fn qwen3_moe_configs_are_refused_by_name() {
    let reg = common::registry();
    assert!(reg.check_config("qwen3_moe", &config_with(|_| ())).is_ok());
    let cases: Vec<(Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        (Box::new(|c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})), "rope_scaling type `yarn`"),
        (Box::new(|c| c["hidden_act"] = "gelu".into()), "hidden_act `gelu`"),
        (Box::new(|c| c["use_sliding_window"] = true.into()), "use_sliding_window"),
        (Box::new(|c| c["attention_bias"] = true.into()), "attention_bias"),
        (Box::new(|c| c["decoder_sparse_step"] = 0.into()), "decoder_sparse_step"),
        (Box::new(|c| c["num_experts_per_tok"] = 9.into()), "num_experts_per_tok 9"),
        (Box::new(|c| drop(c.as_object_mut().unwrap().remove("norm_topk_prob"))), "norm_topk_prob"),
        (Box::new(|c| drop(c.as_object_mut().unwrap().remove("mlp_only_layers"))), "mlp_only_layers"),
    ];
    for (edit, want) in cases {
        let e = format!("{:#}", reg.check_config("qwen3_moe", &config_with(edit)).expect_err(want));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

fn load_err(path: &Path, reg: &rmlx::plugins::Registry) -> String {
    match LoadedModel::load_with(path, reg, LoadPolicy::default()) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// qwen3_moe-f32's weights, renamed by `rename` (None drops a tensor), with
/// its config edited by `edit`, in a temporary directory.
fn edited_copy(
    rename: impl Fn(&str, &mlx_rs::Array) -> Vec<(String, mlx_rs::Array)>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("models/qwen3_moe-f32/model.safetensors");
    let tensors = mlx_rs::Array::load_safetensors(&src).unwrap();
    let out: Vec<(String, mlx_rs::Array)> = tensors.iter().flat_map(|(k, v)| rename(k, v)).collect();
    mlx_rs::Array::save_safetensors(out, None, dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), config_with(edit)).unwrap();
    dir
}

#[test]
fn qwen3_moe_checkpoints_must_fit_the_config() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let same = |k: &str, v: &mlx_rs::Array| vec![(k.to_string(), v.clone())];
    // The Hugging Face layout (experts one by one) loads, stacked at load,
    // and gives the same numbers (tests/arch_hf_moe.rs: transformers' own
    // checkpoints, and the refusals of that layout).
    let split = |k: &str, v: &mlx_rs::Array| match k.split_once(".switch_mlp.") {
        Some((layer, rest)) => (0..v.dim(0))
            .map(|e| (format!("{layer}.experts.{e}.{rest}"), v.take_axis(mlx_rs::Array::from_int(e), 0).unwrap()))
            .collect(),
        None => vec![(k.to_string(), v.clone())],
    };
    let dir = edited_copy(split, |_| ());
    let mut model = LoadedModel::load_with(dir.path(), &reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(model.unused.is_empty(), "unused tensors {:?}", model.unused);
    let mut tally = Tally::default();
    compare(&mut model, &golden("qwen3_moe-f32"), &mut tally);
    assert!(tally.failures.is_empty(), "qwen3_moe-f32 with its experts one by one:\n{}", tally.failures.join("\n"));
    // num_experts must be what the router and the experts hold.
    let dir = edited_copy(same, |c| c["num_experts"] = 4.into());
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("num_experts is 4 but the router `gate` has 8 outputs and switch_mlp 8 experts"), "{e}");
    // An expert projection missing altogether names its tensor.
    let dir = edited_copy(|k, v| if k.ends_with("2.mlp.switch_mlp.up_proj.weight") { vec![] } else { same(k, v) }, |_| ());
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("model.layers.2.mlp.switch_mlp.up_proj.weight"), "{e}");
    // Expert shapes that disagree (down_proj's experts cut to half their inputs) are refused.
    let swap = |k: &str, v: &mlx_rs::Array| {
        if k.ends_with("0.mlp.switch_mlp.down_proj.weight") {
            let half = v.split_at_indices(&[v.dim(-1) / 2], -1).unwrap().remove(0);
            vec![(k.to_string(), half)]
        } else {
            same(k, v)
        }
    };
    let dir = edited_copy(swap, |_| ());
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("expert shapes disagree"), "{e}");
}
