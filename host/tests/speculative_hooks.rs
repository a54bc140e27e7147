//! Speculative decoding in the server's engine for requests that ask for
//! logprobs or carry a logits hook, on the tiny fixture models (vocabulary
//! 256; llama-q4-g64 drafting for llama-f32, which keeps some drafts and
//! rejects others):
//! - greedy with logprobs equals plain greedy decoding's tokens and
//!   logprobs (top alternatives included) within 1e-5, one at a time and
//!   batched with rows that do not ask for them;
//! - sampled rows' logprobs are the verifier's at their position;
//! - sampled rows with a stateful logits hook follow constrained plain
//!   sampling's distribution (chi-square over 1200 seeds), their drafts
//!   masked;
//! - a panicking hook fails its own request only.
//! The API's hooks (JSON schema, regex, Lark grammar, thinking budget) are
//! tested through HTTP in speculative_hooks_api.rs.
mod common;

use common::engine::{entry, submit};
use common::spec::{assert_logprobs_close, collect_logprobs as collect, prompts, submit_hooked, NoRepeatClass};

use rmlx::engine::sampler::{logprobs, SamplingParams, Sampler};
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::speculative::serve::DraftSpec;
use rmlx::engine::worker::{GenEvent, GenParams, LogitsHook, ModelCatalog, TokenLogprob, Worker, WorkerConfig};
use rmlx::engine::{LoadedModel, Session};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const DRAFT: &str = "llama-q4-g64";

/// `plain` (llama-f32) and `spec` (the same, drafted by llama-q4-g64).
fn catalog() -> ModelCatalog {
    common::spec::plain_and("spec", &common::fixture("models/llama-f32"), DraftSpec::new(common::fixture(&format!("models/{DRAFT}")), Some(3), None).unwrap())
}

/// A worker over `cat` with `sched`, the prefix cache off, a queue of 256.
fn worker(cat: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 256, max_loaded_models: 4, idle_timeout: None, prefill_chunk: 512 };
    Worker::start_with(cfg, SchedulerConfig { prefix_cache: false, ..sched }, cat).unwrap()
}

/// `common::spec::greedy` asking for `logprobs` alternatives.
fn greedy(max_tokens: usize, logprobs: Option<usize>, k: Option<usize>) -> GenParams {
    GenParams { logprobs, ..common::spec::greedy(max_tokens, k) }
}

/// Greedy requests with `logprobs` speculate (drafted > 0, some kept) and
/// report exactly plain decoding's tokens and logprobs, top alternatives
/// included: one at a time, and batched with rows that ask for none or do
/// not draft.
#[test]
fn greedy_logprobs_under_speculation_equal_plain_decoding() {
    let _g = common::mlx_lock();
    const N: usize = 16;
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig::default());
    let (plain, spec) = (entry(&cat, "plain"), entry(&cat, "spec"));
    let want: Vec<_> = prompts().iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(N, Some(4), None)))).collect();
    assert!(want.iter().all(|(ids, lps, _)| lps.len() == ids.len() && lps[0].top.len() == 4));
    let (mut drafted, mut kept) = (0, 0);
    for (p, (ids, lps, _)) in prompts().iter().zip(&want) {
        let (got, glps, f) = collect(&mut submit(&w, &spec, p, greedy(N, Some(4), None)));
        let ctx = format!("prompt of {}", p.len());
        assert_eq!(&got, ids, "{ctx}");
        assert_logprobs_close(&glps, lps, 1e-5, &ctx);
        let (d, a) = f.speculation.expect("a logprobs request speculates");
        assert!(d > 0 && a <= d, "{ctx}: {a} of {d}");
        drafted += d;
        kept += a;
    }
    assert!(kept > 0 && kept < drafted, "{kept} of {drafted} kept");
    // Batched: logprobs rows, a row without them, a row that does not draft.
    let asks = [Some(4), None, Some(2), Some(4), Some(1)];
    let ks = [None, None, None, Some(0), Some(5)];
    let mut rxs: Vec<_> = prompts().iter().zip(asks).zip(ks).map(|((p, lp), k)| submit(&w, &spec, p, greedy(N, lp, k))).collect();
    for (((rx, (ids, lps, _)), lp), k) in rxs.iter_mut().zip(&want).zip(asks).zip(ks) {
        let (got, glps, f) = collect(rx);
        assert_eq!(&got, ids, "batched, logprobs {lp:?}, k {k:?}");
        match lp {
            None => assert!(glps.is_empty()),
            Some(n) => {
                let cut: Vec<TokenLogprob> = lps.iter().map(|l| TokenLogprob { top: l.top[..n].to_vec(), ..l.clone() }).collect();
                assert_logprobs_close(&glps, &cut, 1e-5, &format!("batched, logprobs {n}"));
            }
        }
        assert_eq!(f.speculation.is_some(), k != Some(0));
    }
}

