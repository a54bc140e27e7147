//! `rmlx convert` on a Hugging Face-layout deepseek_v3 checkpoint
//! (`deepseek_v3-mtp-f32`: `kv_b_proj`, experts one by one, the MTP module
//! as layer 2; tests/goldens/deepseek_v3_goldens.py):
//! - the experts of every MoE layer, the MTP module's included, are stacked
//!   into `mlp.switch_mlp` as mlx-lm's sanitize stacks them (bit for bit the
//!   tensors of mlx-lm's own layout, `deepseek_v3-f32`), and the module is
//!   kept (mlx-lm's convert drops it);
//! - `--quant q4 --group-size 32` quantizes the stacked experts whole and
//!   leaves the router `mlp.gate` float (mlx-lm's `MoEGate` is no Linear);
//!   the output loads and matches mlx-lm on the same files (logits and greedy
//!   tokens, tests/goldens/deepseek_v3_convert_check.py), its quantized
//!   arrays bit-identical to `mx.quantize` of the source;
//! - `rmlx generate --draft-kind mtp` on the converted model gives plain
//!   greedy generation's tokens, token for token;
//! - a dense cast (`--quant bf16`) leaves the routers' correction bias in
//!   float32, as mlx-lm's `cast_predicate` does;
//! - a model type whose experts convert does not stack is refused rather
//!   than quantized expert by expert (a layout no loader reads).
mod common;

use common::golden::{compare, Golden, Tally};
use mlx_rs::Array;
use rmlx::convert::mlx::{convert_dir, MlxOptions};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

const SRC: &str = "models/deepseek_v3-mtp-f32";

