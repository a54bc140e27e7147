//! model_type `qwen3_next` (plugins/arch-qwen3/src/qwen3_next.rs, the gated
//! DeltaNet of plugins/nn gated_delta.rs): the tiny hybrids
//! tests/goldens/qwen3_next_goldens.py built with mlx-lm's own classes
//! (float32, affine q4 and q8), against mlx-lm's logits and greedy tokens
//! after a prompt, over 8 decode steps that carry the recurrent state, and
//! with the prompt prefilled in chunks (the state crossing chunk
//! boundaries); `rmlx generate` on it; configs refused by name; and the
//! server's paged pool refusing it with the reason.
mod common;

use common::golden::{compare, rel_err, Golden, Tally, MARGIN, REL_TOL};
use rmlx::engine::{sampler, LoadedModel, Session};
use rmlx::model::policy::LoadPolicy;
use rmlx_plugin_api::cache_kind;
use serde::Deserialize;
use std::process::Command;

const MODELS: [&str; 3] = ["qwen3_next-f32", "qwen3_next-q4-g64", "qwen3_next-q8-g64"];

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
        let mut logits = session.prefill(&case.prompt).unwrap();
        for (step, want) in case.tokens.iter().enumerate() {
            let err = rel_err(&logits, &case.logits[step]);
            tally.worst = tally.worst.max(err);
            tally.compared += 1;
            if err > REL_TOL {
                tally.failures.push(format!("{name} chunk {} step {step}: relative error {err:e}", case.chunk));
            }
            if case.margins[step] > MARGIN && sampler::argmax(&logits) != *want {
                tally.failures.push(format!(
                    "{name} chunk {} step {step}: greedy {} != mlx-lm {want}",
                    case.chunk,
                    sampler::argmax(&logits)
                ));
            }
            if step + 1 < case.tokens.len() {
                logits = session.step(*want).unwrap();
            }
        }
    }
}

#[test]
fn qwen3_next_matches_mlx_lm_across_decode_steps_and_prefill_chunks() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    for name in MODELS {
        let mut model = load(name, &reg);
        assert_eq!(model.architecture_plugin, "arch-qwen3");
        // layers 0 and 2 gated DeltaNet (recurrent state), 1 and 3 attention
        let kinds: Vec<u32> = model.cache_layers.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, [cache_kind::STATE, cache_kind::FULL, cache_kind::STATE, cache_kind::FULL], "{name}");
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
    }
    // The quantized variants' routers and shared-expert gates are 8-bit (mlx-lm's quant_predicate).
    let model = load("qwen3_next-q4-g64", &reg);
    for (path, bits) in [
        ("model.layers.0.mlp.gate", 8),
        ("model.layers.0.mlp.shared_expert_gate", 8),
        ("model.layers.0.mlp.switch_mlp.up_proj", 4),
        ("model.layers.0.linear_attn.in_proj_qkvz", 4),
        ("model.layers.1.self_attn.q_proj", 4),
    ] {
        let q = model.layers.get(path).unwrap_or_else(|| panic!("no layer {path}"));
        assert_eq!((q.mode.as_str(), q.bits), ("affine", bits), "{path}");
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

/// The server's paged KV pool keeps no recurrent state yet: it refuses the
/// model (a 400 with this text) and names the layer.
#[test]
fn server_pool_refuses_qwen3_next_with_the_reason() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let model = load("qwen3_next-f32", &reg);
    let why = model.paged_refusal().expect("the paged pool cannot serve recurrent-state layers");
    assert!(why.contains("layer 0 of qwen3_next") && why.contains("rmlx generate"), "{why}");
}