/// Sampled requests with logprobs (temperature 1, top-k 5, a repetition
/// penalty) speculate, and every token's logprobs are the verifier's at its
/// position: the model's own logits after the prompt and the tokens before
/// it, through the same processors, at temperature 1.
#[test]
fn sampled_logprobs_under_speculation_are_the_verifiers() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig::default());
    let spec = entry(&cat, "spec");
    let sampling = SamplingParams { temperature: 1.0, top_k: 5, repetition_penalty: 1.3, ..SamplingParams::default() };
    let mut target = LoadedModel::load(&common::fixture("models/llama-f32"), &common::registry()).unwrap();
    let (mut drafted, mut checked) = (0, 0);
    for (seed, p) in prompts().iter().enumerate().take(3) {
        let params = GenParams { sampling: SamplingParams { seed: Some(seed as u64), ..sampling.clone() }, ..greedy(12, Some(3), None) };
        let (ids, lps, f) = collect(&mut submit(&w, &spec, p, params));
        drafted += f.speculation.expect("speculated").0;
        let mut s = Session::new(&mut target);
        let mut logits = s.prefill(p).unwrap();
        let mut sampler = Sampler::with_params(sampling.clone());
        sampler.set_prompt(p);
        for (i, (&t, lp)) in ids.iter().zip(&lps).enumerate() {
            let mut l = logits.clone();
            sampler.process(&mut l);
            let want = logprobs(&l, t, Some(3));
            assert!((want.logprob - lp.logprob).abs() < 1e-4, "prompt {seed} token {i}: {} vs {}", lp.logprob, want.logprob);
            let top: Vec<u32> = lp.top.iter().map(|x| x.0).collect();
            assert_eq!(top, want.top.iter().map(|x| x.0).collect::<Vec<_>>(), "prompt {seed} token {i}");
            sampler.accept(t);
            logits = s.step(t).unwrap();
            checked += 1;
        }
    }
    assert!(drafted > 0 && checked == 36, "{drafted} drafted, {checked} checked");
}

