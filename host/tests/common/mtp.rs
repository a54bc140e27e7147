//! Multi-token-prediction drafter heads against a reference, from a test:
//! the golden file the mtp_head*.rs files read, the checks they share (the
//! verifier's hidden states for its last layer, the head's prefill and its
//! chained draft steps) and `rmlx generate --draft-kind mtp`'s loop against
//! plain greedy decoding.
use super::golden::{rel_err, MARGIN, REL_TOL};
use super::model::{argmax, ids, plain_greedy, values};
use mlx_rs::Array;
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::speculative::{mtp, SpecOptions};
use rmlx::engine::LoadedModel;
use rmlx_plugin_api::{author::Output, HEAD_STATE};
use serde::Deserialize;

/// One chained draft step of the reference: the token fed and the logits.
#[derive(Deserialize)]
pub struct Step {
    pub token: u32,
    pub logits: Vec<f32>,
}

/// A head's golden file: the prompt, the verifier's first token, its hidden
/// states [n][d] and last logits, the head's prefill logits [n][v] and its
/// chained draft steps with their top-1/top-2 margins.
#[derive(Deserialize)]
pub struct HeadGolden {
    pub prompt: Vec<u32>,
    pub first: u32,
    pub hidden: Vec<Vec<f32>>,
    pub verifier_last_logits: Vec<f32>,
    pub prefill_logits: Vec<Vec<f32>>,
    pub chain: Vec<Step>,
    pub margins: Vec<f32>,
}

/// The golden file at `rel` under tests/fixtures.
pub fn head_golden(rel: &str) -> HeadGolden {
    let text = std::fs::read_to_string(super::fixture(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// (conditioning [1, L, D], an all-true mask [1, L]) as the head takes them.
fn conditioning(rows: &[f32], l: usize, d: usize) -> (Array, Array) {
    (Array::from_slice(rows, &[1, l as i32, d as i32]), Array::from_slice(&vec![true; l], &[1, l as i32]))
}

/// `got` within `REL_TOL` of `want`; `against` names the reference.
fn check(label: &str, got: &[f32], want: &[f32], against: &str) {
    let e = rel_err(got, want);
    assert!(e < REL_TOL, "{label}: relative error {e} against {against}");
}

/// The verifier on `g`'s prompt: its last logits are the reference's, and
/// the hidden states it hands back for its last layer (what the head's
/// conditioning `-1` names) are the reference's [1, n, d]; returns them.
pub fn assert_verifier_hidden(verifier: &mut LoadedModel, g: &HeadGolden, against: &str) -> Vec<f32> {
    let (n, d) = (g.prompt.len(), g.hidden[0].len());
    assert!(verifier.conditioning.is_empty(), "the verifier is not a head");
    let last = verifier.spec.num_layers - 1;
    let mut cache = verifier.kv_cache();
    let req = ForwardRequest { output: Some(Output::LastLogits), hidden_layers: vec![last], ..ForwardRequest::default() };
    let out = verifier.run(&ids(&g.prompt), &mut cache, req).unwrap();
    check("verifier logits", &values(&out.out), &g.verifier_last_logits, against);
    let (layer, hidden) = &out.hidden[0];
    assert_eq!((*layer, hidden.shape()), (last, &[1, n as i32, d as i32][..]));
    let hidden = values(hidden);
    check("verifier hidden states", &hidden, &g.hidden.concat(), against);
    hidden
}

/// The head's prefill ([p_1 .. p_{n-1}, first], conditioned on the
/// verifier's `hidden` h_0 .. h_{n-1}) gives the reference's logits and
/// first proposal; then each chained draft step (the proposal, conditioned
/// on the head's own state of the step before, `HEAD_STATE`) gives the
/// reference's logits, and its proposal where the reference's margin
/// exceeds `MARGIN` (else the reference's next token is fed).
pub fn assert_head_drafts(head: &mut LoadedModel, g: &HeadGolden, hidden: &[f32], against: &str) {
    let (n, d) = (g.prompt.len(), g.hidden[0].len());
    let mut hc = head.kv_cache();
    let mut shifted = g.prompt[1..].to_vec();
    shifted.push(g.first);
    let req = ForwardRequest {
        output: Some(Output::AllLogits),
        hidden_layers: vec![HEAD_STATE],
        inputs: Some(conditioning(hidden, n, d)),
        ..ForwardRequest::default()
    };
    let out = head.run(&ids(&shifted), &mut hc, req).unwrap();
    hc.advance(n as i32);
    check("head prefill logits", &values(&out.out), &g.prefill_logits.concat(), against);
    let v = out.out.dim(2) as usize;
    let proposal = argmax(&values(&out.out)[(n - 1) * v..]);
    assert_eq!(proposal, g.chain[0].token, "the prefill's proposal");
    let (layer, state) = &out.hidden[0];
    assert_eq!(*layer, HEAD_STATE);
    let mut state = values(state)[(n - 1) * d..].to_vec();

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
        check(&format!("draft step {i} logits"), &logits, &step.logits, against);
        state = values(&out.hidden[0].1);
        tok = if g.margins[i] > MARGIN { argmax(&logits) } else { g.chain.get(i + 1).map(|s| s.token).unwrap_or(tok) };
    }
}

/// The (draft tokens, adaptive, prefill chunk) settings `assert_lossless`
/// runs `mtp::generate` with.
pub const SETTINGS: [(usize, bool, usize); 3] = [(3, false, 5), (1, false, 64), (4, true, 7)];

/// `mtp::generate` (`rmlx generate --draft-kind mtp`'s loop) with `head`
/// drafting for `target`: greedy output of 24 tokens equals plain greedy
/// decoding for each of `SETTINGS`, and it speculated; a sampled run of 16
/// tokens with a seed reproduces. Returns the plain greedy tokens.
pub fn assert_lossless(target: &mut LoadedModel, head: &mut LoadedModel, prompt: &[u32]) -> Vec<u32> {
    let want = plain_greedy(target, prompt, 24);
    for (k, adaptive, chunk) in SETTINGS {
        let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: 24, prefill_chunk: chunk };
        let out = mtp::generate(target, head, prompt, &SamplingParams::default(), &opts, |_| true).unwrap();
        assert_eq!(out.tokens, want, "k {k} adaptive {adaptive} chunk {chunk}");
        assert!(out.drafted_tokens > 0 && out.rounds > 0, "it speculated");
        assert!(out.accepted_tokens <= out.drafted_tokens);
    }
    let sampled = SamplingParams { temperature: 0.8, seed: Some(11), ..SamplingParams::default() };
    let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: 16, prefill_chunk: 64 };
    let a = mtp::generate(target, head, prompt, &sampled, &opts, |_| true).unwrap();
    let b = mtp::generate(target, head, prompt, &sampled, &opts, |_| true).unwrap();
    assert_eq!(a.tokens.len(), 16);
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    want
}
