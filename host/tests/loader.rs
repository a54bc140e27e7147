//! Level 2: the loader and registry against the real built cdylibs.
mod common;

use rmlx::engine::{LoadedModel, Session};
use rmlx::plugins::Registry;
use std::path::{Path, PathBuf};

fn lib(name: &str) -> String {
    format!("lib{name}.{}", rmlx::plugins::loader::LIB_EXT)
}

/// A plugin dir with links to the shipped plugins plus `extra` files.
fn plugin_dir(extra: &[(&str, PathBuf)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::plugins_dir()).unwrap() {
        let p = e.unwrap().path();
        std::os::unix::fs::symlink(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    for (name, src) in extra {
        std::os::unix::fs::symlink(src, dir.path().join(name)).unwrap();
    }
    dir
}

fn probe_lib() -> PathBuf {
    let p = common::test_plugins_dir().join(lib("rmlx_test_probe"));
    assert!(p.exists(), "{} missing: run `make build`", p.display());
    p
}

/// A model dir for the probe architecture.
fn probe_model(mode: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"model_type": "rmlx_probe", "probe": mode, "vocab_size": 8});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let data = 1f32.to_le_bytes();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
    safetensors::serialize_to_file([("dummy", view)], None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn lists_the_shipped_plugins() {
    let reg = common::registry();
    let ids: Vec<&str> = reg.plugins.iter().map(|p| p.info.id.as_str()).collect();
    for id in ["arch-llama", "arch-qwen3", "wquant-affine", "wquant-dense"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert!(reg.refused.is_empty(), "{:?}", reg.refused);
    let claims = reg.claims();
    for (cap, key, id) in [
        ("architecture", "llama", "arch-llama"),
        ("architecture", "mistral", "arch-llama"),
        ("architecture", "qwen3", "arch-qwen3"),
        ("weight-quant", "affine", "wquant-affine"),
        ("weight-quant", "none", "wquant-dense"),
    ] {
        assert!(claims.contains(&(cap, key.to_string(), id.to_string())), "missing {cap} {key}");
    }
    assert_eq!(reg.architecture_plugin("qwen3").unwrap().info.id, "arch-qwen3");
    let err = reg.architecture_plugin("falcon_mamba").err().unwrap().to_string();
    assert!(err.contains("unknown model_type `falcon_mamba`"), "{err}");
}

#[test]
fn refuses_files_that_are_not_plugins() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.so");
    std::fs::write(&junk, b"this is not an ELF file").unwrap();
    let mlxc = common::repo().join(".mlx/py/mlx/lib").join(lib("mlxc"));
    let dir = plugin_dir(&[("junk.so", junk), ("libmlxc-copy.so", mlxc)]);
    let reg = Registry::load(dir.path()).unwrap();
    assert_eq!(reg.plugins.len(), common::registry().plugins.len(), "the real plugins still load");
    let reason = |name: &str| {
        reg.refused
            .iter()
            .find(|r| r.path.file_name().unwrap() == name)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("{name} not refused: {:?}", reg.refused))
    };
    assert!(reason("junk.so").contains("junk.so: not a loadable library"), "{}", reason("junk.so"));
    let r = reason("libmlxc-copy.so");
    assert!(r.contains("not an rmlx plugin (no rmlx_plugin_abi_version symbol)"), "{r}");
}

#[test]
fn refuses_a_plugin_of_another_abi_version() {
    let old = common::test_plugins_dir().join(lib("rmlx_test_old_abi"));
    let dir = plugin_dir(&[("libold.so", old)]);
    let reg = Registry::load(dir.path()).unwrap();
    let r = &reg.refused.iter().find(|r| r.path.ends_with("libold.so")).expect("refused").reason;
    let want = format!("plugin `old-plugin` (libold.so) was built for plugin ABI 0, but this rmlx speaks ABI {}", rmlx_plugin_api::ABI_VERSION);
    assert!(r.contains(&want), "{r}");
}

/// A plugin built against the previous minor ABI (3.0: the frozen
/// plugin-api copy in tests/plugins/prev-abi) loads, and its model runs.
#[test]
fn a_plugin_built_for_the_previous_minor_abi_loads_and_runs() {
    let _g = common::mlx_lock();
    let prev = common::test_plugins_dir().join(lib("rmlx_test_prev_abi"));
    assert!(prev.exists(), "{} missing: run `make build` (scripts/build-prev-abi.sh)", prev.display());
    let dir = plugin_dir(&[("librmlx_test_prev_abi.so", prev)]);
    let reg = Registry::load(dir.path()).unwrap();
    assert!(reg.refused.is_empty(), "{:?}", reg.refused);
    let p = reg.architecture_plugin("rmlx_prev_abi").unwrap();
    assert_eq!(p.info.id, "test-prev-abi");
    assert_eq!(p.info.abi, "3.0");
    // Fields appended after 3.0 read as absent; the host copes.
    assert!(p.module.check_config().is_none());
    reg.check_config("rmlx_prev_abi", "{}").unwrap();
    // Today's plugins have them.
    assert_eq!(reg.architecture_plugin("llama").unwrap().info.abi, format!("{}.{}", rmlx_plugin_api::ABI_VERSION, rmlx_plugin_api::ABI_MINOR));
    assert!(reg.architecture_plugin("llama").unwrap().module.check_config().is_some());
    // Its model loads and its forward runs: the most likely next token is token + 1.
    let model_dir = tempfile::tempdir().unwrap();
    std::fs::write(model_dir.path().join("config.json"), r#"{"model_type": "rmlx_prev_abi", "vocab_size": 16}"#).unwrap();
    let data = 1f32.to_le_bytes();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
    safetensors::serialize_to_file([("dummy", view)], None, &model_dir.path().join("model.safetensors")).unwrap();
    let mut model = LoadedModel::load(model_dir.path(), &reg).unwrap();
    let logits = Session::new(&mut model).prefill(&[3, 4, 6]).unwrap();
    let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(best, 7);
    // It returns logits only: hidden states need a plugin of ABI 3.3.
    let err = rmlx::engine::encoder::encode(&mut model, &[vec![3, 4]], 0).unwrap_err().to_string();
    assert!(err.contains("predates ABI 3.3"), "{err}");
}

/// A plugin built against ABI 3.6 (tests/plugins/prev-abi-3.6: the minor
/// before 3.7 appended `ForwardCtx::positions` to the host-implemented
/// ForwardCtx) loads beside today's plugins, and its forward runs through
/// this host's longer ForwardCtx (it calls only the methods it knows).
#[test]
fn a_plugin_built_for_abi_3_6_loads_and_runs() {
    let _g = common::mlx_lock();
    let prev = common::test_plugins_dir().join(lib("rmlx_test_prev_abi_36"));
    assert!(prev.exists(), "{} missing: run `make build` (scripts/build-prev-abi.sh)", prev.display());
    let dir = plugin_dir(&[(lib("rmlx_test_prev_abi_36").as_str(), prev)]);
    let reg = Registry::load(dir.path()).unwrap();
    assert!(reg.refused.is_empty(), "{:?}", reg.refused);
    let p = reg.architecture_plugin("rmlx_prev_abi_36").unwrap();
    assert_eq!(p.info.id, "test-prev-abi-36");
    assert_eq!(p.info.abi, "3.6");
    // Today's plugins beside it are of this host's minor (3.7: positions).
    let today = format!("{}.{}", rmlx_plugin_api::ABI_VERSION, rmlx_plugin_api::ABI_MINOR);
    assert_eq!(reg.architecture_plugin("qwen2_5_vl").unwrap().info.abi, today);
    let model_dir = tempfile::tempdir().unwrap();
    std::fs::write(model_dir.path().join("config.json"), r#"{"model_type": "rmlx_prev_abi_36", "vocab_size": 16}"#).unwrap();
    let data = 1f32.to_le_bytes();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
    safetensors::serialize_to_file([("dummy", view)], None, &model_dir.path().join("model.safetensors")).unwrap();
    let mut model = LoadedModel::load(model_dir.path(), &reg).unwrap();
    assert_eq!(model.plugin_abi, (3, 6));
    let logits = Session::new(&mut model).prefill(&[3, 4, 9]).unwrap();
    let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(best, 10);
}

#[test]
fn refuses_a_plugin_of_a_newer_minor_abi() {
    use rmlx::plugins::loader::abi_check;
    use rmlx_plugin_api::{ABI_MINOR, ABI_VERSION};
    abi_check("p", "libp.so", ABI_VERSION, 0).unwrap();
    abi_check("p", "libp.so", ABI_VERSION, ABI_MINOR).unwrap();
    let err = abi_check("p", "libp.so", ABI_VERSION, ABI_MINOR + 1).unwrap_err().to_string();
    assert!(err.contains(&format!("built for plugin ABI {ABI_VERSION}.{}", ABI_MINOR + 1)), "{err}");
    assert!(err.contains("upgrade rmlx"), "{err}");
    let err = abi_check("p", "libp.so", ABI_VERSION + 1, 0).unwrap_err().to_string();
    assert!(err.contains(&format!("but this rmlx speaks ABI {ABI_VERSION}")), "{err}");
}

#[test]
fn check_config_reaches_the_architecture_plugin() {
    let reg = common::registry();
    reg.check_config("llama", &std::fs::read_to_string(common::fixture("models/llama-f32/config.json")).unwrap()).unwrap();
    let err = reg.check_config("falcon_mamba", "{}").unwrap_err().to_string();
    assert!(err.contains("unknown model_type `falcon_mamba`"), "{err}");
    // Options an architecture does not implement are refused by name, before any weight loads.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("models/llama-f32/config.json")).unwrap()).unwrap();
    cfg["layer_types"] = serde_json::json!(["full_attention", "chunked_attention"]);
    let err = reg.check_config("llama", &cfg.to_string()).unwrap_err().to_string();
    assert!(err.contains("layer_types: unsupported layer type `chunked_attention`"), "{err}");
    cfg["rope_scaling"] = serde_json::json!({"type": "longrope", "factor": 2.0});
    cfg["layer_types"] = serde_json::Value::Null;
    let err = reg.check_config("llama", &cfg.to_string()).unwrap_err().to_string();
    assert!(err.contains("unsupported rope_scaling type `longrope`"), "{err}");
    let qwen2 = std::fs::read_to_string(common::fixture("models/qwen2-f32/config.json")).unwrap();
    reg.check_config("qwen2", &qwen2).unwrap();
    let err = reg.check_config("qwen3", r#"{"hidden_size": 8}"#).unwrap_err().to_string();
    assert!(err.contains("missing field"), "{err}");
}

#[test]
fn two_plugins_claiming_the_same_model_type_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy.so");
    std::fs::copy(common::plugins_dir().join(lib("rmlx_arch_llama")), &copy).unwrap();
    let dir = plugin_dir(&[("librmlx_arch_llama_copy.so", copy)]);
    let err = match Registry::load(dir.path()) {
        Ok(_) => panic!("duplicate plugins accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("two plugins have the id `arch-llama`"), "{err}");
}

fn probe(reg: &Registry, mode: &str) -> anyhow::Result<Vec<f32>> {
    let dir = probe_model(mode);
    let mut model = LoadedModel::load(dir.path(), reg)?;
    let mut s = Session::new(&mut model);
    s.prefill(&[1, 2])
}

#[test]
fn a_panicking_plugin_yields_an_error_and_the_host_keeps_running() {
    let _g = common::mlx_lock();
    let dir = plugin_dir(&[(&lib("rmlx_test_probe"), probe_lib())]);
    let reg = Registry::load(dir.path()).unwrap();
    let err = format!("{:#}", probe(&reg, "panic").unwrap_err());
    assert!(err.contains("plugin panicked: probe panicked in forward"), "{err}");
    assert!(err.contains("test-probe"), "names the plugin: {err}");
    let err = format!("{:#}", probe(&reg, "panic_on_load").unwrap_err());
    assert!(err.contains("plugin panicked: probe panicked while loading"), "{err}");
    // Still alive: the same plugin and a real model work afterwards.
    assert_eq!(probe(&reg, "ok").unwrap(), vec![0.0; 8]);
    let mut llama = LoadedModel::load(&common::fixture("models/llama-f32"), &reg).unwrap();
    assert_eq!(Session::new(&mut llama).prefill(&[1, 2, 3]).unwrap().len(), 256);
}

#[test]
fn an_mlx_error_inside_a_plugin_reaches_the_host_with_mlx_message() {
    let _g = common::mlx_lock();
    let dir = plugin_dir(&[(&lib("rmlx_test_probe"), probe_lib())]);
    let reg = Registry::load(dir.path()).unwrap();
    let err = format!("{:#}", probe(&reg, "mlx_error").unwrap_err());
    assert!(err.contains("[matmul]"), "MLX's own message: {err}");
    assert!(err.contains("(2,3)") && err.contains("(4,5)"), "{err}");
    // A real architecture plugin, with a config that disagrees with its weights.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&common::fixture("models/llama-f32"), tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_attention_heads"] = 3.into();
    cfg["head_dim"] = 16.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut model = LoadedModel::load(tmp.path(), &reg).unwrap();
    let err = format!("{:#}", Session::new(&mut model).prefill(&[1, 2, 3]).unwrap_err());
    assert!(err.contains("[reshape]"), "MLX's own message: {err}");
    assert!(err.contains("arch-llama"), "{err}");
}

#[test]
fn a_memory_limit_set_by_the_host_is_seen_inside_plugins() {
    let _g = common::mlx_lock();
    let dir = plugin_dir(&[(&lib("rmlx_test_probe"), probe_lib())]);
    let reg = Registry::load(dir.path()).unwrap();
    let before = rmlx::runtime::memory_limit_bytes().unwrap();
    rmlx::runtime::set_memory_limit_bytes(3_000_000_000).unwrap();
    let seen = probe(&reg, "memory_limit");
    rmlx::runtime::set_memory_limit_bytes(before).unwrap();
    assert_eq!(seen.unwrap()[0], 3000.0, "the plugin sees the host's limit (MB)");
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}
