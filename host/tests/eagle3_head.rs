//! The Eagle-3 drafter head (`--draft-kind eagle3`; plugins/arch-llama
//! llama_eagle3.rs, a drafter head of plugin ABI 3.6) loaded from its own
//! sidecar directory over the verifier's (`LoadedModel::load_head_from`),
//! against mlx-vlm 0.7.10's `Eagle3DraftModel` bound to mlx-lm's llama
//! (tests/goldens/eagle3_golden.py; fixture tests/fixtures/models/
//! llama-eagle3-head: a tiny random head in the speculators layout, a draft
//! vocabulary of 160 of the verifier's 256 tokens, no embedding of its own,
//! verifying model llama-f32):
//! - the verifier's hidden states at the three layers the head names are
//!   mlx-lm's, and the head's prefill and four chained draft steps (each on
//!   its own state, `HEAD_STATE`) give mlx-vlm's logits on the draft
//!   vocabulary, -inf elsewhere, and the same proposals;
//! - the same weights in the EAGLE / SGLang layout (flat llama config,
//!   `midlayer.*`, `eagle_config`) give the same logits;
//! - speculation with it is lossless: greedy equals plain decoding token for
//!   token; sampled 3-token continuations follow the verifier's own
//!   distribution (chi-square over 1200 seeds);
//! - `rmlx generate --json --draft-kind eagle3` reports the counts, and bad
//!   input is one clear line (the server: speculative_serve_eagle3.rs).
mod common;

use common::model::{argmax, ids, plain_greedy, values};

use common::golden::{rel_err, MARGIN, REL_TOL};
use mlx_rs::Array;
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::speculative::{mtp, stats::chi_square_p, SpecOptions};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use rmlx::plugins::Registry;
use rmlx_plugin_api::{author::Output, HEAD_STATE};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Deserialize)]
struct Step {
    token: u32,
    logits: Vec<f32>,
}

