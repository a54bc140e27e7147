//! Speculative decoding inside the server's continuous-batching engine
//! (engine/scheduler/spec.rs) on the tiny fixture models (vocabulary 256):
//! greedy output with a draft model equals output without, token for token,
//! one stream and several at once; a batch mixing drafted and undrafted rows
//! equals one at a time; sampled output follows the verifier's distribution;
//! the usage counts are consistent; a model with recurrent-state layers
//! speculates with its state rolled back; `rmlx serve` refuses a draft model of another
//! vocabulary at start.
mod common;

use common::engine::{worker, entry, submit, collect};
use common::spec::{greedy, prompts};

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::speculative::serve::DraftSpec;
use rmlx::engine::worker::ModelCatalog;
use std::sync::Arc;

/// A catalog of `(id, model, draft model)`: the same directory may appear
/// under two ids, with and without a drafter.
fn catalog(models: &[(&str, &str, Option<&str>)], k: usize) -> ModelCatalog {
    let list: Vec<_> = models.iter().map(|(id, m, _)| (Some(id.to_string()), common::fixture(&format!("models/{m}")))).collect();
    let mut cat = ModelCatalog::discover(&list, &[]).unwrap();
    for (e, (_, _, d)) in cat.entries.iter_mut().zip(models) {
        if let Some(d) = d {
            Arc::get_mut(e).unwrap().draft = Some(DraftSpec::new(common::fixture(&format!("models/{d}")), Some(k), None).unwrap());
        }
    }
    cat
}

/// Greedy output with a drafter equals output without, one stream at a time
/// and all prompts at once, for a drafter that agrees (the model itself),
/// one that partly does (quantized copies, a sliding-window model) and one
/// that does not (another model); the usage carries the counts.
#[test]
fn greedy_speculation_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    const N: usize = 20;
    let pairs = [("llama-f32", "llama-f32"), ("llama-f32", "llama-q4-g64"), ("llama-f32", "qwen3-f32"), ("gemma3_text-f32", "gemma3_text-q8-g64")];
    for (m, d) in pairs {
        let cat = catalog(&[("plain", m, None), ("spec", m, Some(d))], 3);
        let w = worker(&cat, SchedulerConfig::default());
        let (plain, spec) = (entry(&cat, "plain"), entry(&cat, "spec"));
        let want: Vec<Vec<u32>> = prompts().iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(N, None))).0).collect();
        let (mut drafted, mut kept) = (0, 0);
        // One stream at a time.
        for (p, want) in prompts().iter().zip(&want) {
            let (got, f) = collect(&mut submit(&w, &spec, p, greedy(N, None)));
            assert_eq!(&got, want, "{m} drafted by {d}, prompt of {}", p.len());
            let (dr, ac) = f.speculation.expect("the usage reports draft counts");
            assert!(ac <= dr && dr > 0, "{m}/{d}: {ac} of {dr}");
            drafted += dr;
            kept += ac;
        }
        // All at once (one batch of 5 rows, each with its own draft length).
        let mut rxs: Vec<_> = prompts().iter().map(|p| submit(&w, &spec, p, greedy(N, None))).collect();
        for (rx, want) in rxs.iter_mut().zip(&want) {
            let (got, f) = collect(rx);
            assert_eq!(&got, want, "{m} drafted by {d}, batched");
            let (dr, ac) = f.speculation.unwrap();
            assert!(ac <= dr && dr > 0);
        }
        match (m == d, d) {
            (true, _) => assert_eq!(kept, drafted, "{m} drafting for itself keeps every draft"),
            (_, "qwen3-f32") => assert!(kept * 4 < drafted, "an unrelated drafter: {kept} of {drafted} kept"),
            _ => assert!(kept > 0 && kept < drafted, "{m} drafted by {d}: {kept} of {drafted} kept"),
        }
        let s = w.stats().speculation["draft"].clone();
        assert!(s.steps > 0 && s.accepted_tokens <= s.drafted_tokens && s.drafted_tokens >= drafted as u64, "{s:?}");
        // Without a drafter the usage has no counts.
        assert!(collect(&mut submit(&w, &plain, &prompts()[0], greedy(4, None))).1.speculation.is_none());
    }
}

