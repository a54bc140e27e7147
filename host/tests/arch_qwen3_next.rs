//! model_types `qwen3_next`, `qwen3_5` and `qwen3_5_moe`
//! (plugins/arch-qwen3/src/qwen3_next.rs, qwen3_5.rs, qwen3_5_moe.rs; the gated
//! DeltaNet of plugins/nn gated_delta.rs): the tiny hybrids
//! tests/goldens/qwen3_next_goldens.py built with mlx-lm's own classes
//! (float32, affine q4 and q8), against mlx-lm's logits and greedy tokens
//! after a prompt, over 8 decode steps that carry the recurrent state, and
//! with the prompt prefilled in chunks (the state crossing chunk
//! boundaries); `rmlx generate` on it; configs refused by name; the
//! server serving it (tests/engine_hybrid.rs checks its output); the MTP head's tensors
//! loadable (left unused); qwen3_next's Hugging Face layout (experts one by
//! one) is tests/arch_hf_moe.rs's.
mod common;

use common::golden::{compare, compare_run, Golden, Tally};
use rmlx::engine::{LoadedModel, Session};
use rmlx::model::policy::LoadPolicy;
use rmlx_plugin_api::cache_kind;
use serde::Deserialize;
use std::process::Command;

const S: u32 = cache_kind::STATE;
const F: u32 = cache_kind::FULL;

/// (architecture, its layers' cache kinds)
const ARCHS: [(&str, [u32; 4]); 3] = [
    // full_attention_interval 2
    ("qwen3_next", [S, F, S, F]),
    // interval 4: three DeltaNet layers, then attention
    ("qwen3_5", [S, S, S, F]),
    ("qwen3_5_moe", [S, F, S, F]),
];

/// The golden's prompt prefilled `chunk` tokens at a time (mlx-lm's
/// `prefill_step_size`), then decoded.
#[derive(Deserialize)]
struct Chunked {
    prompt: Vec<u32>,
    chunk: usize,
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    margins: Vec<f32>,
}

#[derive(Deserialize)]
struct ChunkedGolden {
    chunked: Vec<Chunked>,
}

fn read<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str, reg: &rmlx::plugins::Registry) -> LoadedModel {
    let model = LoadedModel::load_with(&common::fixture(&format!("models/{name}")), reg, LoadPolicy::default())
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
    model
}

/// Teacher-forced comparison of the chunked cases through a `Session` whose
/// prefill runs `chunk` tokens per forward, as mlx-lm's did.
fn compare_chunked(model: &mut LoadedModel, name: &str, cases: &[Chunked], tally: &mut Tally) {
    for case in cases {
        let mut session = Session::new(model);
        session.prefill_chunk = case.chunk;
        let label = format!("{name} chunk {}", case.chunk);
        compare_run(session, &label, &case.prompt, &case.tokens, &case.logits, &case.margins, tally);
    }
}

