//! Drafter heads in the server's batched speculative step (`rmlx serve
//! --draft-kind mtp`; engine/scheduler/spec.rs, spec/head.rs, spec/settle.rs)
//! on the tiny Qwen3.5 hybrid with its tiny random MTP head
//! (tests/fixtures/models/qwen3_5-mtp-f32: gated-DeltaNet layers, so every
//! rejected draft rolls the verifier's recurrent state back):
//! greedy output with the head equals output without, one stream and
//! several at once; a batch mixing drafted and undrafted rows equals one at
//! a time; sampled output follows the verifier's distribution (chi-square);
//! usage and /metrics report the `mtp` drafter's counts.
mod common;

use common::engine::{worker, entry, submit, collect};
use common::spec::{collect_logprobs, greedy, prompts, submit_hooked, NoRepeatClass};

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{Finish, GenParams, LogitsHook, ModelCatalog, ModelEntry, TokenLogprob};
use std::sync::Arc;

const HYBRID: &str = "models/qwen3_5-mtp-f32";

/// The hybrid twice: `plain` without a drafter, `mtp` with its own head.
fn catalog(k: usize) -> ModelCatalog {
    common::spec::mtp_catalog(HYBRID, k)
}

/// Greedy output with the MTP head equals the model's own, one stream at a
/// time and five at once; every request drafted (the random head's drafts
/// are rejected: the recurrent state is restored and the kept token fed
/// again each step).
#[test]
fn greedy_mtp_speculation_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    common::spec::assert_greedy_equals_plain(&catalog(3), "mtp", &prompts(), 16, &[None; 5]);
}

/// The prompt's conditioning reaches the head during prefill (the prefill
/// forward returns the verifier's hidden states, engine/scheduler/spec/
/// prompt.rs), so the server's drafts are `rmlx generate`'s
/// (`mtp::generate`): round by round the same draft tokens, the same
/// tokens, the same drafted and accepted counts, for prompts of 1 to 40
/// tokens prefilled in chunks of 16 (two and three chunks) on both sides.
/// (Before, the head's context began at the first speculative step and
/// its drafts differed.)
#[test]
fn server_mtp_drafts_with_the_prompt_context_equal_generate() {
    let _g = common::mlx_lock();
    common::spec::assert_mtp_drafts_equal_generate(HYBRID, &prompts());
}

/// Rows with `num_draft_tokens` 0, the default, 1 and 5 share batches with
/// the head; each equals its own run alone, with `spec_max_batch` 8 and 2
/// (above it the plain step runs, and the head starts over after it).
#[test]
fn a_batch_mixing_mtp_drafted_and_undrafted_rows_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    const N: usize = 20;
    let cat = catalog(3);
    let ks = [Some(0), None, Some(1), Some(5), Some(0)];
    for max_batch in [8, 2] {
        let w = worker(&cat, SchedulerConfig { spec_max_batch: max_batch, ..SchedulerConfig::default() });
        let (plain, mtp) = (entry(&cat, "plain"), entry(&cat, "mtp"));
        common::spec::assert_mixed_batch_equals_alone(&w, &plain, &mtp, &prompts(), &[N; 5], &ks, &format!("spec_max_batch {max_batch}"));
        assert!(w.stats().speculation.get("mtp").is_some_and(|s| s.drafted_tokens > 0), "{:?}", w.stats().speculation);
    }
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty,
/// drafted by the head, 1200 seeds in batches of 16: the 27 possible
/// sequences occur as often as the verifier's own sampler gives them
/// (chi-square p > 0.001), none outside its support.
#[test]
fn sampled_mtp_speculation_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    common::spec::assert_sampled_mtp_follows_the_verifier(HYBRID);
}

/// At a high temperature the random head's drafts are often kept, so rows
/// that keep every verified position (the verify forward's own state) and
/// rows that roll back share steps; a seed reproduces its tokens.
#[test]
fn hot_sampling_keeps_mtp_drafts_and_a_seed_reproduces() {
    let _g = common::mlx_lock();
    let cat = catalog(3);
    let w = worker(&cat, SchedulerConfig::default());
    let mtp = entry(&cat, "mtp");
    let params = |seed| GenParams { sampling: SamplingParams { temperature: 20.0, seed: Some(seed), ..SamplingParams::default() }, max_tokens: 24, ignore_eos: true, ..GenParams::default() };
    let run = || -> Vec<(Vec<u32>, (usize, usize))> {
        let mut rxs: Vec<_> = prompts().iter().enumerate().map(|(i, p)| submit(&w, &mtp, p, params(i as u64))).collect();
        rxs.iter_mut().map(|rx| collect(rx)).map(|(t, f)| (t, f.speculation.unwrap())).collect()
    };
    let a = run();
    let (d, k): (usize, usize) = a.iter().fold((0, 0), |(d, k), (_, s)| (d + s.0, k + s.1));
    assert!(k > 0 && k < d, "{k} of {d} kept");
    assert!(a.iter().all(|(t, _)| t.len() == 24));
    let b = run();
    assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>(), "a seed reproduces");
}

