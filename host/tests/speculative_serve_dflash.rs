//! The DFlash block drafter in the server's batched speculative step
//! (`rmlx serve --draft-kind dflash --draft-model SIDECAR`;
//! engine/scheduler/spec/dflash.rs, spec/prompt.rs, spec/settle.rs) on the
//! tiny qwen3-f32 verifier with its tiny random DFlash drafter
//! (tests/fixtures/models/qwen3-dflash-f32: block size 4, so a step drafts
//! at most 3 tokens; tests/goldens/qwen3_dflash_golden.py): each sequence
//! keeps its own non-causal context store, filled with the prompt's hidden
//! states during prefill and with the kept positions after each step.
//! Greedy output with the drafter equals output without, one stream and
//! five at once with rows that do not draft mixed in, with the plain step
//! between speculative ones and under preemption; sampled output follows
//! the verifier's distribution; usage and /metrics report `dflash`.
mod common;

use common::engine::{collect, entry, submit, worker};
use common::spec::greedy;

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::speculative::{dflash, serve::DraftSpec};
use rmlx::engine::worker::{GenParams, ModelCatalog, Worker, WorkerConfig};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use std::sync::Arc;

const VERIFIER: &str = "models/qwen3-f32";
const SIDECAR: &str = "models/qwen3-dflash-f32";

/// qwen3-f32 twice: `plain` without a drafter, `dflash` with the sidecar
/// (`k`: None takes the drafter's default, its block size less one).
fn catalog(k: Option<usize>) -> ModelCatalog {
    common::spec::plain_and("dflash", &common::fixture(VERIFIER), DraftSpec::new(common::fixture(SIDECAR), k, Some("dflash")).unwrap())
}

fn prompts() -> Vec<Vec<u32>> {
    common::spec::prompts_in(240)
}

/// Greedy output with the DFlash drafter equals the model's own, one
/// stream at a time (prompts of 1 to 40 tokens, prefilled in chunks of 16)
/// and five at once; every request drafted and reports its counts.
#[test]
fn greedy_dflash_speculation_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    common::spec::assert_greedy_equals_plain(&catalog(None), "dflash", &prompts(), 20, &[None; 5]);
}

/// Rows with `num_draft_tokens` 0, the default, 1, 5 (capped at the block's
/// 3) and 0 share batches; each equals its own run alone, with
/// `spec_max_batch` 8 and 2 (above it the plain step runs, and the rows'
/// context stores start over after it: rows of 16 to 48 tokens, so fewer
/// rows decode as they finish). Rows with 0 report no counts; no step
/// drafts more than 3 tokens for a row.
#[test]
fn a_batch_mixing_dflash_drafted_and_undrafted_rows_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    let ns = [16usize, 24, 32, 40, 48];
    let cat = catalog(None);
    let ks = [Some(0), None, Some(1), Some(5), Some(0)];
    for max_batch in [8, 2] {
        let sched = SchedulerConfig { spec_max_batch: max_batch, log_drafts: true, ..SchedulerConfig::default() };
        let w = worker(&cat, sched);
        let (plain, dflash) = (entry(&cat, "plain"), entry(&cat, "dflash"));
        common::spec::assert_mixed_batch_equals_alone(&w, &plain, &dflash, &prompts(), &ns, &ks, &format!("spec_max_batch {max_batch}"));
        let s = w.stats().speculation["dflash"].clone();
        assert!(s.drafted_tokens > 0, "{s:?}");
        assert!(s.draft_log.iter().all(|d| (1..=3).contains(&d.len())), "{:?}", s.draft_log);
    }
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty,
/// drafted by the block drafter, 1200 seeds in batches of 16: the 27
/// possible sequences occur as often as the verifier's own sampler gives
/// them (chi-square p > 0.001); both acceptance and rejection ran.
#[test]
fn sampled_dflash_speculation_in_the_engine_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    // dflash_drafter.rs's prompt: the drafter's top 3 and the verifier's overlap.
    let prompt = [37u32, 215, 112];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = common::spec::verifier_sequences(VERIFIER, &prompt, &params);
    let (counts, drafted, kept) = common::spec::sample_sequences(&catalog(Some(2)), "dflash", &prompt, &params, &expected);
    common::spec::assert_follows(&counts, &expected);
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}

/// At a high temperature most drafts are kept (whole blocks, so a row's
/// context takes several positions a step); a seed reproduces its tokens.
#[test]
fn hot_sampling_keeps_dflash_blocks_and_a_seed_reproduces() {
    let _g = common::mlx_lock();
    let cat = catalog(None);
    let w = worker(&cat, SchedulerConfig::default());
    let dflash = entry(&cat, "dflash");
    let params = |seed| GenParams { sampling: SamplingParams { temperature: 20.0, seed: Some(seed), ..SamplingParams::default() }, max_tokens: 24, ignore_eos: true, ..GenParams::default() };
    let run = || -> Vec<(Vec<u32>, (usize, usize))> {
        let mut rxs: Vec<_> = prompts().iter().enumerate().map(|(i, p)| submit(&w, &dflash, p, params(i as u64))).collect();
        rxs.iter_mut().map(|rx| collect(rx)).map(|(t, f)| (t, f.speculation.unwrap())).collect()
    };
    let a = run();
    let (d, k): (usize, usize) = a.iter().fold((0, 0), |(d, k), (_, s)| (d + s.0, k + s.1));
    assert!(k > 0 && 2 * k > d, "{k} of {d} kept");
    assert!(a.iter().all(|(t, _)| t.len() == 24));
    let b = run();
    assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>(), "a seed reproduces");
}