#[test]
fn hybrids_match_mlx_lm_across_decode_steps_and_prefill_chunks() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let names = ARCHS.iter().flat_map(|(a, k)| ["f32", "q4-g64", "q8-g64"].map(|q| (format!("{a}-{q}"), *k)));
    for (name, want_kinds) in names {
        let name = name.as_str();
        let mut model = load(name, &reg);
        assert_eq!(model.architecture_plugin, "arch-qwen3");
        // gated DeltaNet layers keep recurrent state, attention layers K/V
        let kinds: Vec<u32> = model.cache_layers.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, want_kinds, "{name}");
        let mut tally = Tally::default();
        compare(&mut model, &read::<Golden>(name), &mut tally);
        let one_piece = tally.compared;
        let chunked = read::<ChunkedGolden>(name).chunked;
        assert_eq!(chunked.iter().map(|c| c.chunk).collect::<Vec<_>>(), [11, 4]);
        compare_chunked(&mut model, name, &chunked, &mut tally);
        eprintln!(
            "{name}: {one_piece} steps in one piece, {} chunked, worst relative error {:e}",
            tally.compared - one_piece,
            tally.worst
        );
        assert_eq!(tally.compared, 3 * 8 + 2 * 8);
        assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
        // Under the process's load policy too (as goldens.rs loads every
        // golden: on a CPU, float32 and dense weights when they fit).
        let mut model = LoadedModel::load(&common::fixture(&format!("models/{name}")), &reg).unwrap();
        let mut tally = Tally::default();
        compare(&mut model, &read::<Golden>(name), &mut tally);
        assert!(tally.failures.is_empty(), "{name} (process policy):\n{}", tally.failures.join("\n"));
    }
    // The quantized variants' routers and shared-expert gates are 8-bit (mlx-lm's quant_predicate).
    let layers = [
        ("qwen3_next-q4-g64", "model.layers.0.mlp.gate", 8),
        ("qwen3_next-q4-g64", "model.layers.0.mlp.shared_expert_gate", 8),
        ("qwen3_next-q4-g64", "model.layers.0.mlp.switch_mlp.up_proj", 4),
        ("qwen3_next-q4-g64", "model.layers.0.linear_attn.in_proj_qkvz", 4),
        ("qwen3_next-q4-g64", "model.layers.1.self_attn.q_proj", 4),
        ("qwen3_5_moe-q4-g64", "language_model.model.layers.1.mlp.gate", 8),
        ("qwen3_5_moe-q4-g64", "language_model.model.layers.1.mlp.shared_expert_gate", 8),
        ("qwen3_5_moe-q4-g64", "language_model.model.layers.1.mlp.switch_mlp.down_proj", 4),
        ("qwen3_5_moe-q4-g64", "language_model.model.layers.0.linear_attn.in_proj_qkv", 4),
        ("qwen3_5-q4-g64", "language_model.model.layers.2.linear_attn.in_proj_a", 4),
        ("qwen3_5-q4-g64", "language_model.model.layers.3.self_attn.o_proj", 4),
    ];
    for (name, path, bits) in layers {
        let model = load(name, &reg);
        let q = model.layers.get(path).unwrap_or_else(|| panic!("{name}: no layer {path}"));
        assert_eq!((q.mode.as_str(), q.bits), ("affine", bits), "{name} {path}");
    }
}

/// `rmlx generate` runs the hybrid (one-sequence cache with recurrent state,
/// op-by-op decode) and gives mlx-lm's greedy tokens.
#[test]
fn rmlx_generate_runs_qwen3_next() {
    let _g = common::mlx_lock();
    let golden: Golden = read("qwen3_next-f32");
    let case = &golden.prompts[1];
    let prompt = case.prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let m = common::fixture("models/qwen3_next-f32");
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate", "-m", m.to_str().unwrap()])
        .args(["--prompt-tokens", &prompt, "--max-tokens", "8", "--json"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"));
    let tokens: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(tokens, case.tokens, "{v}");
}

/// config.json of qwen3_next-f32 with `edit` applied.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = common::fixture("models/qwen3_next-f32/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut c);
    c.to_string()
}

#[test]
fn qwen3_next_configs_are_refused_by_name() {
    let reg = common::registry();
    assert!(reg.check_config("qwen3_next", &config_with(|_| ())).is_ok());
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "longrope"})), "rope_scaling type `longrope`"),
        (Box::new(|c| c["hidden_act"] = "gelu".into()), "hidden_act `gelu`"),
        (Box::new(|c| c["linear_num_value_heads"] = 3.into()), "linear_num_value_heads 3"),
        (Box::new(|c| c["partial_rotary_factor"] = 0.1.into()), "partial_rotary_factor 0.1"),
        (Box::new(|c| c["layer_types"][0] = "full_attention".into()), "layer_types[0]"),
        (Box::new(|c| c["num_experts_per_tok"] = 9.into()), "num_experts_per_tok 9"),
        (Box::new(|c| drop(c.as_object_mut().unwrap().remove("linear_conv_kernel_dim"))), "linear_conv_kernel_dim"),
    ];
    for (edit, want) in cases {
        let e = format!("{:#}", reg.check_config("qwen3_next", &config_with(edit)).expect_err(want));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

/// The server's engine keeps the recurrent state per sequence
/// (host/tests/engine_hybrid.rs checks its output): the paged pool no longer
/// refuses the model, while the compiled step still leaves it alone.
#[test]
fn server_pool_serves_qwen3_next() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let model = load("qwen3_next-f32", &reg);
    assert_eq!(model.paged_refusal(), None);
    assert!(model.has_state());
    assert!(!rmlx::engine::compiled::enabled(&model));
}