/// Through the HTTP API: `usage` carries the counts, `num_draft_tokens: 0`
/// gives the same tokens without them, and /metrics counts the `mtp` drafter.
#[tokio::test]
async fn the_api_reports_mtp_counts_and_metrics() {
    let _g = common::mlx_lock();
    let base = common::spec::serve_with_mtp("hybrid", HYBRID);
    let (d, _) = common::spec::assert_api_usage_counts_drafts(&base, "hybrid", &[3, 14, 15, 92, 65]).await;
    let client = reqwest::Client::new();
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| common::spec::drafter_metric(&text, name, "mtp");
    let (dr, ac, rate) = (value("rmlx_spec_draft_tokens_total"), value("rmlx_spec_accepted_tokens_total"), value("rmlx_spec_acceptance_rate"));
    assert!(dr >= d as f64 && ac <= dr && (rate - ac / dr).abs() < 1e-9, "{dr} {ac} {rate}");
}

/// A KV budget far too small for every sequence at once, shared by the
/// verifier's blocks and the head's: sequences are preempted (their head KV
/// and seed dropped, their recurrent state rebuilt by the prefill) and
/// every output still equals plain decoding; when all are done no block
/// is held.
#[test]
fn preemption_under_a_small_budget_keeps_mtp_output_exact() {
    let _g = common::mlx_lock();
    // One full-attention layer of 2 KV heads x 16 dims in f32, K and V: 256
    // bytes per token, in the verifier and in the head alike.
    let per_token = 2 * 16 * 4 * 2;
    let cat = catalog(3);
    let sched = SchedulerConfig { kv_budget: rmlx::engine::scheduler::KvBudget::Bytes(per_token * 8 * 40), block_size: 8, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    let ps = common::spec::lengthened(prompts());
    const N: usize = 40;
    let mut rxs: Vec<_> = ps.iter().map(|p| submit(&w, &entry(&cat, "mtp"), p, greedy(N, None))).collect();
    for (rx, p) in rxs.iter_mut().zip(&ps) {
        let (got, f) = collect(rx);
        assert_eq!(got, common::greedy_reference("qwen3_5-mtp-f32", p, N), "prompt of {}", p.len());
        assert!(f.speculation.is_some());
    }
    common::spec::wait_idle(&w);
    let s = w.stats();
    assert!(s.blocks[0].1.preemptions >= 1, "the budget never forced a preemption: {:?}", s.blocks[0].1);
    assert!(s.speculation["mtp"].drafted_tokens > 0, "{s:?}");
    assert_eq!(s.kv_used_bytes, 0, "blocks (verifier or head) still held: {s:?}");
}

/// Greedy rows with `logprobs` (3 alternatives), half of them under a
/// stateful logits hook, batched through the head (its drafts masked by a
/// fork of the hook, verified on the host): tokens equal the model's own
/// without a drafter and every logprob and alternative is within 1e-5.
#[test]
fn hooked_greedy_with_logprobs_under_mtp_equals_plain() {
    let _g = common::mlx_lock();
    const N: usize = 14;
    let cat = catalog(3);
    let w = worker(&cat, SchedulerConfig::default());
    let run = |e: &Arc<ModelEntry>, rows: &[(Vec<u32>, bool)]| -> Vec<(Vec<u32>, Vec<TokenLogprob>, Finish)> {
        let mut rxs: Vec<_> = rows
            .iter()
            .map(|(p, hooked)| {
                let hook: Option<Box<dyn LogitsHook>> = hooked.then(|| Box::new(NoRepeatClass::new(*p.last().unwrap())) as Box<dyn LogitsHook>);
                let params = GenParams { logprobs: Some(3), ..greedy(N, None) };
                submit_hooked(&w, e, p, params, hook)
            })
            .collect();
        rxs.iter_mut().map(collect_logprobs).collect()
    };
    let rows: Vec<(Vec<u32>, bool)> = prompts().into_iter().enumerate().map(|(i, p)| (p, i % 2 == 0)).collect();
    let want: Vec<_> = rows.iter().map(|r| run(&entry(&cat, "plain"), std::slice::from_ref(r)).pop().unwrap()).collect();
    let got = run(&entry(&cat, "mtp"), &rows);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "row {i}");
        assert_eq!(g.1.len(), N, "row {i}");
        common::spec::assert_logprobs_close(&g.1, &w.1, 1e-5, &format!("row {i}"));
        assert!(g.2.speculation.is_some_and(|(d, _)| d > 0), "row {i} drafted");
    }
}

/// `rmlx serve --draft-kind mtp` for a model whose type no plugin builds a
/// head for stops at start with one line naming it; with two models and no
/// `--draft-model` it asks to name the model.
#[test]
fn serve_refuses_mtp_without_a_head_at_start() {
    let m = |n: &str| common::fixture(&format!("models/{n}")).to_str().unwrap().to_string();
    let serve = |args: &[&str]| {
        let out = std::process::Command::new(common::rmlx_bin())
            .args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0", "--no-metrics-db"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = serve(&["--model", &m("llama-f32"), "--draft-kind", "mtp"]);
    assert!(err.contains("llama_mtp") && !err.contains("panick"), "{err}");
    let err = serve(&["--model", &m("llama-f32"), "--model", &m("qwen3_5-mtp-f32"), "--draft-kind", "mtp"]);
    assert!(err.contains("several models") && !err.contains("panick"), "{err}");
}
