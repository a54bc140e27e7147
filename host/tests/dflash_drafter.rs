//! The DFlash block-diffusion drafter (`--draft-kind dflash`; plugins/
//! arch-qwen3 qwen3_dflash.rs, engine/speculative/dflash.rs) against mlx-vlm
//! 0.7.10's `DFlashDraftModel` bound to mlx-lm's qwen3
//! (tests/goldens/qwen3_dflash_golden.py; fixture tests/fixtures/models/
//! qwen3-dflash-f32: a random tiny sidecar as DFlash checkpoints store it,
//! for the tiny qwen3-f32 verifier, whose embedding it shares):
//! - `LoadedModel::load_head_from(sidecar, verifier, "dflash")` builds
//!   `qwen3_dflash`, which names the target layers [0, 1];
//! - the verifier's hidden states of those layers are mlx-lm's, and three
//!   draft rounds (each: new context rows + [bonus, mask x 3] in one forward,
//!   non-causal) give mlx-vlm's logits and proposals, the context taken in
//!   with the first block or in a prefill of its own; with
//!   `dflash_config.causal` the block attends causally, as in mlx-vlm;
//! - `rmlx generate --draft-kind dflash`'s loop is lossless: greedy equals
//!   plain greedy decoding token for token (also on the Qwen3.5 hybrid,
//!   whose recurrent state rejected drafts roll back); sampled output follows the
//!   verifier's distribution (chi-square over 1200 seeds); `--json` reports
//!   the draft counts; bad input is a clear error.
mod common;

use common::model::{argmax, ids, plain_greedy, values};

use common::golden::{rel_err, MARGIN, REL_TOL};
use mlx_rs::Array;
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::speculative::{dflash, stats::chi_square_p, SpecOptions};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use rmlx_plugin_api::author::Output;
use serde::Deserialize;
use serde_json::Value;
use std::process::Command;

#[derive(Deserialize)]
struct Round {
    context: Vec<Vec<f32>>,
    block: Vec<u32>,
    logits: Vec<Vec<f32>>,
    drafts: Vec<u32>,
    margins: Vec<f32>,
    accepted: usize,
}