/// Three tokens at temperature 1 with top-k 3, a repetition penalty and a
/// stateful logits hook, drafted by a quantized copy (rows batched, each
/// with its seed), over 1200 seeds: the 27 possible sequences occur as
/// often as constrained plain sampling gives them (the verifier's logits,
/// processed, masked by the hook after the tokens before, then top-k):
/// chi-square p > 0.001; the drafts were masked (a draft the hook forbids
/// would never be kept) and both acceptance and rejection ran.
#[test]
fn sampled_speculation_with_a_hook_follows_constrained_sampling() {
    let _g = common::mlx_lock();
    let prompt = [17u32, 45, 46];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let mut target = LoadedModel::load(&common::fixture("models/llama-f32"), &common::registry()).unwrap();
    let expected = common::sampling::three_token_sequences(&mut target, &prompt, &params, |generated, logits| {
        NoRepeatClass::new(*generated.last().unwrap_or(&prompt[2])).apply(logits).unwrap();
    });
    assert_eq!(expected.len(), 27);
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig { spec_max_batch: 16, ..SchedulerConfig::default() });
    let spec = entry(&cat, "spec");
    let (commits, broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept, mut other) = (0, 0, 0);
    for wave in 0..1200u64 / 16 {
        let mut rxs: Vec<_> = (0..16)
            .map(|j| {
                let sampling = SamplingParams { seed: Some(wave * 16 + j), ..params.clone() };
                let params = GenParams { sampling, max_tokens: 3, ignore_eos: true, num_draft_tokens: Some(2), ..GenParams::default() };
                let hook: Box<dyn LogitsHook> = Box::new(NoRepeatClass { last: prompt[2], commits: commits.clone(), broken: broken.clone() });
                submit_hooked(&w, &spec, &prompt, params, Some(hook))
            })
            .collect();
        for rx in rxs.iter_mut() {
            let (toks, _, f) = collect(rx);
            let (d, a) = f.speculation.expect("a hooked request speculates");
            drafted += d;
            kept += a;
            match expected.iter().position(|(s, _)| *s == toks) {
                Some(i) => counts[i] += 1,
                None => other += 1,
            }
        }
    }
    assert_eq!(other, 0, "sequences outside constrained sampling's support were emitted");
    common::spec::assert_follows(&counts, &expected);
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
    // The draft forks committed every draft (beyond each request's own three
    // commits; the verify forks commit the kept ones), and no draft broke
    // the constraint: the drafts were masked.
    assert_eq!(commits.load(Ordering::Relaxed), 1200 * 3 + drafted + kept, "{drafted} drafted, {kept} kept");
    assert_eq!(broken.load(Ordering::Relaxed), 0, "drafts the hook forbids were proposed");
}

/// A hook that panics in `apply` once it has seen `n` tokens (forks too).
#[derive(Clone)]
struct PanicsAfter {
    seen: usize,
    n: usize,
}

impl LogitsHook for PanicsAfter {
    fn apply(&mut self, _logits: &mut [f32]) -> anyhow::Result<()> {
        assert!(self.seen < self.n, "hook panicked after {} tokens", self.seen);
        Ok(())
    }
    fn commit(&mut self, _token: u32) -> anyhow::Result<()> {
        self.seen += 1;
        Ok(())
    }
    fn fork(&self) -> Option<Box<dyn LogitsHook>> {
        Some(Box::new(self.clone()))
    }
}

/// A hook that panics under speculation (in its draft fork, then in its
/// verify fork) fails its own request only, after the same 5 tokens plain
/// decoding gives; the request batched beside it equals plain decoding, and
/// the engine serves the next one.
#[test]
fn a_panicking_hook_under_speculation_fails_only_its_request() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig::default());
    let (plain, spec) = (entry(&cat, "plain"), entry(&cat, "spec"));
    let p = &prompts()[2];
    let (want, _, _) = collect(&mut submit(&w, &plain, p, greedy(24, None, None)));
    let hook: Box<dyn LogitsHook> = Box::new(PanicsAfter { seen: 0, n: 5 });
    let mut bad = submit_hooked(&w, &spec, p, greedy(24, None, None), Some(hook));
    let mut good = submit(&w, &spec, p, greedy(24, None, None));
    let mut ids = Vec::new();
    let err = loop {
        match bad.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Error(e) => break e.to_string(),
            GenEvent::Done(f) => panic!("the panicking hook's request finished: {f:?}"),
            _ => {}
        }
    };
    assert!(err.contains("hook panicked after 5 tokens"), "{err}");
    assert_eq!(ids, want[..5], "the tokens before the panic");
    assert_eq!(collect(&mut good).0, want);
    let (again, _, f) = collect(&mut submit(&w, &spec, p, greedy(24, None, None)));
    assert_eq!(again, want);
    assert!(f.speculation.is_some_and(|(d, _)| d > 0));
}
