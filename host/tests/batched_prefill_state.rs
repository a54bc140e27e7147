//! Hybrid models (gated DeltaNet layers with a recurrent state per
//! sequence: the tiny qwen3_next and qwen3_5 fixtures) in the server's
//! engine, issue 13:
//! - batched prefill (engine/scheduler/prefill.rs): prompts of different
//!   lengths that arrive together prefill in shared ragged forwards, the
//!   model masking the padding (plugins/arch-qwen3/src/hybrid_delta.rs), and
//!   answer as one at a time: the same greedy tokens as `rmlx generate` and
//!   the same logprobs as each prompt alone in the engine; rows that resume
//!   a state (later chunks, prefix-cache hits) are never padded;
//! - the live state charged to the KV budget (block_manager/state.rs): its
//!   size, its charge while sequences run (stats and /metrics), admission
//!   that waits for it and refuses a prompt that cannot fit beside it.
mod common;

use rmlx::engine::block_manager::BlockStats;
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::worker::{GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const MODELS: [&str; 2] = ["qwen3_next-f32", "qwen3_5-f32"];

fn catalog() -> ModelCatalog {
    let list: Vec<_> = MODELS.iter().map(|m| (None, common::fixture(&format!("models/{m}")))).collect();
    ModelCatalog::discover(&list, &[]).unwrap()
}

fn worker(catalog: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 };
    Worker::start_with(cfg, sched, catalog).unwrap()
}

/// A prompt of `n` token ids < 256 (the fixtures' vocabulary), `k` varies it.
fn prompt(n: usize, k: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32).collect()
}

fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize, chunk: usize) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: chunk, logprobs: Some(4), ..GenParams::default() };
    let req = GenRequest { model: entry.clone(), prompt: prompt.to_vec(), params, hook: None, cancel: Arc::new(AtomicBool::new(false)), keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

/// One stream's tokens and, per token, its logprob and its top 4 (id, logprob).
type Stream = (Vec<u32>, Vec<(f32, Vec<(u32, f32)>)>);

fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> Stream {
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, logprob, .. } => {
                ids.push(id);
                let lp = logprob.expect("logprobs were asked for");
                lps.push((lp.logprob, lp.top.iter().map(|(i, _, p)| (*i, *p)).collect()));
            }
            GenEvent::Done(_) => return (ids, lps),
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// Submits every prompt at once (they reach the idle engine together);
/// each one's stream and the (prefill forwards, chunks) run.
fn together(w: &Worker, entry: &Arc<ModelEntry>, prompts: &[Vec<u32>], max_tokens: usize, chunk: usize) -> (Vec<Stream>, u64, u64) {
    let s0 = w.stats();
    let mut rxs: Vec<_> = prompts.iter().map(|p| submit(w, entry, p, max_tokens, chunk)).collect();
    let outs = rxs.iter_mut().map(collect).collect();
    let s1 = w.stats();
    (outs, s1.prefill_forwards - s0.prefill_forwards, s1.prefill_chunks - s0.prefill_chunks)
}

/// Same tokens, same top ids, logprobs within `tol`.
fn assert_same(got: &Stream, want: &Stream, tol: f32, what: &str) {
    assert_eq!(got.0, want.0, "{what}: tokens differ");
    for (t, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
        assert!((g.0 - w.0).abs() <= tol, "{what}: token {t}'s logprob {} vs {}", g.0, w.0);
        assert_eq!(g.1.iter().map(|x| x.0).collect::<Vec<_>>(), w.1.iter().map(|x| x.0).collect::<Vec<_>>(), "{what}: token {t}'s top ids");
        for (a, b) in g.1.iter().zip(&w.1) {
            assert!((a.1 - b.1).abs() <= tol, "{what}: token {t}'s top logprob {} vs {}", a.1, b.1);
        }
    }
}

fn wait_idle(w: &Worker) {
    let t0 = Instant::now();
    loop {
        let s = w.stats();
        if s.running == 0 && s.waiting == 0 && w.open_requests().load(Ordering::SeqCst) == 0 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "engine never went idle: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The model's lane's block stats (all zero before its first request).
fn blocks(w: &Worker, model: &str) -> BlockStats {
    w.stats().blocks.iter().find(|(m, _)| m == model).map(|(_, b)| b.clone()).unwrap_or_default()
}

/// Eight prompts of 10..17 tokens (each prefills within one block of 16)
/// arriving together at an idle engine prefill in ONE forward, left-padded
/// rows whose states start fresh, and answer as one at a time: `rmlx
/// generate`'s greedy tokens, and each prompt's logprobs alone in the engine.
#[test]
fn hybrid_prompts_arriving_together_share_one_prefill_forward() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig { prefix_cache: false, ..SchedulerConfig::default() });
    let lens = [10usize, 13, 15, 17, 12, 14, 16, 11];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(k, &n)| prompt(n, k)).collect();
    let max_tokens = 8;
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        // Alone first (this also loads the model): one forward per prompt.
        let alone: Vec<Stream> = prompts.iter().map(|p| collect(&mut submit(&w, &entry, p, max_tokens, 512))).collect();
        let (outs, forwards, chunks) = together(&w, &entry, &prompts, max_tokens, 512);
        assert_eq!((forwards, chunks), (1, 8), "{model}: eight prompts arriving together: {chunks} chunks in {forwards} forwards");
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(outs[i].0, common::greedy_reference(model, p, max_tokens), "{model}: prompt {i} ({} tokens)", p.len());
            assert_same(&outs[i], &alone[i], 1e-4, &format!("{model}: prompt {i} batched vs alone"));
        }
    }
    common::stop_at_exit(w);
}

