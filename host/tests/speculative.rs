//! Speculative decoding with a draft model (engine/speculative) on the tiny
//! fixture models, whose vocabularies are the same (256 tokens): greedy
//! output equals output without speculation token for token; sampled output
//! follows the verifier's sampling distribution (chi-square over many
//! seeds); a seed reproduces; `rmlx generate --json` reports the counts.
mod common;

use rmlx::engine::sampler::{Sampler, SamplingParams};
use rmlx::engine::speculative::{self, stats::chi_square_p, SpecOptions, SpecOutput};
use rmlx::engine::{generate::generate, GenerateOptions, LoadedModel, Session};
use serde_json::Value;
use std::process::Command;

fn load(name: &str) -> LoadedModel {
    LoadedModel::load(&common::fixture(&format!("models/{name}")), &common::registry()).unwrap()
}

/// Prompts of several lengths (ids < 256); 40 tokens pass gemma3's window of 8.
fn prompts() -> Vec<Vec<u32>> {
    [1usize, 6, 19, 40].iter().enumerate().map(|(k, &n)| (0..n).map(|i| ((i * 11 + k * 37 + 5) % 250 + 3) as u32).collect()).collect()
}

fn greedy_reference(model: &mut LoadedModel, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let opts = GenerateOptions { max_tokens, temperature: 0.0, top_p: 1.0, seed: None, stop_ids: vec![], prefill_chunk: 512 };
    generate(model, prompt, &opts, |_| {}).unwrap().tokens
}

fn speculate(target: &mut LoadedModel, draft: &mut LoadedModel, prompt: &[u32], params: &SamplingParams, k: usize, adaptive: bool, max_tokens: usize) -> SpecOutput {
    let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens, prefill_chunk: 7 };
    speculative::generate(target, draft, prompt, params, &opts, |_| true).unwrap()
}

/// Pairs that keep every draft (a model drafting for itself), some (a
/// quantized copy), none (an unrelated model), and a sliding-window model
/// (gemma3: its one-sequence store is the paged pool, which rolls back
/// through windows), each over several prompts and draft lengths, fixed and
/// adaptive.
#[test]
fn greedy_speculation_equals_greedy_decoding_token_for_token() {
    let _g = common::mlx_lock();
    const N: usize = 24;
    let pairs = [
        ("llama-f32", "llama-f32"),
        ("llama-f32", "llama-q4-g64"),
        ("llama-f32", "qwen3-f32"),
        ("qwen3-f32", "qwen3-q8-g64"),
        ("gemma3_text-f32", "gemma3_text-q8-g64"),
    ];
    let greedy = SamplingParams::default();
    for (t, d) in pairs {
        let (mut target, mut draft) = (load(t), load(d));
        let (mut drafted, mut kept) = (0, 0);
        for (i, prompt) in prompts().iter().enumerate() {
            let want = greedy_reference(&mut target, prompt, N);
            for (j, k) in [1usize, 2, 3, 5].into_iter().enumerate() {
                let adaptive = (i + j) % 2 == 1;
                let out = speculate(&mut target, &mut draft, prompt, &greedy, k, adaptive, N);
                assert_eq!(out.tokens, want, "{t} drafted by {d}, prompt {i}, k = {k}, adaptive {adaptive}");
                assert!(out.accepted_tokens <= out.drafted_tokens);
                assert_eq!(out.rounds + out.accepted_tokens, N, "every round emits its kept drafts and one token of the verifier");
                drafted += out.drafted_tokens;
                kept += out.accepted_tokens;
            }
        }
        match (t == d, d) {
            (true, _) => assert_eq!(kept, drafted, "{t} drafting for itself keeps every draft"),
            (_, "qwen3-f32") => assert!(kept * 4 < drafted, "an unrelated drafter: {kept} of {drafted} kept"),
            _ => assert!(kept > 0 && kept < drafted, "{t} drafted by {d}: {kept} of {drafted} kept"),
        }
    }
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty (so
/// the distribution at each position depends on the drafts before it),
/// drafted by a quantized copy, over 1200 seeds: the 27 possible sequences
/// occur as often as the verifier's own sampler gives them (its
/// distribution computed step by step without speculation), chi-square
/// p-value > 0.001.
#[test]
fn sampled_speculation_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let (mut target, mut draft) = (load("llama-f32"), load("llama-q4-g64"));
    let prompt = [17u32, 45, 45];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    // The verifier's distribution of each 3-token continuation.
    let dist_after = |model: &mut LoadedModel, generated: &[u32]| -> Vec<f32> {
        let mut s = Session::new(model);
        let mut logits = s.prefill(&prompt).unwrap();
        for &t in generated {
            logits = s.step(t).unwrap();
        }
        let mut sampler = Sampler::with_params(params.clone());
        sampler.set_prompt(&prompt);
        for &t in generated {
            sampler.accept(t);
        }
        sampler.process(&mut logits);
        sampler.distribution(&logits)
    };
    let support = |p: &[f32]| -> Vec<u32> { (0..p.len() as u32).filter(|&i| p[i as usize] > 0.0).collect() };
    let mut expected: Vec<(Vec<u32>, f64)> = Vec::new();
    let p0 = dist_after(&mut target, &[]);
    for a in support(&p0) {
        let p1 = dist_after(&mut target, &[a]);
        for b in support(&p1) {
            let p2 = dist_after(&mut target, &[a, b]);
            for c in support(&p2) {
                expected.push((vec![a, b, c], p0[a as usize] as f64 * p1[b as usize] as f64 * p2[c as usize] as f64));
            }
        }
    }
    assert_eq!(expected.len(), 27);
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept, mut other) = (0, 0, 0);
    for seed in 0..1200u64 {
        let out = speculate(&mut target, &mut draft, &prompt, &SamplingParams { seed: Some(seed), ..params.clone() }, 2, false, 3);
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
    assert!(pv > 1e-3, "chi-square p-value {pv}: counts {counts:?}, expected {probs:?}");
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}

/// The same seed gives the same tokens with speculation; another seed
/// gives others.
#[test]
fn a_seed_reproduces_sampled_speculation() {
    let _g = common::mlx_lock();
    let (mut target, mut draft) = (load("qwen3-f32"), load("qwen3-q4-g64"));
    let prompt = [5u32, 99, 180, 7];
    let run = |target: &mut LoadedModel, draft: &mut LoadedModel, seed: u64| {
        let p = SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(seed), ..SamplingParams::default() };
        speculate(target, draft, &prompt, &p, 3, true, 16).tokens
    };
    let a = run(&mut target, &mut draft, 11);
    assert_eq!(a.len(), 16);
    assert_eq!(a, run(&mut target, &mut draft, 11));
    assert_ne!(a, run(&mut target, &mut draft, 12));
}

