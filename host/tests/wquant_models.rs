//! Whole checkpoints in the BitNet and ParoQuant formats load with no
//! architecture change (llama and qwen3 plugins, the format chosen from
//! config.json's `quantization_config.quant_method` and each module's tensors)
//! and give the reference implementation's logits and greedy tokens
//! (`tests/fixtures/wquant-models`, from `tests/goldens/make_wquant_model_goldens.py`:
//! mlx-lm's own loader for BitNet, ParoQuant's MLX loader reproduced for
//! ParoQuant), through `LoadedModel`, `rmlx generate`, `rmlx info` and the
//! server. An unknown `quant_method` is a clear error.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use rmlx::engine::LoadedModel;
use common::golden::{compare, Case, Golden, Tally, MARGIN};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::Arc;

const MODELS: [&str; 4] = ["llama-bitnet", "qwen3-bitnet-auto", "llama-paroquant", "qwen3-paroquant"];

fn golden(name: &str) -> Golden {
    let path = common::fixture(&format!("wquant-models/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn model_dir(name: &str) -> String {
    common::fixture(&format!("wquant-models/{name}")).to_str().unwrap().to_string()
}

/// EOS of the tiny configs; generation stops there (the golden goes on).
const EOS: u32 = 2;

/// Greedy tokens up to (not including) the first near tie or EOS: what
/// free-running generation must reproduce.
fn sure_prefix(case: &Case) -> &[u32] {
    let tie = case.margins.iter().position(|m| *m <= MARGIN).unwrap_or(case.tokens.len());
    let eos = case.tokens.iter().position(|t| *t == EOS).unwrap_or(case.tokens.len());
    &case.tokens[..tie.min(eos)]
}

fn rmlx(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap()])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The formats each fixture must be built with: (module, description).
fn expected_layers(name: &str) -> Vec<(&'static str, &'static str)> {
    match name {
        "llama-bitnet" => vec![
            ("model.layers.0.self_attn.q_proj", "bitnet 2-bit"),
            ("model.layers.1.mlp.down_proj", "bitnet 2-bit"),
            ("model.embed_tokens", "dense"),
            ("lm_head", "dense"), // modules_to_not_convert
        ],
        "qwen3-bitnet-auto" => {
            vec![("model.layers.0.mlp.gate_proj", "bitnet-autobitlinear 2-bit"), ("model.embed_tokens", "dense")]
        }
        "llama-paroquant" => vec![
            ("model.layers.0.self_attn.q_proj", "paroquant 4-bit g64"),
            ("model.layers.1.mlp.up_proj", "paroquant 4-bit g64"),
            ("model.embed_tokens", "affine 4-bit g64 (quantized at load)"),
            ("lm_head", "affine 4-bit g64 (quantized at load)"),
        ],
        "qwen3-paroquant" => vec![
            ("model.layers.0.self_attn.o_proj", "paroquant 4-bit g32"),
            ("model.embed_tokens", "affine 4-bit g32 (quantized at load)"),
        ],
        _ => unreachable!(),
    }
}

#[test]
fn models_match_their_reference_logits_and_tokens() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mut tally = Tally::default();
    for name in MODELS {
        let golden = golden(name);
        assert_eq!(golden.model, name);
        let mut model = LoadedModel::load(&common::fixture(&format!("wquant-models/{name}")), &reg)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
        for (module, want) in expected_layers(name) {
            assert_eq!(model.layers.get(module).map(|q| q.describe()).as_deref(), Some(want), "{name} {module}");
        }
        compare(&mut model, &golden, &mut tally);
    }
    let Tally { failures, worst, compared } = tally;
    eprintln!("{compared} steps compared over {} models, worst relative error {worst:e}", MODELS.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn generate_and_info_on_the_cli() {
    let _g = common::mlx_lock();
    for name in MODELS {
        let case = &golden(name).prompts[1];
        let prompt: Vec<String> = case.prompt.iter().map(|t| t.to_string()).collect();
        let (code, out, err) = rmlx(&[
            "generate",
            "--model",
            &model_dir(name),
            "--prompt-tokens",
            &prompt.join(","),
            "--max-tokens",
            &case.tokens.len().to_string(),
            "--json",
        ]);
        assert_eq!(code, 0, "{name}: {err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let got: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
        let sure = sure_prefix(case);
        assert!(!sure.is_empty(), "{name}: the golden's first step is a near tie");
        assert_eq!(&got[..sure.len()], sure, "{name}: rmlx generate vs the reference's greedy tokens");

        let (code, out, err) = rmlx(&["info", "--model", &model_dir(name), "--json"]);
        assert_eq!(code, 0, "{name}: {err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let method = if name.contains("bitnet") { "bitnet" } else { "paroquant" };
        assert_eq!(v["quant_method"], method, "{name}");
        for (module, want) in expected_layers(name) {
            assert_eq!(v["layers"][module], want, "{name} {module}");
        }
        let mode = if name.ends_with("auto") { "bitnet-autobitlinear" } else { method };
        let plugin = format!("wquant-{method}");
        assert_eq!(v["plugins"][format!("weight-quant {mode}")], plugin.as_str(), "{name}: {v}");
        // hidden 64, 2 layers, intermediate 128, vocab 256: packed weights count as their parameters
        let linears = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128);
        assert!(v["parameters"].as_u64().unwrap() >= (linears + 256 * 64) as u64, "{name}: {v}");

        let (code, out, _) = rmlx(&["info", "--model", &model_dir(name)]);
        assert_eq!(code, 0);
        assert!(out.contains(&format!("quantization (quant_method {method})")), "{out}");
    }
}

#[tokio::test]
async fn the_server_serves_both_formats() {
    let _g = common::mlx_lock();
    let models: Vec<(Option<String>, std::path::PathBuf)> = ["llama-bitnet", "llama-paroquant"]
        .iter()
        .map(|n| (None, common::fixture(&format!("wquant-models/{n}"))))
        .collect();
    let catalog = ModelCatalog::discover(&models, &[]).unwrap();
    let worker = Worker::start(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 4,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        &catalog,
    )
    .unwrap();
    let state = Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() });
    let base = common::serve(state);
    for name in ["llama-bitnet", "llama-paroquant"] {
        let case = &golden(name).prompts[2];
        let body = json!({"model": name, "prompt": case.prompt, "max_tokens": case.tokens.len(), "temperature": 0});
        let r = reqwest::Client::new().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{name}");
        let v: Value = r.json().await.unwrap();
        let got: Vec<u32> = serde_json::from_value(v["choices"][0]["token_ids"].clone()).unwrap();
        let sure = sure_prefix(case);
        assert!(!sure.is_empty(), "{name}: the golden's first step is a near tie");
        assert_eq!(&got[..sure.len()], sure, "{name}: server vs the reference's greedy tokens");
    }
}

#[test]
fn an_unknown_quant_method_names_itself_and_the_provided_ones() {
    let _g = common::mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::fixture("wquant-models/llama-bitnet")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"bitnet\"", "\"awq\"");
    std::fs::write(&cfg, text).unwrap();
    let err = LoadedModel::load(dir.path(), &common::registry()).err().expect("loaded an awq config");
    let msg = format!("{err:#}");
    assert!(msg.contains("quant_method `awq` is not supported"), "{msg}");
    assert!(msg.contains("bitnet, paroquant"), "{msg}");
    let (code, _, err) = rmlx(&["generate", "--model", dir.path().to_str().unwrap(), "--prompt-tokens", "1"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("`awq`"), "{err}");
}