/// Fixture `name`'s tensors renamed by `rename`, in a temporary directory.
fn edited_copy(name: &str, rename: impl Fn(&str, &mlx_rs::Array) -> Vec<(String, mlx_rs::Array)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture(&format!("models/{name}"));
    let tensors = mlx_rs::Array::load_safetensors(src.join("model.safetensors")).unwrap();
    let out: Vec<(String, mlx_rs::Array)> = tensors.iter().flat_map(|(k, v)| rename(k, v)).collect();
    mlx_rs::Array::save_safetensors(out, None, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    dir
}

/// The multi-token-prediction head (`mtp.*`, for speculative decoding) does
/// not stop a load: its tensors are listed as unused, and the model still
/// matches mlx-lm. Hugging Face's fused expert layout loads too.
#[test]
fn qwen3_5_keeps_mtp_loadable_and_loads_fused_experts() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let mtp = ["mtp.fc.weight", "mtp.norm.weight", "language_model.mtp.layers.0.input_layernorm.weight"];
    let dir = edited_copy("qwen3_5_moe-f32", |k, v| {
        let mut out = vec![(k.to_string(), v.clone())];
        if k == "language_model.model.norm.weight" {
            out.extend(mtp.iter().map(|m| (m.to_string(), v.clone())));
        }
        out
    });
    let mut model = LoadedModel::load_with(dir.path(), &reg, LoadPolicy::default()).unwrap();
    let mut unused = model.unused.clone();
    unused.sort();
    let mut want: Vec<String> = mtp.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(unused, want);
    let mut tally = Tally::default();
    compare(&mut model, &read::<Golden>("qwen3_5_moe-f32"), &mut tally);
    assert!(tally.failures.is_empty(), "{}", tally.failures.join("\n"));

    // Hugging Face's fused expert layout: per layer `mlp.experts.gate_up_proj`
    // [E, 2F, D] (gate rows, then up rows) and `mlp.experts.down_proj`, bare
    // tensors. It loads and gives mlx-lm's logits (mlx-lm splits it at load).
    let src = mlx_rs::Array::load_safetensors(common::fixture("models/qwen3_5_moe-f32/model.safetensors")).unwrap();
    let mut fused: Vec<(String, mlx_rs::Array)> = Vec::new();
    let mut layers = 0;
    for (k, v) in &src {
        if let Some(layer) = k.strip_suffix(".switch_mlp.gate_proj.weight") {
            let up = &src[&format!("{layer}.switch_mlp.up_proj.weight")];
            let gate_up = mlx_rs::ops::concatenate(&[v.clone(), up.clone()], 1).unwrap(); // [E, 2F, D]
            fused.push((format!("{layer}.experts.gate_up_proj"), gate_up));
            let down = &src[&format!("{layer}.switch_mlp.down_proj.weight")];
            fused.push((format!("{layer}.experts.down_proj"), down.clone()));
            layers += 1;
        } else if !k.contains(".switch_mlp.") {
            fused.push((k.clone(), v.clone()));
        }
    }
    assert!(layers > 0, "the fixture has expert layers");
    let dir = tempfile::tempdir().unwrap();
    mlx_rs::Array::save_safetensors(fused, None, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(common::fixture("models/qwen3_5_moe-f32/config.json"), dir.path().join("config.json")).unwrap();
    let mut model = LoadedModel::load_with(dir.path(), &reg, LoadPolicy::default()).unwrap();
    assert!(model.unused.is_empty(), "unused: {:?}", model.unused);
    let mut tally = Tally::default();
    compare(&mut model, &read::<Golden>("qwen3_5_moe-f32"), &mut tally);
    assert!(tally.failures.is_empty(), "{}", tally.failures.join("\n"));

    // Fused tensors of the wrong shape are refused by name.
    let bad = edited_copy("qwen3_5_moe-f32", |k, v| match k.strip_suffix(".switch_mlp.gate_proj.weight") {
        Some(layer) => vec![(format!("{layer}.experts.gate_up_proj"), v.clone())],
        None if k.contains(".switch_mlp.down_proj.") => {
            vec![(k.replace(".switch_mlp.down_proj.weight", ".experts.down_proj"), v.clone())]
        }
        None => vec![(k.to_string(), v.clone())],
    });
    let e = match LoadedModel::load_with(bad.path(), &reg, LoadPolicy::default()) {
        Ok(_) => panic!("gate_up_proj with F rows instead of 2F should be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("experts") && e.contains("gate_up_proj"), "{e}");
}

#[test]
fn qwen3_5_configs_are_refused_by_name() {
    let reg = common::registry();
    let path = common::fixture("models/qwen3_5_moe-f32/config.json");
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(reg.check_config("qwen3_5_moe", &base.to_string()).is_ok());
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("rope_parameters", serde_json::json!({"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type `dynamic`"),
        ("decoder_sparse_step", 2.into(), "decoder_sparse_step 2"),
        ("hidden_act", "gelu".into(), "hidden_act `gelu`"),
        ("linear_num_value_heads", 3.into(), "linear_num_value_heads 3"),
    ];
    for (key, value, want) in cases {
        let mut c = base.clone();
        c["text_config"][key] = value;
        let e = format!("{:#}", reg.check_config("qwen3_5_moe", &c.to_string()).expect_err(want));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

/// Through the HTTP API: `rmlx serve` answers a completion on the hybrid.
#[test]
fn server_answers_completions_on_qwen3_next() {
    let _g = common::mlx_lock(); // the engine thread loads the model
    use rmlx::api::{AppState, ServerOptions};
    use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
    let catalog = ModelCatalog::discover(&[(None, common::fixture("models/qwen3_next-f32"))], &[]).unwrap();
    let cfg = WorkerConfig {
        plugins_dir: common::plugins_dir(),
        max_queue_depth: 4,
        max_loaded_models: 1,
        idle_timeout: None,
        prefill_chunk: 512,
    };
    let worker = Worker::start(cfg, &catalog).unwrap();
    let state = std::sync::Arc::new(AppState { catalog: std::sync::Arc::new(catalog), worker, opts: ServerOptions::default() });
    let base = common::serve(state);
    let body = serde_json::json!({"model": "qwen3_next-f32", "prompt": [1, 17, 99], "max_tokens": 2});
    let (status, v) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let r = reqwest::Client::new().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    });
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 3, "{v}");
}

/// A checkpoint in the Hugging Face layout, made from an mlx-lm fixture by
/// undoing what mlx-lm's sanitize does: names under `model.language_model.`
/// (or `model.`) and `lm_head`, conv1d [C, 1, K], the blocks', q/k and final
/// RMSNorm weights stored as offsets from 1 (the gated norm is not). rmlx
/// reads it as mlx-lm does and matches the same goldens.
#[test]
fn qwen3_5_reads_the_hugging_face_layout() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let shifted = [".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight", ".k_norm.weight"];
    for (name, root) in [("qwen3_5-f32", "model.language_model."), ("qwen3_5_moe-f32", "model."), ("qwen3_5-q4-g64", "model.language_model.")] {
        let dir = edited_copy(name, |k, v| {
            let key = k.replacen("language_model.model.", root, 1).replacen("language_model.lm_head", "lm_head", 1);
            let v = if k.ends_with("conv1d.weight") {
                v.swap_axes(1, 2).unwrap() // [C, K, 1] -> [C, 1, K]
            } else if shifted.iter().any(|s| k.ends_with(s)) {
                v.subtract(mlx_rs::Array::from_f32(1.0)).unwrap()
            } else {
                v.clone()
            };
            vec![(key, v)]
        });
        let mut model = LoadedModel::load_with(dir.path(), &reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
        let mut tally = Tally::default();
        compare(&mut model, &read::<Golden>(name), &mut tally);
        assert!(tally.failures.is_empty(), "{name} in the HF layout:\n{}", tally.failures.join("\n"));
    }
}

/// bfloat16 as `mlx_lm.convert --dtype bfloat16` writes qwen3_5 (every float
/// tensor bfloat16 but `A_log`, which its cast_predicate keeps float32):
/// against mlx-lm's bfloat16 run.
#[test]
fn qwen3_5_bf16_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let name = "qwen3_5-bf16";
    let mut model = load(name, &reg);
    let mut tally = Tally::default();
    compare(&mut model, &read::<Golden>(name), &mut tally);
    compare_chunked(&mut model, name, &read::<ChunkedGolden>(name).chunked, &mut tally);
    eprintln!("{name}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
    // as goldens.rs loads it (the process's load policy)
    let mut model = LoadedModel::load(&common::fixture(&format!("models/{name}")), &reg).unwrap();
    let mut tally = Tally::default();
    compare(&mut model, &read::<Golden>(name), &mut tally);
    eprintln!("{name} (process policy): worst relative error {:e}", tally.worst);
    assert!(tally.failures.is_empty(), "{name} (process policy):\n{}", tally.failures.join("\n"));
}
