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

use common::model::{argmax, ids, plain_greedy, values};

use common::golden::{rel_err, MARGIN, REL_TOL};
use mlx_rs::Array;
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use rmlx_plugin_api::{author::Output, HEAD_STATE};
use serde::Deserialize;

#[derive(Deserialize)]
struct Step {
    token: u32,
    logits: Vec<f32>,
}

#[derive(Deserialize)]
struct Golden {
    prompt: Vec<u32>,
    first: u32,
    hidden: Vec<Vec<f32>>,
    verifier_last_logits: Vec<f32>,
    prefill_logits: Vec<Vec<f32>>,
    chain: Vec<Step>,
    margins: Vec<f32>,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(common::fixture("goldens/qwen3_5-mtp/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// (conditioning [1, L, D], an all-true mask [1, L]) as the head takes them.
fn conditioning(rows: &[f32], l: usize, d: usize) -> (Array, Array) {
    (Array::from_slice(rows, &[1, l as i32, d as i32]), Array::from_slice(&vec![true; l], &[1, l as i32]))
}

fn check(label: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(e < REL_TOL, "{label}: relative error {e} against mlx-vlm");
}

#[test]
fn the_mtp_head_drafts_as_mlx_vlm_does() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let g = golden();
    let dir = common::fixture("models/qwen3_5-mtp-f32");
    let (n, d) = (g.prompt.len(), g.hidden[0].len());

    // The verifier: its last block's output is the head's conditioning.
    let mut verifier = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    assert!(verifier.conditioning.is_empty(), "the verifier is not a head");
    let last = verifier.spec.num_layers - 1;
    let mut cache = verifier.kv_cache();
    let req = ForwardRequest { output: Some(Output::LastLogits), hidden_layers: vec![last], ..ForwardRequest::default() };
    let out = verifier.run(&ids(&g.prompt), &mut cache, req).unwrap();
    check("verifier logits", &values(&out.out), &g.verifier_last_logits);
    let (layer, hidden) = &out.hidden[0];
    assert_eq!((*layer, hidden.shape()), (last, &[1, n as i32, d as i32][..]));
    check("verifier hidden states", &values(hidden), &g.hidden.concat());

    // The head, from the same checkpoint.
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    assert_eq!(head.dir.model_type, "qwen3_5_mtp");
    assert_eq!(head.conditioning, vec![-1]);
    assert_eq!(head.spec.num_layers, 1);
    let mut hc = head.kv_cache();

    // Prefill: [p_1 .. p_{n-1}, first], conditioned on h_0 .. h_{n-1}.
    let mut shifted = g.prompt[1..].to_vec();
    shifted.push(g.first);
    let req = ForwardRequest {
        output: Some(Output::AllLogits),
        hidden_layers: vec![HEAD_STATE],
        inputs: Some(conditioning(&values(hidden), n, d)),
        ..ForwardRequest::default()
    };
    let out = head.run(&ids(&shifted), &mut hc, req).unwrap();
    hc.advance(n as i32);
    check("head prefill logits", &values(&out.out), &g.prefill_logits.concat());
    let v = out.out.dim(2) as usize;
    let rows = values(&out.out);
    let proposal = argmax(&rows[(n - 1) * v..]);
    assert_eq!(proposal, g.chain[0].token, "the prefill's proposal");
    let (layer, state) = &out.hidden[0];
    assert_eq!(*layer, HEAD_STATE);
    let mut state = values(state)[(n - 1) * d..].to_vec();

    // Chained draft steps: the proposal, conditioned on the head's own state.
    let mut tok = proposal;
    for (i, step) in g.chain.iter().enumerate() {
        assert_eq!(tok, step.token, "draft step {i}");
        let req = ForwardRequest {
            output: Some(Output::LastLogits),
            hidden_layers: vec![HEAD_STATE],
            inputs: Some(conditioning(&state, 1, d)),
            ..ForwardRequest::default()
        };
        let out = head.run(&ids(&[tok]), &mut hc, req).unwrap();
        hc.advance(1);
        let logits = values(&out.out);
        check(&format!("draft step {i} logits"), &logits, &step.logits);
        state = values(&out.hidden[0].1);
        if g.margins[i] > MARGIN {
            tok = argmax(&logits);
        } else {
            tok = g.chain.get(i + 1).map(|s| s.token).unwrap_or(tok);
        }
    }
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
    let want = plain_greedy(&mut target, &prompt, 24);
    for (k, adaptive, chunk) in [(3, false, 5), (1, false, 64), (4, true, 7)] {
        let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: 24, prefill_chunk: chunk };
        let out = mtp::generate(&mut target, &mut head, &prompt, &SamplingParams::default(), &opts, |_| true).unwrap();
        assert_eq!(out.tokens, want, "k {k} adaptive {adaptive} chunk {chunk}");
        assert!(out.drafted_tokens > 0 && out.rounds > 0, "it speculated");
        assert!(out.accepted_tokens <= out.drafted_tokens);
        // Stopping early is honoured.
        let mut seen = 0;
        let out = mtp::generate(&mut target, &mut head, &prompt, &SamplingParams::default(), &opts, |_| {
            seen += 1;
            seen < 5
        })
        .unwrap();
        assert_eq!(out.tokens, want[..5]);
    }
    let sampled = SamplingParams { temperature: 0.8, seed: Some(11), ..SamplingParams::default() };
    let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: 16, prefill_chunk: 64 };
    let a = mtp::generate(&mut target, &mut head, &prompt, &sampled, &opts, |_| true).unwrap();
    let b = mtp::generate(&mut target, &mut head, &prompt, &sampled, &opts, |_| true).unwrap();
    assert_eq!(a.tokens.len(), 16);
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
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