/// Rows that do not draft (the request's `num_draft_tokens: 0`), rows with
/// other draft lengths and rows that draft by default share batches; each
/// equals its own run alone. Above `spec_max_batch` the plain step runs and
/// the output is the same.
#[test]
fn a_batch_mixing_drafted_and_undrafted_rows_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    const N: usize = 24;
    let cat = catalog(&[("plain", "llama-f32", None), ("spec", "llama-f32", Some("llama-q4-g64"))], 3);
    let ks = [Some(0), None, Some(1), Some(5), Some(0)];
    for max_batch in [8, 2] {
        let w = worker(&cat, SchedulerConfig { spec_max_batch: max_batch, ..SchedulerConfig::default() });
        let (plain, spec) = (entry(&cat, "plain"), entry(&cat, "spec"));
        common::spec::assert_mixed_batch_equals_alone(&w, &plain, &spec, &prompts(), &[N; 5], &ks, &format!("spec_max_batch {max_batch}"));
        let s = w.stats().speculation.get("draft").cloned().unwrap_or_default();
        if max_batch == 2 {
            // Five rows decode together from the start: none speculates while more than two run.
            assert!(s.drafted_tokens < 3 * 5 * N as u64, "{s:?}");
        } else {
            assert!(s.drafted_tokens > 0, "{s:?}");
        }
    }
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty,
/// drafted by a quantized copy through the engine (rows batched together,
/// each with its seed), over 1200 seeds: the 27 possible sequences occur as
/// often as the verifier's own sampler gives them (chi-square p > 0.001).
#[test]
fn sampled_speculation_in_the_engine_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let prompt = [17u32, 45, 45];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = common::spec::verifier_sequences("models/llama-f32", &prompt, &params);
    let cat = catalog(&[("spec", "llama-f32", Some("llama-q4-g64"))], 2);
    let (counts, drafted, kept) = common::spec::sample_sequences(&cat, "spec", &prompt, &params, &expected);
    common::spec::assert_follows(&counts, &expected);
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}

