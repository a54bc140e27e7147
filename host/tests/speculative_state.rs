//! The `draft` kind with a verifier that keeps recurrent state (gated
//! DeltaNet layers: the Qwen3.5 hybrid and qwen3_next, tiny fixtures of
//! vocabulary 256), in `rmlx generate`'s loop (speculative/store.rs: the
//! states before each forward kept, restored and the kept tokens fed again)
//! and in the server's batched step (scheduler/spec/settle.rs: a row keeps
//! the verify forward's state only when it keeps every position, else its
//! own and feeds its kept tokens again; a draft model with state layers
//! takes the state of the draft step its kept length ends at):
//! greedy output equals output without speculation token for token, for a
//! drafter with state that partly agrees (a quantized copy), one without
//! state (llama) and qwen3_next's pair; batched, mixed with undrafted rows;
//! sampled output follows the verifier's distribution (chi-square).
mod common;

use common::engine::{entry, submit, collect};

use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::speculative::{self, serve::DraftSpec, stats::chi_square_p, SpecOptions};
use rmlx::engine::worker::{GenParams, ModelCatalog, Worker, WorkerConfig};
use rmlx::engine::LoadedModel;
use std::sync::Arc;

/// (verifier, drafter): state + state (partly agrees), state + no state, qwen3_next's pair.
const PAIRS: [(&str, &str); 3] = [("qwen3_5-f32", "qwen3_5-q8-g64"), ("qwen3_5-f32", "llama-f32"), ("qwen3_next-f32", "qwen3_next-q8-g64")];

fn load(name: &str) -> LoadedModel {
    LoadedModel::load(&common::fixture(&format!("models/{name}")), &common::registry()).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    [1usize, 6, 19, 40, 3].iter().enumerate().map(|(k, &n)| (0..n).map(|i| ((i * 11 + k * 37 + 5) % 250 + 3) as u32).collect()).collect()
}

/// `rmlx generate`'s loop: the same tokens as plain greedy decoding, for k
/// = 1, 3 fixed and adaptive, with chunked prefills; rounds + kept = tokens.
#[test]
fn greedy_draft_speculation_over_a_recurrent_verifier_equals_plain_decoding() {
    let _g = common::mlx_lock();
    const N: usize = 20;
    for (m, d) in PAIRS {
        let (mut target, mut draft) = (load(m), load(d));
        let (mut drafted, mut kept) = (0, 0);
        for p in prompts().iter().take(4) {
            let want = common::greedy_reference(m, p, N);
            for (k, adaptive) in [(1, false), (3, false), (3, true)] {
                let opts = SpecOptions { num_draft_tokens: k, adaptive, max_tokens: N, prefill_chunk: 7 };
                let out = speculative::generate(&mut target, &mut draft, p, &SamplingParams::default(), &opts, |_| true).unwrap();
                assert_eq!(out.tokens, want, "{m} drafted by {d}, prompt of {}, k {k} adaptive {adaptive}", p.len());
                assert_eq!(out.rounds + out.accepted_tokens, N);
                drafted += out.drafted_tokens;
                kept += out.accepted_tokens;
            }
        }
        if d != "llama-f32" {
            assert!(kept > 0 && kept < drafted, "{m} drafted by {d}: {kept} of {drafted} kept (both paths of the roll-back)");
        }
    }
}

fn catalog(m: &str, d: &str, k: usize) -> ModelCatalog {
    let list = [(Some("plain".to_string()), common::fixture(&format!("models/{m}"))), (Some("spec".to_string()), common::fixture(&format!("models/{m}")))];
    let mut cat = ModelCatalog::discover(&list, &[]).unwrap();
    Arc::get_mut(&mut cat.entries[1]).unwrap().draft = Some(DraftSpec::new(common::fixture(&format!("models/{d}")), Some(k), None).unwrap());
    cat
}

fn worker(catalog: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 4096, max_loaded_models: 4, idle_timeout: None, prefill_chunk: 512 };
    Worker::start_with(cfg, sched, catalog).unwrap()
}

fn greedy(max_tokens: usize, k: Option<usize>) -> GenParams {
    GenParams { max_tokens, ignore_eos: true, prefill_chunk: 16, num_draft_tokens: k, ..GenParams::default() }
}