#[derive(Deserialize)]
struct Golden {
    prompt: Vec<u32>,
    first: u32,
    capture_layers: Vec<i32>,
    hot: Vec<u32>,
    hidden: Vec<Vec<f32>>,
    verifier_last_logits: Vec<f32>,
    prefill_logits: Vec<Vec<f32>>,
    chain: Vec<Step>,
    margins: Vec<f32>,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(common::fixture("goldens/eagle3/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn verifier_dir() -> PathBuf {
    common::fixture("models/llama-f32")
}

fn head_dir() -> PathBuf {
    common::fixture("models/llama-eagle3-head")
}

fn load_head(dir: &Path, reg: &Registry) -> LoadedModel {
    LoadedModel::load_head_from(dir, &verifier_dir(), "eagle3", reg, LoadPolicy::default()).unwrap()
}

/// A head forward of `tokens` on `cond` [1, L, C] (all-true mask) with
/// every position's logits and the head's state: (logits, state).
fn head_step(head: &mut LoadedModel, cache: &mut rmlx::engine::cache::KvCache, tokens: &[u32], cond: &[f32], width: usize) -> (Array, Array) {
    let l = tokens.len() as i32;
    let req = ForwardRequest {
        output: Some(Output::AllLogits),
        hidden_layers: vec![HEAD_STATE],
        inputs: Some((Array::from_slice(cond, &[1, l, width as i32]), Array::from_slice(&vec![true; tokens.len()], &[1, l]))),
        ..ForwardRequest::default()
    };
    let out = head.run(&ids(tokens), cache, req).unwrap();
    cache.advance(l);
    let (layer, state) = out.hidden.into_iter().next().expect("the head's state");
    assert_eq!(layer, HEAD_STATE);
    (out.out, state)
}

/// The head's logits over the verifier's vocabulary, checked against
/// mlx-vlm's over the draft vocabulary: equal at the hot ids, -inf elsewhere.
fn check_row(label: &str, row: &[f32], want: &[f32], hot: &[u32]) {
    let got: Vec<f32> = hot.iter().map(|&t| row[t as usize]).collect();
    let e = rel_err(&got, want);
    assert!(e < REL_TOL, "{label}: relative error {e} against mlx-vlm");
    let cold = (0..row.len() as u32).filter(|t| !hot.contains(t)).find(|&t| row[t as usize] != f32::NEG_INFINITY);
    assert!(cold.is_none(), "{label}: token {cold:?} is outside the draft vocabulary but not -inf");
}

/// Runs the golden's prefill and chain through `head`; its proposals must be
/// mlx-vlm's.
fn check_head_against_golden(head: &mut LoadedModel, g: &Golden, label: &str) {
    let (n, c) = (g.prompt.len(), g.hidden[0].len());
    let d = head.spec.hidden_size as usize;
    let v = head.spec.vocab_size as usize;
    let mut hc = head.kv_cache();
    let mut shifted = g.prompt[1..].to_vec();
    shifted.push(g.first);
    let (logits, state) = head_step(head, &mut hc, &shifted, &g.hidden.concat(), c);
    let rows = values(&logits);
    assert_eq!(rows.len(), n * v);
    for (i, want) in g.prefill_logits.iter().enumerate() {
        check_row(&format!("{label}: prefill position {i}"), &rows[i * v..(i + 1) * v], want, &g.hot);
    }
    let mut tok = argmax(&rows[(n - 1) * v..]);
    assert_eq!(tok, g.chain[0].token, "{label}: the prefill's proposal");
    let mut state = values(&state)[(n - 1) * d..].to_vec();
    for (i, step) in g.chain.iter().enumerate() {
        assert_eq!(tok, step.token, "{label}: draft step {i}");
        let (logits, s) = head_step(head, &mut hc, &[tok], &state, d);
        let row = values(&logits);
        check_row(&format!("{label}: draft step {i}"), &row, &step.logits, &g.hot);
        state = values(&s);
        tok = if g.margins[i] > MARGIN { argmax(&row) } else { g.chain.get(i + 1).map_or(tok, |s| s.token) };
    }
}

#[test]
fn the_eagle3_head_drafts_as_mlx_vlm_does() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let g = golden();

    // The verifier's blocks 0 and 1, concatenated in the head's order.
    let mut verifier = LoadedModel::load_with(&verifier_dir(), &reg, LoadPolicy::default()).unwrap();
    let mut head = load_head(&head_dir(), &reg);
    assert_eq!(head.dir.model_type, "speculator_model_eagle3");
    assert_eq!(head.conditioning, g.capture_layers);
    assert_eq!((head.spec.num_layers, head.spec.vocab_size), (1, 256));
    assert!(head.unused.is_empty(), "every sidecar tensor is used: {:?}", head.unused);
    let mut cache = verifier.kv_cache();
    let req = ForwardRequest { output: Some(Output::LastLogits), hidden_layers: vec![0, 1], ..ForwardRequest::default() };
    let out = verifier.run(&ids(&g.prompt), &mut cache, req).unwrap();
    assert!(rel_err(&values(&out.out), &g.verifier_last_logits) < REL_TOL, "verifier logits");
    let layer = |i: i32| values(&out.hidden.iter().find(|(l, _)| *l == i as u32).unwrap().1);
    let parts: Vec<Vec<f32>> = g.capture_layers.iter().map(|&i| layer(i)).collect();
    let d = parts[0].len() / g.prompt.len();
    let cond: Vec<f32> = (0..g.prompt.len()).flat_map(|p| parts.iter().flat_map(move |x| x[p * d..(p + 1) * d].to_vec())).collect();
    assert!(rel_err(&cond, &g.hidden.concat()) < REL_TOL, "the conditioning is mlx-lm's hidden states");

    check_head_against_golden(&mut head, &g, "speculators layout");
}

/// The same weights as the EAGLE / SGLang checkpoints store them: a flat
/// llama config (model_type `llama`, the layer ids under `eagle_config`),
/// the first layer as `midlayer.*`.
#[test]
fn the_eagle_layout_loads_the_same_head() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let g = golden();
    let dir = std::env::temp_dir().join(format!("rmlx-eagle3-flat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg: Value = serde_json::from_slice(&std::fs::read(head_dir().join("config.json")).unwrap()).unwrap();
    let mut flat = cfg["transformer_layer_config"].clone();
    for key in ["draft_vocab_size", "norm_before_residual", "tie_word_embeddings"] {
        flat[key] = cfg[key].clone();
    }
    flat["architectures"] = serde_json::json!(["LlamaForCausalLMEagle3"]);
    flat["eagle_config"] = serde_json::json!({"eagle_aux_hidden_state_layer_ids": cfg["eagle_aux_hidden_state_layer_ids"]});
    std::fs::write(dir.join("config.json"), flat.to_string()).unwrap();
    let tensors = Array::load_safetensors(head_dir().join("model.safetensors")).unwrap();
    let renamed: Vec<(String, Array)> = tensors.into_iter().map(|(k, v)| (k.replace("layers.0.", "midlayer."), v)).collect();
    Array::save_safetensors(renamed, None, dir.join("model.safetensors")).unwrap();
    let head = LoadedModel::load_head_from(&dir, &verifier_dir(), "eagle3", &reg, LoadPolicy::default());
    let _ = std::fs::remove_dir_all(&dir);
    let mut head = head.unwrap();
    assert_eq!(head.dir.model_type, "llama_eagle3");
    assert_eq!(head.conditioning, g.capture_layers);
    check_head_against_golden(&mut head, &g, "EAGLE layout");
}

/// Refusals, and the two-directory source's quantization per directory.
#[test]
fn eagle3_refusals_are_clear() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // A sidecar of a model type no plugin builds a head for.
    let e = LoadedModel::load_head_from(&common::fixture("models/qwen3-f32"), &verifier_dir(), "eagle3", &reg, LoadPolicy::default()).err().unwrap();
    assert!(format!("{e:#}").contains("no architecture plugin builds a `eagle3` drafter head of model_type `qwen3`"), "{e:#}");
    // Over a 4-bit verifier, each directory is read under its own
    // quantization: the shared embedding as the verifier stores it, the
    // head's own layers dense.
    let q4 = common::fixture("models/llama-q4-g64");
    let head = LoadedModel::load_head_from(&head_dir(), &q4, "eagle3", &reg, LoadPolicy::default()).unwrap();
    let mode = |m: &str| head.layers.get(m).map(|q| (q.mode.clone(), q.bits));
    assert_eq!(mode("model.embed_tokens"), Some(("affine".to_string(), 4)));
    assert_eq!(mode("fc").map(|m| m.0), Some("none".to_string()));
    assert!(head.unused.is_empty(), "{:?}", head.unused);
    // A head without its conditioning.
    let mut head = load_head(&head_dir(), &reg);
    let mut hc = head.kv_cache();
    let e = head.run(&ids(&[1, 2]), &mut hc, ForwardRequest::logits(true)).err().expect("no conditioning");
    assert!(format!("{e:#}").contains("conditioning"), "{e:#}");
}

/// `rmlx generate --draft-kind eagle3`'s loop (mtp.rs, the drafter-head
/// loop) equals plain greedy decoding token for token: the random head's
/// drafts are nearly all rejected, so the verifier's K/V and the head's
/// chained entries roll back every round; prompts prefilled in chunks. The
/// same head (hidden 64, vocabulary 256) also drafts for qwen3-f32 (tied
/// embedding) and the qwen3_5 hybrid (embedding under `language_model.`;
/// its gated-DeltaNet state restored from a snapshot on rejection).
#[test]
fn eagle3_speculation_is_lossless_greedy() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    for model in ["llama-f32", "qwen3-f32", "qwen3_5-f32"] {
        let vdir = common::fixture(&format!("models/{model}"));
        let mut target = LoadedModel::load_with(&vdir, &reg, LoadPolicy::default()).unwrap();
        let mut head = LoadedModel::load_head_from(&head_dir(), &vdir, "eagle3", &reg, LoadPolicy::default()).unwrap();
        for prompt in [golden().prompt, vec![7], (0..40).map(|i| (i * 37 + 5) % 256).collect()] {
            let want = plain_greedy(&mut target, &prompt, 24);
            for (k, adaptive, chunk) in [(3, false, 5), (1, false, 64), (4, true, 7)] {
                let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: 24, prefill_chunk: chunk };
                let out = mtp::generate(&mut target, &mut head, &prompt, &SamplingParams::default(), &opts, |_| true).unwrap();
                let label = format!("{model}: prompt of {} k {k} adaptive {adaptive} chunk {chunk}", prompt.len());
                assert_eq!(out.tokens, want, "{label}");
                assert!(out.drafted_tokens > 0 && out.accepted_tokens <= out.drafted_tokens, "{label}");
                assert_eq!(out.rounds + out.accepted_tokens, want.len() - 1, "{label}: one token before the rounds, then kept drafts + one per round");
            }
        }
    }
}