#[derive(Deserialize)]
struct Golden {
    prompt: Vec<u32>,
    first: u32,
    target_layer_ids: Vec<i32>,
    block_size: usize,
    mask_token_id: u32,
    verifier_last_logits: Vec<f32>,
    rounds: Vec<Round>,
    causal_round0_logits: Vec<Vec<f32>>,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(common::fixture("goldens/qwen3-dflash/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: sizes");
    let e = rel_err(got, want);
    assert!(e < REL_TOL, "{label}: relative error {e} against mlx-vlm");
}

fn verifier_dir() -> std::path::PathBuf {
    common::fixture("models/qwen3-f32")
}

fn sidecar_dir() -> std::path::PathBuf {
    common::fixture("models/qwen3-dflash-f32")
}

fn load_pair() -> (LoadedModel, LoadedModel) {
    let reg = common::registry();
    let target = LoadedModel::load_with(&verifier_dir(), &reg, LoadPolicy::default()).unwrap();
    let head = LoadedModel::load_head_from(&sidecar_dir(), &verifier_dir(), "dflash", &reg, LoadPolicy::default()).unwrap();
    (target, head)
}

#[test]
fn the_dflash_drafter_drafts_as_mlx_vlm_does() {
    let _g = common::mlx_lock();
    let g = golden();
    let (mut verifier, mut head) = load_pair();
    assert_eq!(head.dir.model_type, "qwen3_dflash");
    assert_eq!(head.conditioning, g.target_layer_ids);

    // The verifier's hidden states of the target layers: the first context.
    let mut cache = verifier.kv_cache();
    let layers: Vec<u32> = g.target_layer_ids.iter().map(|&l| l as u32).collect();
    let req = ForwardRequest { output: Some(Output::LastLogits), hidden_layers: layers.clone(), ..ForwardRequest::default() };
    let out = verifier.run(&ids(&g.prompt), &mut cache, req).unwrap();
    check("verifier logits", &values(&out.out), &g.verifier_last_logits);
    assert_eq!(argmax(&values(&out.out)), g.first);
    let mut hidden: Vec<Vec<f32>> = vec![Vec::new(); g.prompt.len()];
    for l in &layers {
        let (_, h) = out.hidden.iter().find(|(i, _)| i == l).unwrap();
        let d = h.dim(2) as usize;
        for (p, row) in values(h).chunks(d).enumerate() {
            hidden[p].extend_from_slice(row);
        }
    }
    check("verifier hidden states (concatenated)", &hidden.concat(), &g.rounds[0].context.concat());

    // Three rounds, the context taken in with the first block (as mlx-vlm
    // does), or in a prefill of its own in chunks of 5 (as dflash::generate does).
    for split in [false, true] {
        let mut d = dflash::Drafter::new(&mut head).unwrap();
        assert_eq!((d.mask_id, d.block), (g.mask_token_id, g.block_size));
        let mut ctx_tokens = g.prompt.clone();
        for (r, round) in g.rounds.iter().enumerate() {
            let (s, w) = (round.context.len(), round.context[0].len());
            let ctx = Array::from_slice(&round.context.concat(), &[1, s as i32, w as i32]);
            let k = g.block_size - 1;
            let logits = if split && r == 0 {
                let mut at = 0;
                for piece in ctx_tokens.chunks(5) {
                    let rows = Array::from_slice(&round.context[at..at + piece.len()].concat(), &[1, piece.len() as i32, w as i32]);
                    values(&d.forward(piece, Some(&rows), &[], Output::Hidden).unwrap());
                    at += piece.len();
                }
                d.propose(&[], None, round.block[0], k).unwrap()
            } else {
                d.propose(&ctx_tokens, Some(&ctx), round.block[0], k).unwrap()
            };
            assert_eq!(d.store.len() as usize, g.rounds[..=r].iter().map(|r| r.context.len()).sum::<usize>(), "only context is kept");
            let got = values(&logits);
            check(&format!("round {r} logits (split prefill: {split})"), &got, &round.logits.concat());
            let v = got.len() / k;
            for (i, row) in got.chunks(v).enumerate() {
                if round.margins[i] > MARGIN {
                    assert_eq!(argmax(row), round.drafts[i], "round {r} draft {i}");
                }
            }
            // The next round's context: the verifier's hidden states of [bonus, kept drafts].
            ctx_tokens = std::iter::once(round.block[0]).chain(round.drafts[..round.accepted].iter().copied()).collect();
        }
    }
}

/// The same weights with `dflash_config.causal: true` (a copy of the
/// sidecar in a temporary directory): the block attends causally, as
/// mlx-vlm's `is_causal` makes it, and its logits differ from the
/// non-causal drafter's.
#[test]
fn a_causal_dflash_drafter_drafts_as_mlx_vlm_does() {
    let _g = common::mlx_lock();
    let g = golden();
    let dir = std::env::temp_dir().join(format!("rmlx-dflash-causal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(sidecar_dir().join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(sidecar_dir().join("config.json")).unwrap()).unwrap();
    cfg["dflash_config"]["causal"] = true.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let reg = common::registry();
    let head = LoadedModel::load_head_from(&dir, &verifier_dir(), "dflash", &reg, LoadPolicy::default());
    let _ = std::fs::remove_dir_all(&dir);
    let mut head = head.unwrap();
    let round = &g.rounds[0];
    let (s, w) = (round.context.len(), round.context[0].len());
    let ctx = Array::from_slice(&round.context.concat(), &[1, s as i32, w as i32]);
    let mut d = dflash::Drafter::new(&mut head).unwrap();
    let got = values(&d.propose(&g.prompt, Some(&ctx), round.block[0], g.block_size - 1).unwrap());
    check("causal round 0 logits", &got, &g.causal_round0_logits.concat());
    assert!(rel_err(&got, &round.logits.concat()) > 1e-2, "causal and non-causal blocks differ");
}

/// Greedy `dflash::generate` equals plain greedy decoding token for token
/// (prompts of 1 to 23 tokens, chunked prefills, fixed and adaptive
/// lengths, blocks up to the trained size); stopping early is honoured; a
/// sampled run with a seed reproduces; at a high temperature most drafts
/// are kept, so rounds that keep the whole block run too.
#[test]
fn dflash_speculation_is_lossless() {
    use rmlx::engine::sampler::SamplingParams;
    let _g = common::mlx_lock();
    let (mut target, mut head) = load_pair();
    let prompts: Vec<Vec<u32>> = vec![golden().prompt, vec![42], (0..23).map(|i| (i * 37 + 11) % 250).collect()];
    for prompt in &prompts {
        let want = plain_greedy(&mut target, prompt, 24);
        for (k, adaptive, chunk) in [(3, false, 5), (1, false, 64), (3, true, 7), (9, true, 4)] {
            let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: 24, prefill_chunk: chunk };
            let out = dflash::generate(&mut target, &mut head, prompt, &SamplingParams::default(), &opts, |_| true).unwrap();
            assert_eq!(out.tokens, want, "prompt of {} k {k} adaptive {adaptive} chunk {chunk}", prompt.len());
            assert!(out.drafted_tokens > 0 && out.rounds > 0, "it speculated");
            assert!(out.accepted_tokens <= out.drafted_tokens);
            assert!(out.drafted_tokens <= out.rounds * 3, "at most block_size - 1 drafts a round");
        }
        let mut seen = 0;
        let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: 24, prefill_chunk: 64 };
        let out = dflash::generate(&mut target, &mut head, prompt, &SamplingParams::default(), &opts, |_| {
            seen += 1;
            seen < 5
        })
        .unwrap();
        assert_eq!(out.tokens, want[..5]);
    }
    let prompt = golden().prompt;
    let sampled = SamplingParams { temperature: 0.8, seed: Some(11), ..SamplingParams::default() };
    let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: 16, prefill_chunk: 64 };
    let a = dflash::generate(&mut target, &mut head, &prompt, &sampled, &opts, |_| true).unwrap();
    let b = dflash::generate(&mut target, &mut head, &prompt, &sampled, &opts, |_| true).unwrap();
    assert_eq!(a.tokens.len(), 16);
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    let hot = SamplingParams { temperature: 20.0, seed: Some(3), ..SamplingParams::default() };
    let opts = SpecOptions { num_draft_tokens: 3, adaptive: false, max_tokens: 40, prefill_chunk: 64 };
    let out = dflash::generate(&mut target, &mut head, &prompt, &hot, &opts, |_| true).unwrap();
    assert_eq!(out.tokens.len(), 40);
    eprintln!("dflash at temperature 20: {} of {} drafts kept in {} rounds", out.accepted_tokens, out.drafted_tokens, out.rounds);
    assert!(out.accepted_tokens * 2 > out.drafted_tokens, "kept {} of {}", out.accepted_tokens, out.drafted_tokens);
    assert!(out.rounds < 39, "some rounds kept drafts: {} rounds for 39 tokens", out.rounds);
}

