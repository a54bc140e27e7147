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

use rmlx::engine::worker::ModelCatalog;

const MODEL: &str = "models/deepseek_v3-mtp-f32";

/// The model twice: `plain` without a drafter, `mtp` with its own head.
fn catalog(k: usize) -> ModelCatalog {
    common::spec::mtp_catalog(MODEL, k)
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
    common::spec::assert_mtp_drafts_equal_generate(MODEL, &prompts());
}

/// Three tokens at temperature 1 with top-k 3 and a repetition penalty,
/// drafted by the head, 1200 seeds in batches of 16: the 27 possible
/// sequences occur as often as the verifier's own sampler gives them
/// (chi-square p > 0.001), none outside its support.
#[test]
fn sampled_deepseek_mtp_speculation_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    common::spec::assert_sampled_mtp_follows_the_verifier(MODEL);
}

/// Through the HTTP API: `usage` carries the counts and `num_draft_tokens: 0`
/// gives the same tokens without them.
#[tokio::test]
async fn the_api_serves_the_deepseek_mtp_head() {
    let _g = common::mlx_lock();
    let base = common::spec::serve_with_mtp("deepseek", MODEL);
    common::spec::assert_api_usage_counts_drafts(&base, "deepseek", &[3, 14, 15, 42, 5]).await;
}
