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

use common::engine::{worker, entry, submit, collect};

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::speculative::{mtp, serve::DraftSpec, stats::chi_square_p, SpecOptions};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use rmlx::engine::worker::{GenParams, ModelCatalog};
use std::sync::Arc;

/// llama-f32 twice: `plain` without a drafter, `eagle3` with the head.
fn catalog(k: usize) -> ModelCatalog {
    let dir = common::fixture("models/llama-f32");
    let mut cat = ModelCatalog::discover(&[(Some("plain".into()), dir.clone()), (Some("eagle3".into()), dir)], &[]).unwrap();
    let head = common::fixture("models/llama-eagle3-head");
    Arc::get_mut(&mut cat.entries[1]).unwrap().draft = Some(DraftSpec::new(head, Some(k), Some("eagle3")).unwrap());
    cat
}

fn greedy(max_tokens: usize, k: Option<usize>) -> GenParams {
    GenParams { max_tokens, ignore_eos: true, prefill_chunk: 16, num_draft_tokens: k, ..GenParams::default() }
}

fn prompts() -> Vec<Vec<u32>> {
    [1usize, 6, 19, 40, 3].iter().enumerate().map(|(k, &n)| (0..n).map(|i| ((i * 11 + k * 37 + 5) % 250 + 3) as u32).collect()).collect()
}

/// The prompt's conditioning (the verifier's hidden states at the head's
/// three layers) reaches the head during prefill, so the server's drafts
/// are `rmlx generate`'s (`mtp::generate` drives Eagle-3 heads): round by
/// round the same draft tokens and the same counts, prompts of 1 to 40
/// tokens prefilled in chunks of 16 on both sides.
#[test]
fn server_eagle3_drafts_with_the_prompt_context_equal_generate() {
    let _g = common::mlx_lock();
    const N: usize = 16;
    let reg = common::registry();
    let vdir = common::fixture("models/llama-f32");
    let mut target = LoadedModel::load_with(&vdir, &reg, LoadPolicy::default()).unwrap();
    let mut head = LoadedModel::load_head_from(&common::fixture("models/llama-eagle3-head"), &vdir, "eagle3", &reg, LoadPolicy::default()).unwrap();
    let cat = catalog(3);
    let w = worker(&cat, SchedulerConfig { log_drafts: true, ..SchedulerConfig::default() });
    let e = entry(&cat, "eagle3");
    let (mut seen, mut rounds) = (0, 0);
    for (n, p) in prompts().iter().enumerate() {
        let opts = SpecOptions { num_draft_tokens: 3, adaptive: true, max_tokens: N, prefill_chunk: 16 };
        let want = mtp::generate(&mut target, &mut head, p, &SamplingParams::default(), &opts, |_| true).unwrap();
        let (got, f) = collect(&mut submit(&w, &e, p, greedy(N, None)));
        assert_eq!(got, want.tokens, "prompt of {}", p.len());
        let log = common::engine::stats_after(&w, n as u64 + 1).speculation["eagle3"].draft_log.clone();
        assert_eq!(log[seen..], want.draft_log[..], "drafts, prompt of {}", p.len());
        assert_eq!(f.speculation, Some((want.drafted_tokens, want.accepted_tokens)), "prompt of {}", p.len());
        (seen, rounds) = (log.len(), rounds + want.draft_log.len());
    }
    assert!(rounds >= 20, "{rounds} draft rounds compared");
}

#[test]
fn greedy_eagle3_speculation_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    const N: usize = 16;
    let cat = catalog(3);
    let w = worker(&cat, SchedulerConfig::default());
    let (plain, eagle3) = (entry(&cat, "plain"), entry(&cat, "eagle3"));
    let want: Vec<Vec<u32>> = prompts().iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(N, None))).0).collect();
    for (p, want) in prompts().iter().zip(&want) {
        let (got, f) = collect(&mut submit(&w, &eagle3, p, greedy(N, None)));
        assert_eq!(&got, want, "prompt of {}", p.len());
        let (d, a) = f.speculation.expect("the usage reports draft counts");
        assert!(d > 0 && a <= d, "{a} of {d}");
    }
    // Five at once, two of them not drafting.
    let ks = [None, Some(0), Some(1), Some(5), Some(0)];
    let mut rxs: Vec<_> = prompts().iter().zip(ks).map(|(p, k)| submit(&w, &eagle3, p, greedy(N, k))).collect();
    for ((rx, want), k) in rxs.iter_mut().zip(&want).zip(ks) {
        let (got, f) = collect(rx);
        assert_eq!(&got, want, "batched, k {k:?}");
        match (k, f.speculation) {
            (Some(0), s) => assert!(s.is_none(), "num_draft_tokens 0 turns speculation off: {s:?}"),
            (_, Some((d, a))) => assert!(d > 0 && a <= d, "{a} of {d}"),
            (_, None) => panic!("a drafted row reports its counts"),
        }
    }
    let s = w.stats().speculation["eagle3"].clone();
    assert!(s.steps > 0 && s.drafted_tokens > 0 && s.accepted_tokens <= s.drafted_tokens, "{s:?}");
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
    let mut target = LoadedModel::load(&common::fixture("models/llama-f32"), &common::registry()).unwrap();
    let expected = common::sampling::three_token_sequences(&mut target, &prompt, &params, |_, _| {});
    assert_eq!(expected.len(), 27);
    let cat = catalog(2);
    let w = worker(&cat, SchedulerConfig { spec_max_batch: 16, ..SchedulerConfig::default() });
    let eagle3 = entry(&cat, "eagle3");
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept) = (0, 0);
    for wave in 0..1200u64 / 16 {
        let mut rxs: Vec<_> = (0..16)
            .map(|j| {
                let sampling = SamplingParams { seed: Some(wave * 16 + j), ..params.clone() };
                submit(&w, &eagle3, &prompt, GenParams { sampling, max_tokens: 3, ignore_eos: true, ..GenParams::default() })
            })
            .collect();
        for rx in rxs.iter_mut() {
            let (toks, f) = collect(rx);
            let (d, a) = f.speculation.unwrap();
            assert!(a <= d);
            (drafted, kept) = (drafted + d, kept + a);
            let i = expected.iter().position(|(s, _)| *s == toks).expect("a sequence outside the verifier's support");
            counts[i] += 1;
        }
    }
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