/// The same sidecar drafting for the tiny Qwen3.5 hybrid (hidden size 64,
/// its embedding under `language_model.model.`): the target layers are
/// gated-DeltaNet layers, whose recurrent state each rejected draft rolls
/// back (restored from before the verify forward, the kept tokens fed
/// again); greedy output equals plain greedy decoding.
#[test]
fn dflash_on_a_hybrid_verifier_rolls_its_state_back() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let hybrid = common::fixture("models/qwen3_5-f32");
    let mut target = LoadedModel::load_with(&hybrid, &reg, LoadPolicy::default()).unwrap();
    assert!(target.has_state());
    let mut head = LoadedModel::load_head_from(&sidecar_dir(), &hybrid, "dflash", &reg, LoadPolicy::default()).unwrap();
    let prompt = golden().prompt;
    let want = plain_greedy(&mut target, &prompt, 20);
    for (k, adaptive, chunk) in [(3, false, 5), (2, true, 64)] {
        let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: 20, prefill_chunk: chunk };
        let out = dflash::generate(&mut target, &mut head, &prompt, &SamplingParams::default(), &opts, |_| true).unwrap();
        assert_eq!(out.tokens, want, "k {k} adaptive {adaptive} chunk {chunk}");
        assert!(out.drafted_tokens > out.accepted_tokens, "drafts were rejected: the state rolled back");
    }
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty,
/// 1200 seeds: the 27 possible sequences occur as often as the verifier's
/// own sampler gives them (chi-square p > 0.001), drafts both kept and
/// rejected.
#[test]
fn sampled_dflash_speculation_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let (mut target, mut head) = load_pair();
    // A prompt where the drafter's top 3 and the verifier's overlap after each first token.
    let prompt = [37u32, 215, 112];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = common::sampling::three_token_sequences(&mut target, &prompt, &params, |_, _| {});
    assert_eq!(expected.len(), 27);
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept, mut other) = (0, 0, 0);
    let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: 3, prefill_chunk: 64 };
    for seed in 0..1200u64 {
        let p = SamplingParams { seed: Some(seed), ..params.clone() };
        let out = dflash::generate(&mut target, &mut head, &prompt, &p, &opts, |_| true).unwrap();
        drafted += out.drafted_tokens;
        kept += out.accepted_tokens;
        match expected.iter().position(|(s, _)| *s == out.tokens) {
            Some(i) => counts[i] += 1,
            None => other += 1,
        }
    }
    assert_eq!(other, 0, "sequences outside the verifier's top-k support were emitted");
    let probs: Vec<f64> = expected.iter().map(|e| e.1).collect();
    let pv = chi_square_p(&counts, &probs);
    eprintln!("dflash chi-square: p {pv:.4}, {kept} of {drafted} drafts kept");
    assert!(pv > 1e-3, "chi-square p-value {pv}: counts {counts:?}, expected {probs:?}");
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}