/// Prompts of 1..70 tokens, whole (a chunk ends at the last block boundary
/// it crosses, so rows of a later step resume a state) and in chunks of 8
/// (every later chunk resumes one), and with a prefix-cache hit that
/// resumes from a snapshot beside fresh prompts: every prompt answers as
/// one at a time, and forwards are shared.
#[test]
fn hybrid_rows_that_resume_a_state_batch_unpadded() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let lens = [1usize, 5, 17, 40, 3, 70, 33, 29];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(k, &n)| prompt(n, k)).collect();
    let max_tokens = 6;
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy_reference(model, p, max_tokens)).collect();
        let w = worker(&cat, SchedulerConfig { prefix_cache: false, ..SchedulerConfig::default() });
        for chunk in [512, 8] {
            let (outs, forwards, chunks) = together(&w, &entry, &prompts, max_tokens, chunk);
            for (i, p) in prompts.iter().enumerate() {
                assert_eq!(outs[i].0, want[i], "{model} chunk {chunk}: prompt {i} ({} tokens) differs from one at a time", p.len());
            }
            assert!(forwards < chunks, "{model} chunk {chunk}: {chunks} prompt chunks took {forwards} forwards");
        }
        // Four 40-token prompts: 32 tokens each (to the block boundary) in
        // one forward of fresh rows, then the 7 left of each in one forward
        // of rows that resume their states, unpadded.
        let four: Vec<Vec<u32>> = (0..4).map(|k| prompt(40, k + 20)).collect();
        let (outs, forwards, chunks) = together(&w, &entry, &four, max_tokens, 512);
        assert_eq!((forwards, chunks), (2, 8), "{model}: four 40-token prompts");
        for (i, p) in four.iter().enumerate() {
            assert_eq!(outs[i].0, common::greedy_reference(model, p, max_tokens), "{model}: 40-token prompt {i}");
        }
        common::stop_at_exit(w);

        // Prefix cache: a 40-token prompt first; then it again with a new
        // tail (a hit that resumes the snapshot at 32 tokens) beside fresh prompts.
        let w = worker(&cat, SchedulerConfig::default());
        let base = prompt(40, 9);
        collect(&mut submit(&w, &entry, &base, 2, 512));
        let mut again = base.clone();
        again.extend([7, 8, 9, 10, 11, 12]);
        let batch = vec![again.clone(), prompt(12, 1), prompt(30, 2), prompt(45, 3)];
        let hits0 = blocks(&w, model).prefix_hit_tokens;
        let (outs, _, _) = together(&w, &entry, &batch, max_tokens, 512);
        assert!(blocks(&w, model).prefix_hit_tokens - hits0 >= 32, "{model}: the repeated prompt hit the prefix cache");
        for (i, p) in batch.iter().enumerate() {
            assert_eq!(outs[i].0, common::greedy_reference(model, p, max_tokens), "{model}: prefix-cache batch, prompt {i}");
        }
        common::stop_at_exit(w);
    }
}

