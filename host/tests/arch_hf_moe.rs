//! Hugging Face MoE checkpoints with the experts stored one by one
//! (`mlp.experts.{e}.{gate,up,down}_proj.weight`), as transformers'
//! `Qwen3MoeForCausalLM` / `Qwen3NextForCausalLM` save them
//! (tests/goldens/hf_moe_goldens.py): rmlx loads them (the experts stacked
//! once at load, plugins/nn moe.rs; qwen3_next's norms and conv1d as mlx-lm's
//! sanitize rewrites them) with mlx-lm's logits and greedy tokens (mlx-lm
//! reading the same directory through its sanitize); the same model in
//! mlx-lm's layout matches the same golden; `rmlx convert` stacks the experts
//! as mlx_lm.convert does (tensor for tensor equal to mlx-lm's layout) and
//! quantizes stacked experts and routers as mlx-lm's `quantize_model` (and
//! mlx-lm loads its quantized output with rmlx's numbers); bad
//! checkpoints are refused by name.
mod common;

use common::golden::{compare, Golden, Tally};
use mlx_rs::Array;
use rmlx::convert::mlx::{convert_dir, MlxOptions};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use std::collections::HashMap;
use std::path::Path;

const ARCHS: [&str; 2] = ["qwen3_moe", "qwen3_next"];

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Loads `dir` and compares it against the golden `name`.
fn check(dir: &Path, name: &str, reg: &rmlx::plugins::Registry) -> LoadedModel {
    let label = dir.file_name().unwrap().to_string_lossy().to_string();
    let mut model = LoadedModel::load_with(dir, reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{label}: {e:#}"));
    assert_eq!(model.architecture_plugin, "arch-qwen3");
    assert!(model.unused.is_empty(), "{label}: unused tensors {:?}", model.unused);
    let mut tally = Tally::default();
    compare(&mut model, &golden(name), &mut tally);
    eprintln!("{label}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.failures.is_empty(), "{label}:\n{}", tally.failures.join("\n"));
    model
}

fn fixture_dir(name: &str) -> std::path::PathBuf {
    common::fixture(&format!("models/{name}"))
}

#[test]
fn hugging_face_expert_layout_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    for arch in ARCHS {
        let hf = fixture_dir(&format!("{arch}-hf-f32"));
        // the fixture really is the per-expert layout
        let header = rmlx::model::safetensors::read_header(&hf.join("model.safetensors")).unwrap();
        assert!(header.contains_key("model.layers.0.mlp.experts.3.down_proj.weight"), "{arch}");
        assert!(!header.keys().any(|k| k.contains("switch_mlp")), "{arch}");
        check(&hf, &format!("{arch}-hf-f32"), &reg);
        // mlx-lm's own layout of the same model: the same numbers
        check(&fixture_dir(&format!("{arch}-hf-mlx-f32")), &format!("{arch}-hf-f32"), &reg);
    }
}

/// Every tensor of a model directory.
fn tensors(dir: &Path) -> HashMap<String, Array> {
    let mut all = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(Array::load_safetensors(&p).unwrap());
        }
    }
    all
}

/// `got` holds exactly `want`'s tensors, bit for bit.
fn same_tensors(label: &str, got: &Path, want: &Path) {
    let (got, want) = (tensors(got), tensors(want));
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let mut extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    extra.sort();
    assert!(extra.is_empty(), "{label}: tensors mlx-lm does not write: {extra:?}");
    for n in names {
        let g = got.get(n).unwrap_or_else(|| panic!("{label}: {n} not written"));
        let w = &want[n];
        assert_eq!((g.dtype(), g.shape()), (w.dtype(), w.shape()), "{label}: {n}");
        assert!(g.eq_values(w).unwrap(), "{label}: {n} differs from mlx-lm's");
    }
}

fn opts(quant: Option<&str>) -> MlxOptions {
    MlxOptions { quant: quant.map(str::to_string), group_size: None, layers: Vec::new(), force: false, progress: false }
}

