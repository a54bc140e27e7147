//! DeepSeek-V3's multi-token-prediction module as a drafter head (plugin
//! ABI 3.6; plugins/arch-deepseek deepseek_v3_mtp.rs), against the reference
//! tests/goldens/deepseek_v3_goldens.py writes from the published definition
//! with mlx-lm's `DeepseekV3DecoderLayer` as its block (fixture
//! tests/fixtures/models/deepseek_v3-mtp-f32: the tiny deepseek_v3 in
//! Hugging Face's layout with a random module as `model.layers.2`):
//! - the hidden states the verifier hands back for its last layer (what the
//!   head's conditioning `-1` names) are mlx-lm's before its final norm;
//! - `LoadedModel::load_head(dir, "mtp")` builds `deepseek_v3_mtp` from the
//!   same checkpoint; it names `[-1]` and caches one latent layer;
//! - its prefill (the prompt shifted by one, then the verifier's first token)
//!   and four chained draft steps (each conditioned on the head's own state,
//!   `HEAD_STATE`) give the reference's logits and proposals (the golden
//!   tells the choices apart: without the verifier's final norm on the
//!   conditioning the prefill logits are off by 4.9e-2 relative);
//! - `rmlx generate --draft-kind mtp`'s loop is lossless with it;
//! - a checkpoint without the module, or with more modules than the head
//!   reads, is refused by name.
mod common;

use common::mtp::{assert_head_drafts, assert_lossless, assert_verifier_hidden, head_golden, HeadGolden};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;

const MODEL: &str = "models/deepseek_v3-mtp-f32";

fn golden() -> HeadGolden {
    head_golden("goldens/deepseek_v3-mtp/golden.json")
}

#[test]
fn the_deepseek_mtp_head_drafts_as_the_reference_does() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let g = golden();
    let dir = common::fixture(MODEL);

    // The verifier: its last block's output is the head's conditioning.
    let mut verifier = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let hidden = assert_verifier_hidden(&mut verifier, &g, "the reference");

    // The head, from the same checkpoint: one layer, cached as a latent.
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    assert_eq!(head.dir.model_type, "deepseek_v3_mtp");
    assert_eq!(head.architecture_plugin, "arch-deepseek");
    assert_eq!(head.conditioning, vec![-1]);
    assert_eq!((head.spec.num_layers, head.spec.num_kv_heads, head.spec.head_dim), (1, 1, 20));
    assert!(head.unused.iter().all(|t| !t.starts_with("model.layers.2.")), "the module is read whole: {:?}", head.unused);
    assert_head_drafts(&mut head, &g, &hidden, "the reference");
}

/// `rmlx generate --draft-kind mtp`'s loop (engine/speculative/mtp.rs) with
/// the DeepSeek head: greedy output equals plain greedy decoding token for
/// token, across rounds that keep some drafts and reject others, with the
/// prompt prefilled in chunks; a seeded sampled run reproduces.
#[test]
fn deepseek_mtp_speculation_is_lossless() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = common::fixture(MODEL);
    let mut target = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    assert_lossless(&mut target, &mut head, &golden().prompt);
}

#[test]
fn a_checkpoint_without_the_module_or_with_more_modules_is_refused() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // mlx-lm's layout has no module (its config names none).
    let e = LoadedModel::load_head(&common::fixture("models/deepseek_v3-f32"), "mtp", &reg, LoadPolicy::default()).err().unwrap();
    assert!(format!("{e:#}").contains("num_nextn_predict_layers is 0"), "{e:#}");
    // A config naming a module the weights lack.
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("models/deepseek_v3-f32");
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    c["num_nextn_predict_layers"] = 1.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let e = LoadedModel::load_head(dir.path(), "mtp", &reg, LoadPolicy::default()).err().unwrap();
    assert!(format!("{e:#}").contains("no multi-token-prediction module (no `model.layers.2.eh_proj.weight`)"), "{e:#}");
    // Two modules: only the first would be chained.
    c["num_nextn_predict_layers"] = 2.into();
    let e = reg.check_config("deepseek_v3_mtp", &c.to_string()).err().unwrap();
    assert!(format!("{e:#}").contains("num_nextn_predict_layers is 2"), "{e:#}");
}

/// `rmlx generate --draft-kind mtp --json` on the tiny model: the model's
/// own greedy tokens, with `drafted_tokens` and `accepted_tokens`.
#[test]
fn rmlx_generate_with_the_deepseek_mtp_head_equals_plain_generation() {
    use serde_json::Value;
    let _g = common::mlx_lock();
    let dir = common::fixture(MODEL);
    let base = ["generate", "--json", "-m", dir.to_str().unwrap(), "--prompt-tokens", "3,14,15,42,5", "--max-tokens", "20"];
    let json = |args: &[&str]| -> Value {
        let out = std::process::Command::new(common::rmlx_bin())
            .args(["--plugins", common::plugins_dir().to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let plain = json(&base);
    assert!(plain.get("drafted_tokens").is_none());
    for k in ["1", "3"] {
        let spec = json(&[&base[..], &["--draft-kind", "mtp", "--num-draft-tokens", k]].concat());
        assert_eq!(spec["tokens"], plain["tokens"], "k {k}");
        let (d, a) = (spec["drafted_tokens"].as_u64().unwrap(), spec["accepted_tokens"].as_u64().unwrap());
        assert!(d > 0 && a <= d, "{spec}");
    }
}