/// One running sequence's recurrent state (per DeltaNet layer: conv state
/// (K-1) x C and SSM state Hv x Dv x Dk, float32 here) is charged to the
/// KV budget while it runs, shown in the stats and /metrics, and given back
/// when it ends. With room for one state only, two requests run one after
/// the other (blocks alone would let both run), and a prompt whose blocks
/// fit the budget but not beside a state is refused (400).
#[test]
fn live_recurrent_state_is_charged_to_the_kv_budget() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let model = "qwen3_5-f32";
    let entry = cat.get(model).unwrap();
    // qwen3_5-f32: 3 DeltaNet layers of 4 key and 4 value heads of 16, kernel 4.
    let (hk, hv, dk, dv, k, layers) = (4u64, 4, 16, 16, 4, 3);
    let c = 2 * hk * dk + hv * dv;
    let state = layers * ((k - 1) * c + hv * dv * dk) * 4;
    assert_eq!(state, 19200);

    let app = Arc::new(rmlx::api::AppState {
        catalog: Arc::new(catalog()),
        worker: worker(&cat, SchedulerConfig { prefix_cache: false, ..SchedulerConfig::default() }),
        opts: Default::default(),
    });
    let w = &app.worker;
    let mut rx = submit(w, &entry, &prompt(10, 0), 400, 512);
    // Running: its state is charged (the stats of a later step show it).
    let t0 = Instant::now();
    while blocks(w, model).live_state_bytes != state {
        assert!(t0.elapsed() < Duration::from_secs(30), "the running sequence's state was never charged: {:?}", blocks(w, model));
        std::thread::sleep(Duration::from_millis(2));
    }
    let b = blocks(w, model);
    assert_eq!(b.state_bytes, state, "the probe measures the state a forward sets");
    let text = rmlx::api::metrics::render(&app).unwrap();
    assert!(text.lines().any(|l| l == format!("rmlx_kv_state_bytes{{model=\"{model}\"}} {state}")), "{text}");
    assert!(w.stats().kv_used_bytes >= state);
    collect(&mut rx);
    wait_idle(w);
    assert_eq!(blocks(w, model).live_state_bytes, 0);
    assert_eq!(w.stats().kv_used_bytes, 0, "blocks and state all given back");
    let block_bytes = blocks(w, model).block_bytes;

    // Room for one state (and blocks for several sequences): one at a time.
    let budget = 2 * state - 1;
    assert!(4 * block_bytes < budget - state);
    let w = worker(&cat, SchedulerConfig { prefix_cache: false, kv_budget: KvBudget::Bytes(budget), ..SchedulerConfig::default() });
    let prompts = [prompt(10, 1), prompt(11, 2)];
    let (outs, _, _) = together(&w, &entry, &prompts, 5, 512);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(outs[i].0, common::greedy_reference(model, p, 5), "prompt {i}");
    }
    assert_eq!(w.stats().max_running, 1, "two states do not fit: the second waited");
    // Blocks that fit the budget alone but not beside a state: refused.
    let long = prompt(100, 3);
    let need = (long.len() as u64 + 1).div_ceil(16) * block_bytes;
    assert!(need < budget && need + state > budget);
    let mut rx = submit(&w, &entry, &long, 2, 512);
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Error(e) => {
                assert!(e.to_string().contains("recurrent state"), "{e}");
                break;
            }
            GenEvent::Done(_) => panic!("a prompt that cannot fit beside its state ran"),
            _ => {}
        }
    }
    common::stop_at_exit(w);
    common::stop_at_exit(app.worker.clone());
}
