//! The DeepSeek-V3 MTP head (plugins/arch-deepseek deepseek_v3_mtp.rs) in
//! the server's batched speculative step (`rmlx serve --draft-kind mtp`),
//! on the tiny deepseek_v3 with its random module
//! (tests/fixtures/models/deepseek_v3-mtp-f32; verifier and head cache MLA
//! latents in the paged pool: one KV head of 20 per layer): greedy output
//! with the head equals output without, one stream and several at once;
//! the server's drafts are `rmlx generate`'s; sampled output follows the
//! verifier's distribution (chi-square); the HTTP API reports the `mtp`
//! drafter's counts.
mod common;

use common::spec::prompts_in;

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::speculative::{mtp, serve::DraftSpec};
use rmlx::engine::worker::ModelCatalog;
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use std::sync::Arc;

const MODEL: &str = "models/deepseek_v3-mtp-f32";

/// The model twice: `plain` without a drafter, `mtp` with its own head.
fn catalog(k: usize) -> ModelCatalog {
    let dir = common::fixture(MODEL);
    common::spec::plain_and("mtp", &dir, DraftSpec::new(dir.clone(), Some(k), Some("mtp")).unwrap())
}

/// Prompts of 1 to 40 ids below the tiny model's vocabulary of 64.
fn prompts() -> Vec<Vec<u32>> {
    prompts_in(58)
}

#[test]
fn greedy_deepseek_mtp_speculation_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    common::spec::assert_greedy_equals_plain(&catalog(3), "mtp", &prompts(), 16, &[None; 5]);
}

/// Round by round the server drafts what `mtp::generate` drafts, for
/// prompts prefilled in chunks of 16.
#[test]
fn server_deepseek_mtp_drafts_equal_generate() {
    let _g = common::mlx_lock();
    let dir = common::fixture(MODEL);
    let reg = common::registry();
    let mut target = LoadedModel::load_with(&dir, &reg, LoadPolicy::default()).unwrap();
    let mut head = LoadedModel::load_head(&dir, "mtp", &reg, LoadPolicy::default()).unwrap();
    common::spec::assert_drafts_equal_generate(&catalog(3), "mtp", &prompts(), 16, |p, opts| {
        mtp::generate(&mut target, &mut head, p, &SamplingParams::default(), opts, |_| true).unwrap()
    });
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty,
/// drafted by the head, 1200 seeds in batches of 16: the 27 possible
/// sequences occur as often as the verifier's own sampler gives them
/// (chi-square p > 0.001), none outside its support.
#[test]
fn sampled_deepseek_mtp_speculation_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let prompt = [17u32, 45, 45];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = common::spec::verifier_sequences(MODEL, &prompt, &params);
    let (counts, drafted, _) = common::spec::sample_sequences(&catalog(2), "mtp", &prompt, &params, &expected);
    common::spec::assert_follows(&counts, &expected);
    assert!(drafted > 0);
}

/// Through the HTTP API: `usage` carries the counts and `num_draft_tokens: 0`
/// gives the same tokens without them.
#[tokio::test]
async fn the_api_serves_the_deepseek_mtp_head() {
    use serde_json::{json, Value};
    let _g = common::mlx_lock();
    let dir = common::fixture(MODEL);
    let mut cat = ModelCatalog::discover(&[(Some("deepseek".into()), dir.clone())], &[]).unwrap();
    Arc::get_mut(&mut cat.entries[0]).unwrap().draft = Some(DraftSpec::new(dir, Some(3), Some("mtp")).unwrap());
    let base = common::spec::serve_catalog(cat);
    let client = reqwest::Client::new();
    let post = |k: Option<u32>| {
        let mut b = json!({"model": "deepseek", "prompt": [3, 14, 15, 42, 5], "max_tokens": 12, "temperature": 0});
        if let Some(k) = k {
            b["num_draft_tokens"] = k.into();
        }
        let r = client.post(format!("{base}/v1/completions")).json(&b).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let (spec, off) = (post(None).await, post(Some(0)).await);
    assert_eq!(spec["choices"][0]["token_ids"], off["choices"][0]["token_ids"]);
    let u = &spec["usage"];
    let (d, a) = (u["drafted_tokens"].as_u64().unwrap(), u["accepted_tokens"].as_u64().unwrap());
    assert!(d > 0 && a <= d && u["completion_tokens"] == 12, "{u}");
    assert!(off["usage"].get("drafted_tokens").is_none(), "{}", off["usage"]);
}