/// The rmlx binary with the staged plugins; panics with its stderr on failure.
fn rmlx(args: &[&str]) -> std::process::Output {
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "rmlx {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// `rmlx convert` of the fixture into `dst` with `extra` flags; its report.
fn convert(dst: &Path, extra: &[&str]) -> String {
    let src = common::fixture(SRC);
    let args = [&["convert", "--quiet", "--model", src.to_str().unwrap(), "--output", dst.to_str().unwrap()][..], extra].concat();
    String::from_utf8_lossy(&rmlx(&args).stderr).to_string()
}

fn header(dir: &Path) -> HashMap<String, (String, Vec<usize>)> {
    let h = rmlx::model::safetensors::read_header(&dir.join("model.safetensors")).unwrap();
    h.into_iter().map(|(k, v)| (k, (v.dtype, v.shape))).collect()
}

fn golden(name: &str) -> Golden {
    serde_json::from_str(&std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap()).unwrap()
}

/// rmlx on `model` against `golden`: every step within the golden tolerance.
fn check(label: &str, model: &mut LoadedModel, golden: &Golden) {
    let mut tally = Tally::default();
    compare(model, golden, &mut tally);
    eprintln!("{label}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.compared >= 24 && tally.failures.is_empty(), "{label}:\n{}", tally.failures.join("\n"));
}

/// Only the MTP module (layer 2) is left unused by the plain model.
fn only_the_module_unused(label: &str, model: &LoadedModel) {
    assert!(
        !model.unused.is_empty() && model.unused.iter().all(|t| t.starts_with("model.layers.2.")),
        "{label}: only the MTP module is unused: {:?}",
        model.unused
    );
}

/// Without `--quant`: the experts stacked, nothing else changed; the main
/// model's stacked tensors are mlx-lm's own (`deepseek_v3-f32`, the same
/// weights in mlx-lm's layout), and the converted model gives its golden.
#[test]
fn convert_stacks_the_experts_and_keeps_the_mtp_module() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("deepseek_v3-stacked");
    let report = convert(&dst, &[]);
    assert!(report.contains("stacked the experts of 2 layers"), "{report}");
    assert!(report.contains("kept the multi-token-prediction module model.layers.2."), "{report}");
    let h = header(&dst);
    assert!(!h.keys().any(|k| k.contains(".experts.")), "every expert stacked: {:?}", h.keys().filter(|k| k.contains(".experts.")).collect::<Vec<_>>());
    for layer in [1, 2] {
        assert_eq!(h[&format!("model.layers.{layer}.mlp.switch_mlp.gate_proj.weight")], ("F32".into(), vec![4, 8, 32]), "layer {layer}");
        assert_eq!(h[&format!("model.layers.{layer}.mlp.switch_mlp.down_proj.weight")], ("F32".into(), vec![4, 32, 8]), "layer {layer}");
    }
    assert!(h.contains_key("model.layers.2.eh_proj.weight") && h.contains_key("model.layers.1.self_attn.kv_b_proj.weight"));
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization").is_none(), "nothing quantized: {config}");

    let load = |d: &Path| Array::load_safetensors(d.join("model.safetensors")).unwrap();
    let (ours, mlx_lm) = (load(&dst), load(&common::fixture("models/deepseek_v3-f32")));
    let mut stacked: Vec<&String> = mlx_lm.keys().filter(|k| k.contains("switch_mlp")).collect();
    stacked.sort();
    assert_eq!(stacked.len(), 3);
    for k in stacked {
        assert!(ours[k].eq_values(&mlx_lm[k]).unwrap(), "{k} differs from mlx-lm's stack");
    }

    let mut model = LoadedModel::load_with(&dst, &reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(model.layers.contains_key("model.layers.1.mlp.switch_mlp.gate_proj"));
    only_the_module_unused("stacked", &model);
    check("stacked", &mut model, &golden("deepseek_v3-f32"));
}

/// `--quant q4 --group-size 32`: the stacked experts quantized whole (their
/// gate/up 32 inputs; down_proj's 8 do not divide by 32 and stay float, as
/// mlx-lm leaves them), the MTP module's too; the router float; rmlx on the
/// output equals mlx-lm on it; `--draft-kind mtp` equals plain greedy.
#[test]
fn quantized_convert_loads_matches_mlx_lm_and_drafts_with_its_mtp_module() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("deepseek_v3-q4-g32-converted");
    convert(&dst, &["--quant", "q4", "--group-size", "32"]);
    let h = header(&dst);
    assert!(!h.keys().any(|k| k.contains(".experts.")), "every expert stacked");
    for layer in [1, 2] {
        let t = |s: &str| h[&format!("model.layers.{layer}.{s}")].clone();
        assert_eq!(t("mlp.switch_mlp.up_proj.weight"), ("U32".into(), vec![4, 8, 4]), "layer {layer}: [E, out, in*4/32]");
        assert_eq!(t("mlp.switch_mlp.up_proj.scales"), ("F32".into(), vec![4, 8, 1]), "layer {layer}");
        assert_eq!(t("mlp.switch_mlp.down_proj.weight"), ("F32".into(), vec![4, 32, 8]), "layer {layer}");
        assert_eq!(t("mlp.gate.weight"), ("F32".into(), vec![4, 32]), "layer {layer}: the router stays float");
        assert_eq!(t("mlp.gate.e_score_correction_bias"), ("F32".into(), vec![4]), "layer {layer}");
        assert!(!h.contains_key(&format!("model.layers.{layer}.mlp.gate.scales")), "layer {layer}");
    }
    assert_eq!(h["model.layers.2.eh_proj.weight"], ("U32".into(), vec![32, 8]), "the module's eh_proj (64 inputs) quantized");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization"], serde_json::json!({"group_size": 32, "bits": 4, "mode": "affine"}), "no per-module entries");

    let mut model = LoadedModel::load_with(&dst, &reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{e:#}"));
    only_the_module_unused("q4", &model);
    let q = |path: &str| {
        let l = model.layers.get(path).unwrap_or_else(|| panic!("no layer {path}"));
        (l.mode.clone(), l.bits, l.group_size)
    };
    assert_eq!(q("model.layers.1.mlp.switch_mlp.gate_proj"), ("affine".to_string(), 4, 32));
    assert_eq!(q("model.layers.1.mlp.gate").0, "none", "the router stays float");

    // mlx-lm on the same files (the module left out: mlx-lm has no layer for it)
    let check_json = mlx_lm_check(&common::fixture(SRC), &dst);
    assert_eq!(check_json["bit_mismatches"], serde_json::json!([]), "{check_json}");
    assert!(check_json["quantized_modules"].as_u64().unwrap() >= 20, "{}", check_json["quantized_modules"]);
    assert!(check_json["mtp_tensors_dropped"].as_u64().unwrap() > 0);
    let golden: Golden = serde_json::from_value(check_json).unwrap();
    check("q4 against mlx-lm", &mut model, &golden);
    drop(model);

    // greedy speculation with the converted MTP module: plain greedy's
    // tokens. The module is random, so most drafts are rejected; on this
    // prompt some are kept (4 of 30-33 when written), so both paths run.
    let base = ["generate", "--json", "-m", dst.to_str().unwrap(), "--prompt-tokens", "1,50,1,2", "--max-tokens", "32"];
    let json = |args: &[&str]| -> Value { serde_json::from_slice(&rmlx(args).stdout).unwrap() };
    let plain = json(&base);
    assert_eq!(plain["tokens"].as_array().unwrap().len(), 32, "{plain}");
    for k in ["1", "3"] {
        let spec = json(&[&base[..], &["--draft-kind", "mtp", "--num-draft-tokens", k]].concat());
        assert_eq!(spec["tokens"], plain["tokens"], "k {k}");
        let (d, a) = (spec["drafted_tokens"].as_u64().unwrap(), spec["accepted_tokens"].as_u64().unwrap());
        eprintln!("k {k}: drafted {d}, accepted {a}");
        assert!(a > 0 && a < d, "some drafts kept, some rejected: {spec}");
    }
}

/// `--quant bf16` casts every float tensor but the routers'
/// `e_score_correction_bias`, which stays float32 as mlx-lm's
/// `cast_predicate` keeps it; the cast model loads.
#[test]
fn a_dense_cast_keeps_the_correction_bias_in_float32() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("deepseek_v3-bf16");
    convert(&dst, &["--quant", "bf16"]);
    let h = header(&dst);
    for layer in [1, 2] {
        let t = |s: &str| h[&format!("model.layers.{layer}.{s}")].0.clone();
        assert_eq!(t("mlp.gate.e_score_correction_bias"), "F32", "layer {layer}");
        assert_eq!(t("mlp.gate.weight"), "BF16", "layer {layer}");
        assert_eq!(t("mlp.switch_mlp.gate_proj.weight"), "BF16", "layer {layer}");
        assert_eq!(t("input_layernorm.weight"), "BF16", "layer {layer}");
    }
    let model = LoadedModel::load_with(&dst, &reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{e:#}"));
    only_the_module_unused("bf16", &model);
}

/// mlx-lm (dev venv) on `dst`: tests/goldens/deepseek_v3_convert_check.py's record.
fn mlx_lm_check(src: &Path, dst: &Path) -> Value {
    let py = common::repo().join(".venv-dev/bin/python");
    assert!(py.exists(), "no dev venv: run `make dev-venv`");
    let out = dst.with_extension("check.json");
    let o = Command::new(py)
        .arg(common::repo().join("tests/goldens/deepseek_v3_convert_check.py"))
        .args([src, dst, &out])
        .output()
        .unwrap();
    assert!(o.status.success(), "deepseek_v3_convert_check.py failed on {}:\n{}", dst.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// The same checkpoint named a model type whose experts convert does not
/// stack (qwen3_5_moe: mlx-lm's sanitize does not either): quantizing them
/// one by one is refused by name, nothing written; kept float
/// (`--layer experts=keep`) it converts.
#[test]
fn experts_convert_does_not_stack_are_not_quantized_one_by_one() {
    let _g = common::mlx_lock();
    let src = common::fixture(SRC);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    c["model_type"] = "qwen3_5_moe".into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let opts = |layers: &[&str]| MlxOptions {
        quant: Some("q4".into()),
        group_size: Some(32),
        layers: layers.iter().map(|s| s.to_string()).collect(),
        force: false,
        progress: false,
    };
    let out = dir.path().join("converted");
    let e = format!("{:#}", convert_dir(dir.path(), &out, &opts(&[])).err().expect("refused"));
    assert!(e.contains("model.layers.1.mlp.experts.0.gate_proj") && e.contains("stores its experts one by one"), "{e}");
    assert!(e.contains("qwen3_moe, qwen3_next, deepseek_v3") && e.contains("--layer experts=keep"), "{e}");
    assert!(!out.exists(), "nothing written on a refusal");
    convert_dir(dir.path(), &out, &opts(&["experts=keep"])).unwrap();
    let h = header(&out);
    assert_eq!(h["model.layers.1.mlp.experts.0.gate_proj.weight"], ("F32".into(), vec![8, 32]), "kept float");
    assert_eq!(h["model.layers.1.mlp.shared_experts.gate_proj.weight"].0, "U32", "the rest quantized");
}
