//! The Eagle-3 head in the server's batched speculative step (`rmlx serve
//! --draft-kind eagle3 --draft-model HEAD`; engine/speculative/serve.rs
//! `attach` loads it with `LoadedModel::load_head_from`, and the drafter-head
//! step of engine/scheduler/spec.rs drives it as it drives an MTP head) on
//! the tiny llama-f32 verifier with its tiny random Eagle-3 head
//! (tests/fixtures/models/llama-eagle3-head, tests/goldens/eagle3_golden.py):
//! greedy output with the head equals output without, one stream and five
//! at once, rows with and without drafting mixed; the usage and the engine's
//! per-kind counts report `eagle3`; sampled output follows the verifier's
//! distribution (chi-square).
mod common;

use common::spec::prompts;

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::speculative::{mtp, serve::DraftSpec, stats::chi_square_p};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use rmlx::engine::worker::ModelCatalog;

/// llama-f32 twice: `plain` without a drafter, `eagle3` with the head.
fn catalog(k: usize) -> ModelCatalog {
    let head = common::fixture("models/llama-eagle3-head");
    common::spec::plain_and("eagle3", &common::fixture("models/llama-f32"), DraftSpec::new(head, Some(k), Some("eagle3")).unwrap())
}

/// The prompt's conditioning (the verifier's hidden states at the head's
/// three layers) reaches the head during prefill, so the server's drafts
/// are `rmlx generate`'s (`mtp::generate` drives Eagle-3 heads): round by
/// round the same draft tokens and the same counts, prompts of 1 to 40
/// tokens prefilled in chunks of 16 on both sides.
#[test]
fn server_eagle3_drafts_with_the_prompt_context_equal_generate() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let vdir = common::fixture("models/llama-f32");
    let mut target = LoadedModel::load_with(&vdir, &reg, LoadPolicy::default()).unwrap();
    let mut head = LoadedModel::load_head_from(&common::fixture("models/llama-eagle3-head"), &vdir, "eagle3", &reg, LoadPolicy::default()).unwrap();
    common::spec::assert_drafts_equal_generate(&catalog(3), "eagle3", &prompts(), 16, |p, opts| {
        mtp::generate(&mut target, &mut head, p, &SamplingParams::default(), opts, |_| true).unwrap()
    });
}

/// Greedy output with the head equals the model's own, one stream at a
/// time and five at once, two of them not drafting.
#[test]
fn greedy_eagle3_speculation_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    common::spec::assert_greedy_equals_plain(&catalog(3), "eagle3", &prompts(), 16, &[None, Some(0), Some(1), Some(5), Some(0)]);
}

/// Three tokens at temperature 1 with top-k 3, a repetition penalty and a
/// logit bias of +20 on three tokens of the head's draft vocabulary (so the
/// head's top-3 are the verifier's, with other weights), 1200 seeds in
/// batches of 16: the 27 sequences occur as often as the verifier's own
/// sampler gives them (chi-square over the cells expected 5 times or more,
/// the rest pooled; p > 0.001); drafts both kept and rejected.
#[test]
fn sampled_eagle3_speculation_in_the_engine_follows_the_verifiers_distribution() {
    let _g = common::mlx_lock();
    let prompt = [17u32, 45, 45];
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(common::fixture("goldens/eagle3/golden.json")).unwrap()).unwrap();
    let hot = |i: usize| golden["hot"][i].as_u64().unwrap() as u32;
    let bias = vec![(hot(10), 20.0), (hot(60), 20.0), (hot(120), 20.0)];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, logit_bias: bias, ..SamplingParams::default() };
    let expected = common::spec::verifier_sequences("models/llama-f32", &prompt, &params);
    let (counts, drafted, kept) = common::spec::sample_sequences(&catalog(2), "eagle3", &prompt, &params, &expected);
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
    eprintln!("eagle3 in the engine, sampled: p-value {pv}, {kept} of {drafted} drafts kept, pooled counts {pc:?}");
    assert!(pv > 1e-3, "chi-square p-value {pv}: pooled counts {pc:?}, expected {pp:?}");
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}

/// `rmlx serve --draft-kind eagle3` stops at start with one line when the
/// head's directory is missing (the model's own would be taken) or holds no
/// Eagle-3 head a plugin builds.
#[test]
fn serve_refuses_an_eagle3_kind_without_its_head_at_start() {
    let model = common::fixture("models/llama-f32");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg(common::rmlx_bin())
            .args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0", "--model", model.to_str().unwrap(), "--draft-kind", "eagle3"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success() && out.status.code() != Some(124), "it started: {out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&[]);
    assert!(err.contains("--draft-kind eagle3 for `llama-f32` needs --draft-model DIR") && !err.contains("panick"), "{err}");
    let q = common::fixture("models/qwen3-f32");
    let err = run(&["--draft-model", q.to_str().unwrap()]);
    assert!(err.contains("no architecture plugin builds a `eagle3` drafter head for model_type `qwen3`") && !err.contains("panick"), "{err}");
}