/// The server: each prompt alone, then all five at once with draft lengths
/// 0, default, 1, 5, 0, equal the model without a drafter; with the prefix
/// cache on (a state snapshot at each block boundary the rows land on).
#[test]
fn greedy_draft_speculation_over_a_recurrent_verifier_in_the_engine_equals_plain_decoding() {
    let _g = common::mlx_lock();
    const N: usize = 20;
    let ks = [Some(0), None, Some(1), Some(5), Some(0)];
    for (m, d) in PAIRS {
        let cat = catalog(m, d, 3);
        let w = worker(&cat, SchedulerConfig { block_size: 8, ..SchedulerConfig::default() });
        let (plain, spec) = (entry(&cat, "plain"), entry(&cat, "spec"));
        let want: Vec<Vec<u32>> = prompts().iter().map(|p| collect(&mut submit(&w, &plain, p, greedy(N, None))).0).collect();
        let (mut drafted, mut kept) = (0, 0);
        for (p, want) in prompts().iter().zip(&want) {
            let (got, f) = collect(&mut submit(&w, &spec, p, greedy(N, None)));
            assert_eq!(&got, want, "{m} drafted by {d}, prompt of {}", p.len());
            let (dr, ac) = f.speculation.expect("the usage reports draft counts");
            drafted += dr;
            kept += ac;
        }
        let mut rxs: Vec<_> = prompts().iter().zip(ks).map(|(p, k)| submit(&w, &spec, p, greedy(N, k))).collect();
        for ((rx, want), k) in rxs.iter_mut().zip(&want).zip(ks) {
            let (got, f) = collect(rx);
            assert_eq!(&got, want, "{m} drafted by {d}, batched, k {k:?}");
            assert_eq!(f.speculation.is_none(), k == Some(0));
        }
        assert!(drafted > 0);
        if d != "llama-f32" {
            assert!(kept > 0 && kept < drafted, "{m} drafted by {d}: {kept} of {drafted} kept");
        }
    }
}

/// Three tokens at temperature 1, top-k 3 and a repetition penalty through
/// the engine, the hybrid drafted by its quantized copy, 1200 seeds in
/// batches of 16: chi-square against the verifier's own distribution.
#[test]
fn sampled_draft_speculation_over_a_recurrent_verifier_follows_its_distribution() {
    let _g = common::mlx_lock();
    let (m, d) = PAIRS[0];
    let prompt = [17u32, 45, 45];
    let params = SamplingParams { temperature: 1.0, top_k: 3, repetition_penalty: 1.5, ..SamplingParams::default() };
    let expected = common::sampling::three_token_sequences(&mut load(m), &prompt, &params, |_, _| {});
    assert_eq!(expected.len(), 27);
    let cat = catalog(m, d, 2);
    let w = worker(&cat, SchedulerConfig { spec_max_batch: 16, prefix_cache: false, ..SchedulerConfig::default() });
    let spec = entry(&cat, "spec");
    let mut counts = vec![0u64; expected.len()];
    let (mut drafted, mut kept, mut other) = (0, 0, 0);
    for wave in 0..1200u64 / 16 {
        let mut rxs: Vec<_> = (0..16)
            .map(|j| {
                let sampling = SamplingParams { seed: Some(wave * 16 + j), ..params.clone() };
                submit(&w, &spec, &prompt, GenParams { sampling, max_tokens: 3, ignore_eos: true, ..GenParams::default() })
            })
            .collect();
        for rx in rxs.iter_mut() {
            let (toks, f) = collect(rx);
            let (dr, ac) = f.speculation.unwrap();
            drafted += dr;
            kept += ac;
            match expected.iter().position(|(s, _)| *s == toks) {
                Some(i) => counts[i] += 1,
                None => other += 1,
            }
        }
    }
    assert_eq!(other, 0, "sequences outside the verifier's top-k support were emitted");
    let probs: Vec<f64> = expected.iter().map(|e| e.1).collect();
    let pv = chi_square_p(&counts, &probs);
    assert!(pv > 1e-3, "chi-square p-value {pv}: counts {counts:?}, expected {probs:?}");
    assert!(kept > 0 && kept < drafted, "both acceptance and rejection ran: {kept} of {drafted} kept");
}