/// Temperature 1, top-k 3, repetition penalty 1.5 and a logit bias of +20
/// on three tokens of the draft vocabulary (so the verifier's and the head's top-3 are the same
/// three tokens, with different weights): 1200 seeds of 3 tokens against
/// the verifier's exact distribution over the 27 sequences (those expected
/// fewer than 5 times pooled), chi-square p > 0.001; both acceptance and
/// rejection ran.
#[test]
fn sampled_eagle3_speculation_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let g = golden();
    let mut target = LoadedModel::load_with(&verifier_dir(), &reg, LoadPolicy::default()).unwrap();
    let mut head = load_head(&head_dir(), &reg);
    let prompt = [17u32, 45, 45];
    let bias: Vec<(u32, f32)> = [g.hot[10], g.hot[60], g.hot[120]].iter().map(|&t| (t, 20.0)).collect();
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, logit_bias: bias, ..SamplingParams::default() };
    let expected = common::sampling::three_token_sequences(&mut target, &prompt, &params, |_, _| {});
    assert_eq!(expected.len(), 27);
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept) = (0, 0);
    let opts = SpecOptions { num_draft_tokens: 2, adaptive: false, max_tokens: 3, prefill_chunk: 64 };
    for seed in 0..1200u64 {
        let p = SamplingParams { seed: Some(seed), ..params.clone() };
        let out = mtp::generate(&mut target, &mut head, &prompt, &p, &opts, |_| true).unwrap();
        drafted += out.drafted_tokens;
        kept += out.accepted_tokens;
        let i = expected.iter().position(|(s, _)| *s == out.tokens).expect("a sequence outside the verifier's support");
        counts[i] += 1;
    }
    // Sequences expected fewer than 5 times are pooled into one cell (the
    // chi-square approximation needs expected counts of about 5 or more).
    let (mut pc, mut pp, mut rest) = (Vec::new(), Vec::new(), (0u64, 0f64));
    for (c, e) in counts.iter().zip(&expected) {
        if e.1 * 1200.0 >= 5.0 {
            pc.push(*c);
            pp.push(e.1);
        } else {
            rest = (rest.0 + c, rest.1 + e.1);
        }
    }
    if rest.1 > 0.0 {
        pc.push(rest.0);
        pp.push(rest.1);
    }
    let pv = chi_square_p(&pc, &pp);
    eprintln!("eagle3 sampled: p-value {pv}, {kept} of {drafted} drafts kept, pooled counts {pc:?}");
    assert!(pv > 1e-3, "chi-square p-value {pv}: pooled counts {pc:?}, expected {pp:?}");
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}