/// Runs `rmlx generate ARGS --json` on fixture models; the parsed object.
fn generate_json(args: &[&str]) -> Value {
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `rmlx generate --draft-model` prints the model's own greedy tokens, with
/// `drafted_tokens` and `accepted_tokens` (also through a compressed KV
/// family, whose one-sequence store is the paged pool); a draft model with
/// another vocabulary is refused naming both sizes; a model with recurrent
/// state layers drafts too (its state rolled back).
#[test]
fn generate_reports_draft_counts_and_refuses_another_vocabulary() {
    let _g = common::mlx_lock();
    let m = |n: &str| common::fixture(&format!("models/{n}")).to_str().unwrap().to_string();
    let (target, draft) = (m("llama-f32"), m("llama-q8-g64"));
    for kv in [None, Some("turbo4")] {
        let mut base = vec!["-m", &target, "--prompt-tokens", "3,14,15,92,65", "--max-tokens", "20"];
        if let Some(kv) = kv {
            base.extend(["--kv-cache", kv]);
        }
        let plain = generate_json(&base);
        let mut spec = base.clone();
        spec.extend(["--draft-model", &draft, "--num-draft-tokens", "4"]);
        let s = generate_json(&spec);
        assert_eq!(s["tokens"], plain["tokens"], "kv {kv:?}");
        assert!(plain.get("drafted_tokens").is_none());
        let (d, a) = (s["drafted_tokens"].as_u64().unwrap(), s["accepted_tokens"].as_u64().unwrap());
        assert!(d > 0 && a <= d, "kv {kv:?}: {s}");
    }
    // The same model with a vocabulary of 200 in its config.
    let dir = std::env::temp_dir().join(format!("rmlx-spec-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        let _ = std::fs::copy(common::fixture("models/llama-f32").join(f), dir.join(f));
    }
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(common::fixture("models/llama-f32/config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 200.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let out = Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate", "-m", &target, "--prompt-tokens", "1,2"])
        .args(["--draft-model", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("vocabulary of 200") && err.contains("256") && !err.contains("panick"), "{err}");
    // A model with recurrent-state layers rolls its state back (store.rs):
    // the same tokens, with counts.
    let (next, next_draft) = (m("qwen3_next-f32"), m("qwen3_next-q8-g64"));
    let base = ["-m", next.as_str(), "--prompt-tokens", "3,14,15,92,65", "--max-tokens", "12"];
    let plain = generate_json(&base);
    let s = generate_json(&[&base[..], &["--draft-model", next_draft.as_str()]].concat());
    assert_eq!(s["tokens"], plain["tokens"]);
    assert!(s["drafted_tokens"].as_u64().unwrap() > 0, "{s}");
}

/// On a real model with a tokenizer (SmolLM2-135M drafting for itself, so
/// rounds end on bonus tokens): the text, an EOS inside a round, and a
/// `--stop` string matched across tokens come out as without speculation.
#[test]
fn text_eos_and_stop_strings_apply_to_speculated_tokens() {
    let _g = common::mlx_lock();
    let m = common::default_model();
    let m = m.to_str().unwrap();
    let q = "What is the capital of France?";
    for stop in [None, Some("Paris")] {
        let mut base = vec!["-m", m, "--prompt", q, "--max-tokens", "48"];
        if let Some(s) = stop {
            base.extend(["--stop", s]);
        }
        let plain = generate_json(&base);
        let mut spec = base.clone();
        spec.extend(["--draft-model", m, "--num-draft-tokens", "4"]);
        let s = generate_json(&spec);
        for key in ["tokens", "text", "finish_reason"] {
            assert_eq!(s[key], plain[key], "stop {stop:?}: {key}");
        }
        assert_eq!(s["finish_reason"], "stop", "{s}");
        assert_eq!(s["drafted_tokens"], s["accepted_tokens"], "a model drafting for itself: {s}");
    }
}