fn rmlx(args: &[&str]) -> std::process::Output {
    Command::new(common::rmlx_bin()).args(["--plugins", common::plugins_dir().to_str().unwrap()]).args(args).output().unwrap()
}

/// `rmlx generate --draft-kind dflash --draft-model SIDECAR --json`: the
/// model's own greedy tokens, with `drafted_tokens` and `accepted_tokens`;
/// a missing sidecar and a sidecar for another hidden size are refused
/// with one line each, by `rmlx generate` and at `rmlx serve`'s start.
#[test]
fn generate_with_dflash_reports_draft_counts_and_refuses_bad_input() {
    let _g = common::mlx_lock();
    let (v, s) = (verifier_dir(), sidecar_dir());
    let (v, s) = (v.to_str().unwrap(), s.to_str().unwrap());
    let base = ["generate", "--json", "-m", v, "--prompt-tokens", "3,14,15,92,65", "--max-tokens", "20"];
    let json = |args: &[&str]| -> Value {
        let out = rmlx(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let plain = json(&base);
    for k in [None, Some("2")] {
        let mut args = base.to_vec();
        args.extend(["--draft-kind", "dflash", "--draft-model", s]);
        if let Some(k) = k {
            args.extend(["--num-draft-tokens", k]);
        }
        let spec = json(&args);
        assert_eq!(spec["tokens"], plain["tokens"], "k {k:?}");
        let (d, a) = (spec["drafted_tokens"].as_u64().unwrap(), spec["accepted_tokens"].as_u64().unwrap());
        assert!(d > 0 && a <= d, "{spec}");
    }
    assert!(plain.get("drafted_tokens").is_none());

    let refused = |args: &[&str], want: &str| {
        let out = rmlx(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want) && !err.contains("panick"), "{args:?}: {err}");
    };
    refused(&[&base[..], &["--draft-kind", "dflash"]].concat(), "--draft-kind dflash needs --draft-model");
    // A verifier of another width (gemma3_text-f32: 128): the drafter reads its hidden states.
    let other = common::fixture("models/gemma3_text-f32");
    refused(
        &["generate", "-m", other.to_str().unwrap(), "--prompt-tokens", "1,2", "--draft-kind", "dflash", "--draft-model", s],
        "the DFlash drafter's hidden size is 64 but the model's is 128",
    );
    // The server checks the pair from the config files at start (the
    // batched path itself: tests/speculative_serve_dflash.rs).
    refused(&["serve", "--model", v, "--draft-kind", "dflash", "--port", "0"], "--draft-kind dflash for `qwen3-f32` needs --draft-model DIR");
    refused(
        &["serve", "--model", other.to_str().unwrap(), "--draft-kind", "dflash", "--draft-model", s, "--port", "0"],
        "has a hidden size of 64 but the model `gemma3_text-f32`",
    );
}