fn rmlx(args: &[&str]) -> std::process::Output {
    Command::new(common::rmlx_bin()).args(["--plugins", common::plugins_dir().to_str().unwrap()]).args(args).output().unwrap()
}

/// `rmlx generate --json --draft-kind eagle3 --draft-model HEAD` prints the
/// model's own tokens plus `drafted_tokens` and `accepted_tokens`; without
/// `--draft-model`, or with a directory that is no Eagle-3 head, it is one
/// line and a non-zero exit.
#[test]
fn generate_with_eagle3_reports_counts_and_refuses_bad_input() {
    let _g = common::mlx_lock();
    let h = head_dir();
    let h = h.to_str().unwrap();
    // The f32 verifier, and a 4-bit one whose embedding the head reads as
    // the verifier stores it (each directory under its own quantization).
    for model in ["llama-f32", "llama-q4-g64"] {
        let v = common::fixture(&format!("models/{model}"));
        let base = ["generate", "--json", "-m", v.to_str().unwrap(), "--prompt-tokens", "3,14,15,92,65", "--max-tokens", "16"];
        let plain = rmlx(&base);
        assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
        let plain: Value = serde_json::from_slice(&plain.stdout).unwrap();
        let spec = rmlx(&[&base[..], &["--draft-kind", "eagle3", "--draft-model", h, "--num-draft-tokens", "2"]].concat());
        assert!(spec.status.success(), "{}", String::from_utf8_lossy(&spec.stderr));
        let spec: Value = serde_json::from_slice(&spec.stdout).unwrap();
        assert_eq!(spec["tokens"], plain["tokens"], "{model}");
        assert!(plain.get("drafted_tokens").is_none());
        let (d, a) = (spec["drafted_tokens"].as_u64().unwrap(), spec["accepted_tokens"].as_u64().unwrap());
        assert!(d > 0 && a <= d, "{model}: {spec}");
    }
    let v = verifier_dir();
    let v = v.to_str().unwrap();
    let base = ["generate", "--json", "-m", v, "--prompt-tokens", "3,14,15,92,65", "--max-tokens", "16"];

    let one_line = |out: std::process::Output, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{needle}: succeeded");
        assert!(err.contains(needle) && !err.contains("panick"), "{err}");
    };
    one_line(rmlx(&[&base[..], &["--draft-kind", "eagle3"]].concat()), "--draft-kind eagle3 needs --draft-model");
    let q = common::fixture("models/qwen3-f32");
    one_line(rmlx(&[&base[..], &["--draft-kind", "eagle3", "--draft-model", q.to_str().unwrap()]].concat()), "drafter head of model_type `qwen3`");
}