/// A KV budget far too small for every sequence at once: the verifier's
/// blocks and the context stores (charged to the same budget) force
/// preemptions; a preempted row's store is dropped and rebuilt from its
/// prefill; every output equals plain greedy decoding and nothing is held
/// once all are done. With the prefix cache on, a repeated prompt's
/// drafter context starts at its first uncached token: still exact.
#[test]
fn preemption_and_prefix_hits_keep_dflash_output_exact() {
    let _g = common::mlx_lock();
    let cat = catalog(None);
    // qwen3-f32: 2 layers of 2 KV heads x 16 dims in f32, K and V.
    let per_token = 2 * 2 * 16 * 4 * 2;
    let sched = SchedulerConfig { kv_budget: rmlx::engine::scheduler::KvBudget::Bytes(per_token * 8 * 64), block_size: 8, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    let ps = common::spec::lengthened(prompts());
    const N: usize = 40;
    let plain = entry(&cat, "plain");
    let want: Vec<Vec<u32>> = ps.iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(N, None))).0).collect();
    let mut rxs: Vec<_> = ps.iter().map(|p| submit(&w, &entry(&cat, "dflash"), p, greedy(N, None))).collect();
    for ((rx, p), want) in rxs.iter_mut().zip(&ps).zip(&want) {
        let (got, f) = collect(rx);
        assert_eq!(&got, want, "prompt of {}", p.len());
        assert!(f.speculation.is_some());
    }
    common::spec::wait_idle(&w);
    let s = w.stats();
    assert!(s.blocks.iter().map(|b| b.1.preemptions).sum::<u64>() >= 1, "the budget never forced a preemption: {:?}", s.blocks);
    assert!(s.speculation["dflash"].drafted_tokens > 0, "{s:?}");
    assert_eq!(s.kv_used_bytes, 0, "blocks or context stores still held: {s:?}");

    // The prefix cache on: the second run of each prompt hits its blocks.
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 4, idle_timeout: None, prefill_chunk: 512 };
    let w = Worker::start_with(cfg, SchedulerConfig { block_size: 8, ..SchedulerConfig::default() }, &cat).unwrap();
    for _ in 0..2 {
        for (p, want) in ps.iter().zip(&want) {
            let (got, f) = collect(&mut submit(&w, &entry(&cat, "dflash"), p, greedy(N, None)));
            assert_eq!(&got, want, "prefix cache, prompt of {}", p.len());
            assert!(f.speculation.unwrap().0 > 0);
        }
    }
    assert!(w.stats().blocks.iter().any(|b| b.1.prefix_hits > 0), "{:?}", w.stats().blocks);
}

/// Through the HTTP API: `usage` carries the counts, `num_draft_tokens: 0`
/// gives the same tokens without them, 33 is a 400 naming the field, and
/// /metrics counts the `dflash` drafter.
#[tokio::test]
async fn the_api_reports_dflash_counts_and_refuses_bad_requests() {
    use serde_json::{json, Value};
    let _g = common::mlx_lock();
    let mut cat = ModelCatalog::discover(&[(Some("qwen".into()), common::fixture(VERIFIER))], &[]).unwrap();
    Arc::get_mut(&mut cat.entries[0]).unwrap().draft = Some(DraftSpec::new(common::fixture(SIDECAR), None, Some("dflash")).unwrap());
    let base = common::spec::serve_catalog(cat);
    let client = reqwest::Client::new();
    let post = |k: Option<u32>| {
        let mut b = json!({"model": "qwen", "prompt": [3, 14, 15, 92, 65], "max_tokens": 12, "temperature": 0});
        if let Some(k) = k {
            b["num_draft_tokens"] = k.into();
        }
        let r = client.post(format!("{base}/v1/completions")).json(&b).send();
        async move {
            let r = r.await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let ((s1, spec), (s2, off)) = (post(None).await, post(Some(0)).await);
    assert_eq!((s1, s2), (200, 200), "{spec} {off}");
    assert_eq!(spec["choices"][0]["token_ids"], off["choices"][0]["token_ids"]);
    let u = &spec["usage"];
    let (d, a) = (u["drafted_tokens"].as_u64().unwrap(), u["accepted_tokens"].as_u64().unwrap());
    assert!(d > 0 && a <= d && u["completion_tokens"] == 12, "{u}");
    assert!(off["usage"].get("drafted_tokens").is_none(), "{}", off["usage"]);
    let (status, err) = post(Some(33)).await;
    assert_eq!(status, 400, "{err}");
    assert!(err.to_string().contains("num_draft_tokens"), "{err}");
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| common::spec::drafter_metric(&text, name, "dflash");
    let (dr, ac) = (value("rmlx_spec_draft_tokens_total"), value("rmlx_spec_accepted_tokens_total"));
    assert!(dr >= d as f64 && ac <= dr, "{dr} {ac}");
}

/// The server's DFlash drafts are `rmlx generate`'s (`dflash::generate`):
/// the prompt's hidden states go into the row's context store during
/// prefill, the first token is the verifier's own, and each step's kept
/// positions join the context; round by round the same draft blocks, the
/// same tokens and counts, prompts of 1 to 40 tokens in chunks of 16.
#[test]
fn server_dflash_drafts_equal_generate() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let pol = LoadPolicy::default();
    let mut target = LoadedModel::load_with(&common::fixture(VERIFIER), &reg, pol.clone()).unwrap();
    let mut head = LoadedModel::load_head_from(&common::fixture(SIDECAR), &common::fixture(VERIFIER), "dflash", &reg, pol).unwrap();
    common::spec::assert_drafts_equal_generate(&catalog(None), "dflash", &prompts(), 20, |p, opts| {
        dflash::generate(&mut target, &mut head, p, &SamplingParams::default(), opts, |_| true).unwrap()
    });
}
