//! The Qwen3.5 multi-token-prediction head as a drafter head (plugin ABI
//! 3.6: `Model::conditioning`, `HEAD_STATE`; plugins/arch-qwen3
//! qwen3_5_mtp.rs), against mlx-vlm 0.7.10's `Qwen3_5MTPDraftModel` bound to
//! mlx-lm's qwen3_5 (tests/goldens/qwen3_5_mtp_golden.py; fixture
//! tests/fixtures/models/qwen3_5-mtp-f32: the tiny qwen3_5 verifier plus a
//! random `mtp.*` head stored as Hugging Face stores it):
//! - the verifier still loads from that checkpoint as a plain model, and the
//!   hidden states it hands back for layer `num_layers - 1` (what the head's
//!   conditioning `-1` names) are mlx-lm's before its final norm;
//! - `LoadedModel::load_head(dir, "mtp")` builds the head from the same
//!   checkpoint (`qwen3_5_mtp`), which names `[-1]`;
//! - its prefill (the prompt shifted by one, then the verifier's first token,
//!   conditioned on the verifier's hidden states) gives mlx-vlm's logits, and
//!   four chained draft steps, each conditioned on the head's own state of
//!   the step before (`HEAD_STATE`), give mlx-vlm's logits and proposals;
//! - `rmlx generate --draft-kind mtp`'s loop is lossless on the hybrid
//!   (its recurrent state rolled back by snapshot);
//! - a head without its conditioning, and a model type with no head, are
//!   clear errors.
mod common;

use common::model::ids;
use common::mtp::{assert_head_drafts, assert_lossless, assert_verifier_hidden, head_golden, HeadGolden, SETTINGS};
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;

fn golden() -> HeadGolden {
    head_golden("goldens/qwen3_5-mtp/golden.json")
}

#[test]
fn the_mtp_head_drafts_as_mlx_vlm_does() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let g = golden();
    let dir = common::fixture("models/qwen3_5-mtp-f32");

    // The verifier: its last block's output is the head's conditioning.
    let mut verifier = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let hidden = assert_verifier_hidden(&mut verifier, &g, "mlx-vlm");

    // The head, from the same checkpoint.
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    assert_eq!(head.dir.model_type, "qwen3_5_mtp");
    assert_eq!(head.conditioning, vec![-1]);
    assert_eq!(head.spec.num_layers, 1);
    assert_head_drafts(&mut head, &g, &hidden, "mlx-vlm");
}

#[test]
fn a_head_needs_its_conditioning_and_a_model_type_with_none_is_refused() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = common::fixture("models/qwen3_5-mtp-f32");
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    let mut hc = head.kv_cache();
    let e = head.run(&ids(&[1, 2]), &mut hc, ForwardRequest::logits(true)).err().expect("no conditioning");
    assert!(format!("{e:#}").contains("conditioning"), "{e:#}");

    let e = LoadedModel::load_head(&common::fixture("models/qwen3_5-f32"), "mtp", &reg, LoadPolicy::default()).err().unwrap();
    assert!(format!("{e:#}").contains("no multi-token-prediction head"), "{e:#}");
    let e = LoadedModel::load_head(&common::fixture("models/qwen3_5-f32"), "eagle3", &reg, LoadPolicy::default()).err().unwrap();
    assert!(format!("{e:#}").contains("no architecture plugin builds a `eagle3` drafter head"), "{e:#}");
}

/// `rmlx generate --draft-kind mtp`'s loop (engine/speculative/mtp.rs) on
/// the hybrid verifier: greedy output equals plain greedy decoding token for
/// token, across rounds that keep some drafts and reject others (the
/// verifier's gated-DeltaNet state restored from its snapshot and the kept
/// tokens fed again), with the prompt prefilled in chunks; a sampled run
/// with a seed is reproducible and emits what was asked.
#[test]
fn mtp_speculation_is_lossless_on_the_hybrid() {
    use rmlx::engine::sampler::SamplingParams;
    use rmlx::engine::speculative::{mtp, SpecOptions};
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = common::fixture("models/qwen3_5-mtp-f32");
    let mut target = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    let prompt = golden().prompt;
    let want = assert_lossless(&mut target, &mut head, &prompt);
    // Stopping early is honoured.
    for (k, adaptive, chunk) in SETTINGS {
        let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: 24, prefill_chunk: chunk };
        let mut seen = 0;
        let out = mtp::generate(&mut target, &mut head, &prompt, &SamplingParams::default(), &opts, |_| {
            seen += 1;
            seen < 5
        })
        .unwrap();
        assert_eq!(out.tokens, want[..5], "k {k} adaptive {adaptive} chunk {chunk}");
    }
    // The random tiny head never agrees with the greedy verifier; at a high
    // temperature both distributions are near uniform, so rejection sampling
    // keeps most drafts: rounds that keep every draft (no roll-back, the head
    // fed k + 1 tokens) run too.
    let hot = SamplingParams { temperature: 20.0, seed: Some(3), ..SamplingParams::default() };
    let opts = SpecOptions { num_draft_tokens: 3, adaptive: false, max_tokens: 40, prefill_chunk: 64 };
    let out = mtp::generate(&mut target, &mut head, &prompt, &hot, &opts, |_| true).unwrap();
    assert_eq!(out.tokens.len(), 40);
    assert!(out.accepted_tokens * 2 > out.drafted_tokens, "kept {} of {}", out.accepted_tokens, out.drafted_tokens);
    assert!(out.rounds < 39, "some rounds kept drafts: {} rounds for 39 tokens", out.rounds);
}