/// A KV budget far too small for every sequence at once, shared by the
/// verifier's and the draft model's blocks: sequences are preempted (their
/// draft KV freed with them and rebuilt when they come back) and every
/// output still equals plain decoding; when all are done no block is held.
#[test]
fn preemption_under_a_small_budget_keeps_speculative_output_exact() {
    let _g = common::mlx_lock();
    // llama-f32 and llama-q4-g64 (f32 activations): 512 bytes of KV per token each.
    let per_token = 2 * 2 * 16 * 4 * 2;
    let cat = catalog(&[("spec", "llama-f32", Some("llama-q4-g64"))], 3);
    let sched = SchedulerConfig { kv_budget: KvBudget::Bytes(per_token * 8 * 64), block_size: 8, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    let ps = common::spec::lengthened(prompts());
    const N: usize = 48;
    let mut rxs: Vec<_> = ps.iter().map(|p| submit(&w, &entry(&cat, "spec"), p, greedy(N, None))).collect();
    for (rx, p) in rxs.iter_mut().zip(&ps) {
        let (got, f) = collect(rx);
        assert_eq!(got, common::greedy_reference("llama-f32", p, N), "prompt of {}", p.len());
        assert!(f.speculation.is_some());
    }
    common::spec::wait_idle(&w);
    let s = w.stats();
    let b = &s.blocks[0].1;
    assert!(b.preemptions >= 1, "the budget never forced a preemption: {b:?}");
    assert!(s.speculation["draft"].drafted_tokens > 0, "{s:?}");
    assert_eq!(s.kv_used_bytes, 0, "blocks (verifier or draft) still held: {s:?}");
}

/// A model with recurrent-state layers speculates (its state rolled back,
/// scheduler/spec/settle.rs; more in speculative_state.rs): the same output,
/// with counts.
#[test]
fn a_recurrent_model_speculates_with_its_state_rolled_back() {
    let _g = common::mlx_lock();
    let cat = catalog(&[("plain", "qwen3_next-f32", None), ("spec", "qwen3_next-f32", Some("qwen3_next-q8-g64"))], 3);
    let w = worker(&cat, SchedulerConfig::default());
    let p = &prompts()[2];
    let (want, _) = collect(&mut submit(&w, &entry(&cat, "plain"), p, greedy(8, None)));
    let (got, f) = collect(&mut submit(&w, &entry(&cat, "spec"), p, greedy(8, None)));
    assert_eq!(got, want);
    assert!(f.speculation.is_some_and(|(d, a)| d > 0 && a <= d), "{:?}", f.speculation);
}

/// `rmlx serve --draft-model` with a draft model whose vocabulary differs
/// stops at start with one clear line naming both sizes.
#[test]
fn serve_refuses_a_draft_model_of_another_vocabulary_at_start() {
    let dir = std::env::temp_dir().join(format!("rmlx-spec-serve-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        let _ = std::fs::copy(common::fixture("models/llama-f32").join(f), dir.join(f));
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(common::fixture("models/llama-f32/config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 200.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let out = std::process::Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0", "--no-metrics-db"])
        .args(["--model", common::fixture("models/llama-f32").to_str().unwrap(), "--draft-model", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("vocabulary of 200") && err.contains("256") && !err.contains("panick"), "{err}");
}

/// Through the HTTP API: `usage` carries `drafted_tokens` and
/// `accepted_tokens` (OpenAI completions, JSON and the streamed usage chunk;
/// Anthropic messages with a real tokenizer, SmolLM2 drafting for itself),
/// a request's `num_draft_tokens: 0` turns them off with the same tokens,
/// an out-of-range value is a 400 naming the field, and /metrics counts
/// per drafter kind.
#[tokio::test]
async fn the_api_reports_draft_counts_and_takes_num_draft_tokens() {
    use serde_json::{json, Value};
    let _g = common::mlx_lock();
    let mut cat = ModelCatalog::discover(&[(Some("tiny".into()), common::fixture("models/llama-f32")), (Some("smol".into()), common::default_model())], &[]).unwrap();
    Arc::get_mut(&mut cat.entries[0]).unwrap().draft = Some(DraftSpec::new(common::fixture("models/llama-q4-g64"), Some(3), None).unwrap());
    Arc::get_mut(&mut cat.entries[1]).unwrap().draft = Some(DraftSpec::new(common::default_model(), Some(4), None).unwrap());
    let base = common::spec::serve_catalog(cat);
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: Value| common::spec::post_json(&client, &base, path, body);
    let completion = |k: Option<u32>, stream: bool| {
        let mut b = json!({"model": "tiny", "prompt": [3, 14, 15, 92, 65], "max_tokens": 16, "temperature": 0, "stream": stream, "stream_options": {"include_usage": true}});
        if let Some(k) = k {
            b["num_draft_tokens"] = k.into();
        }
        b
    };
    let (s, spec) = post("/v1/completions", completion(None, false)).await;
    assert_eq!(s, 200, "{spec}");
    let spec: Value = serde_json::from_str(&spec).unwrap();
    let (s, off) = post("/v1/completions", completion(Some(0), false)).await;
    assert_eq!(s, 200, "{off}");
    let off: Value = serde_json::from_str(&off).unwrap();
    assert_eq!(spec["choices"][0]["token_ids"], off["choices"][0]["token_ids"]);
    let u = &spec["usage"];
    let (d, a) = (u["drafted_tokens"].as_u64().unwrap(), u["accepted_tokens"].as_u64().unwrap());
    assert!(d > 0 && a <= d && u["completion_tokens"] == 16, "{u}");
    assert!(off["usage"].get("drafted_tokens").is_none() && off["usage"].get("accepted_tokens").is_none(), "{}", off["usage"]);
    // Streamed: the usage chunk carries them too.
    let (s, text) = post("/v1/completions", completion(Some(2), true)).await;
    assert_eq!(s, 200, "{text}");
    let last_usage = common::parse_sse(&text).into_iter().filter_map(|(_, d)| serde_json::from_str::<Value>(&d).ok()).filter_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned()).last().unwrap();
    assert!(last_usage["drafted_tokens"].as_u64().unwrap() >= last_usage["accepted_tokens"].as_u64().unwrap(), "{last_usage}");
    // Out of range: a 400 naming the field.
    let (s, err) = post("/v1/completions", completion(Some(33), false)).await;
    assert_eq!(s, 400, "{err}");
    assert!(err.contains("num_draft_tokens"), "{err}");
    // Anthropic messages (a real tokenizer and chat template).
    let msg = json!({"model": "smol", "max_tokens": 10, "messages": [{"role": "user", "content": "Count to five."}]});
    let (s, m) = post("/v1/messages", msg).await;
    assert_eq!(s, 200, "{m}");
    let m: Value = serde_json::from_str(&m).unwrap();
    let u = &m["usage"];
    assert_eq!(u["drafted_tokens"], u["accepted_tokens"], "a model drafting for itself keeps every draft: {u}");
    assert!(u["drafted_tokens"].as_u64().unwrap() > 0, "{u}");
    // /metrics: per drafter kind.
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| common::spec::drafter_metric(&text, name, "draft");
    let (dr, ac, rate) = (value("rmlx_spec_draft_tokens_total"), value("rmlx_spec_accepted_tokens_total"), value("rmlx_spec_acceptance_rate"));
    assert!(dr >= (d + 1) as f64 && ac <= dr && (rate - ac / dr).abs() < 1e-9, "{dr} {ac} {rate}");
}