#[test]
fn convert_stacks_the_experts_as_mlx_lm_does() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dst = tmp.path().join(format!("{arch}-converted"));
        let report = convert_dir(&fixture_dir(&format!("{arch}-hf-f32")), &dst, &opts(None)).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        assert!(report.warnings.iter().any(|w| w.contains("stacked the experts")), "{arch}: {:?}", report.warnings);
        // what mlx-lm's sanitize + save_model wrote (norms shifted, conv1d moved for qwen3_next)
        same_tensors(arch, &dst, &fixture_dir(&format!("{arch}-hf-mlx-f32")));
        check(&dst, &format!("{arch}-hf-f32"), &reg);
        // quantized from the HF layout: the experts' switch layers quantized
        // whole; loads and runs (down_proj's 16 inputs do not divide by 32:
        // left dense, as mlx-lm leaves them)
        let dst = tmp.path().join(format!("{arch}-q4"));
        convert_dir(&fixture_dir(&format!("{arch}-hf-f32")), &dst, &opts(Some("q4:32"))).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        let header = rmlx::model::safetensors::read_header(&dst.join("model.safetensors")).unwrap();
        assert_eq!(header["model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape, [4, 16, 4], "{arch}: [E, out, in*4/32]");
        assert_eq!(header["model.layers.0.mlp.switch_mlp.gate_proj.scales"].shape, [4, 16, 1], "{arch}");
        assert_eq!(header["model.layers.0.mlp.switch_mlp.down_proj.weight"].dtype, "F32", "{arch}");
        let mut model = LoadedModel::load_with(&dst, &reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{arch} q4: {e:#}"));
        assert!(model.unused.is_empty(), "{arch} q4: {:?}", model.unused);
        let q = &model.layers["model.layers.0.mlp.switch_mlp.up_proj"];
        assert_eq!((q.mode.as_str(), q.bits, q.group_size), ("affine", 4, 32), "{arch}");
        // mlx-lm loads what rmlx wrote and gives rmlx's logits and tokens
        // (tests/goldens/convert_check.py, as tests/convert_mlx.rs)
        let check = mlx_lm_check(&fixture_dir(&format!("{arch}-hf-f32")), &dst);
        assert_eq!(check["bit_mismatches"], serde_json::json!([]), "{arch}: {check}");
        let mut golden = check.clone();
        golden["model"] = format!("{arch}-q4").into();
        let golden: Golden = serde_json::from_value(golden).unwrap();
        let mut tally = Tally::default();
        compare(&mut model, &golden, &mut tally);
        eprintln!("{arch} q4:32: {} steps against mlx-lm, worst relative error {:e}", tally.compared, tally.worst);
        assert!(tally.compared >= 16 && tally.failures.is_empty(), "{arch} q4 against mlx-lm:\n{}", tally.failures.join("\n"));
    }
}

/// mlx-lm (dev venv) on `dst`: tests/goldens/convert_check.py's record.
fn mlx_lm_check(src: &Path, dst: &Path) -> serde_json::Value {
    let py = common::repo().join(".venv-dev/bin/python");
    assert!(py.exists(), "no dev venv: run `make dev-venv`");
    let out = dst.with_extension("check.json");
    let o = std::process::Command::new(py)
        .arg(common::repo().join("tests/goldens/convert_check.py"))
        .args([src, dst, &out])
        .output()
        .unwrap();
    assert!(o.status.success(), "convert_check.py failed on {}:\n{}", dst.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// `rmlx convert --quant q4` of the float mlx-lm qwen3_moe / qwen3_5_moe
/// fixtures equals mlx-lm's `quantize_model` of the same weights (the q4-g64
/// fixtures), tensor for tensor and in config.json's quantization: stacked
/// experts quantized along their input, the routers (and shared-expert gates)
/// at 8 bits by the model type's `quant_predicate`.
#[test]
fn convert_quantizes_experts_and_routers_as_mlx_lm_does() {
    let _g = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["qwen3_moe", "qwen3_next", "qwen3_5_moe"] {
        let dst = tmp.path().join(arch);
        convert_dir(&fixture_dir(&format!("{arch}-f32")), &dst, &opts(Some("q4"))).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
        let want = fixture_dir(&format!("{arch}-q4-g64"));
        same_tensors(arch, &dst, &want);
        let config = |d: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap() };
        let (got, want) = (config(&dst)["quantization"].clone(), config(&want)["quantization"].clone());
        // mlx-lm writes the predicate's entries without a mode (affine)
        let want_routers: Vec<&String> = want.as_object().unwrap().keys().filter(|k| k.contains('.')).collect();
        assert!(!want_routers.is_empty(), "{arch}: {want}");
        for k in want_routers {
            assert_eq!((got[k]["bits"].as_i64(), got[k]["group_size"].as_i64()), (Some(8), Some(64)), "{arch}: {k} in {got}");
            assert_eq!(got[k]["mode"].as_str().unwrap_or("affine"), "affine", "{arch}: {k}");
        }
        assert_eq!((got["bits"].as_i64(), got["group_size"].as_i64()), (Some(4), Some(64)), "{arch}: {got}");
    }
}

// ---- refusals ----

/// qwen3_moe-hf-f32's tensors passed through `edit` (returning the tensors
/// to write for each), with its config edited by `config`, in a temporary
/// directory.
fn edited_copy(
    edit: impl Fn(&str, &Array) -> Vec<(String, Array)>,
    config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let src = fixture_dir("qwen3_moe-hf-f32");
    let dir = tempfile::tempdir().unwrap();
    let out: Vec<(String, Array)> = tensors(&src).iter().flat_map(|(k, v)| edit(k, v)).collect();
    Array::save_safetensors(out, None, dir.path().join("model.safetensors")).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config(&mut c);
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    dir
}

fn errors(dir: &Path, reg: &rmlx::plugins::Registry) -> (String, String) {
    let load = match LoadedModel::load_with(dir, reg, LoadPolicy::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    let out = dir.join("converted");
    let convert = match convert_dir(dir, &out, &opts(None)) {
        Ok(_) => panic!("{} should not convert", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(!out.exists(), "nothing written on a refusal");
    (load, convert)
}

#[test]
fn bad_per_expert_checkpoints_are_refused_by_name() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let same = |k: &str, v: &Array| vec![(k.to_string(), v.clone())];
    // num_experts larger than what is stored: the first missing tensor by name
    let dir = edited_copy(same, |c| c["num_experts"] = 5.into());
    let (load, convert) = errors(dir.path(), &reg);
    for e in [&load, &convert] {
        assert!(e.contains("num_experts is 5") && e.contains("model.layers.0.mlp.experts.4.gate_proj.weight is missing"), "{e}");
    }
    // smaller: the first extra expert by name
    let dir = edited_copy(same, |c| c["num_experts"] = 3.into());
    let (load, convert) = errors(dir.path(), &reg);
    for e in [&load, &convert] {
        assert!(e.contains("model.layers.0.mlp.experts.3.gate_proj.weight is there too"), "{e}");
    }
    // one expert's projection missing
    let drop = |k: &str, v: &Array| if k == "model.layers.2.mlp.experts.2.up_proj.weight" { vec![] } else { same(k, v) };
    let dir = edited_copy(drop, |_| ());
    let (load, convert) = errors(dir.path(), &reg);
    for e in [&load, &convert] {
        assert!(e.contains("model.layers.2.mlp.experts.2.up_proj.weight is missing"), "{e}");
    }
    // experts quantized one by one (MLX affine triples): refused, not misread
    let quantize = |k: &str, v: &Array| match k.strip_suffix(".weight") {
        Some(m) if m.contains(".experts.") && !m.ends_with("down_proj") => {
            let (w, s, b) = mlx_rs::ops::quantize(v, 32, 4).unwrap();
            vec![(k.to_string(), w), (format!("{m}.scales"), s), (format!("{m}.biases"), b)]
        }
        _ => same(k, v),
    };
    let dir = edited_copy(quantize, |c| c["quantization"] = serde_json::json!({"group_size": 32, "bits": 4}));
    let (load, convert) = errors(dir.path(), &reg);
    assert!(load.contains("model.layers.0.mlp.experts.0.gate_proj.weight") && load.contains("not plain float"), "{load}");
    assert!(convert.contains("not plain float"), "{convert}");
}
