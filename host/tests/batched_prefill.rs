//! Batched prefill with ragged rows (issue 16, engine/scheduler/prefill.rs):
//! prompts of different lengths that arrive together prefill in shared
//! forwards and answer token for token as one at a time, on full-attention,
//! windowed (gemma3_text, gpt_oss with sinks) and shared-KV (gemma4_text)
//! tiny models; the forwards are counted in the engine's stats and in
//! /metrics.
mod common;

use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

const MODELS: [&str; 5] = ["llama-f32", "qwen3-f32", "gemma3_text-f32", "gpt_oss-f32", "gemma4_text-f32"];

fn catalog() -> ModelCatalog {
    let list: Vec<_> = MODELS.iter().map(|m| (None, common::fixture(&format!("models/{m}")))).collect();
    ModelCatalog::discover(&list, &[]).unwrap()
}

fn worker(catalog: &ModelCatalog) -> Worker {
    worker_with(catalog, SchedulerConfig::default())
}

fn worker_with(catalog: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 };
    // No prefix cache: every prompt is prefilled whole.
    Worker::start_with(cfg, SchedulerConfig { prefix_cache: false, ..sched }, catalog).unwrap()
}

/// A prompt of `n` token ids < 256 (the fixtures' vocabulary), `k` varies it.
fn prompt(n: usize, k: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32).collect()
}

fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize, chunk: usize) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: chunk, ..GenParams::default() };
    let req = GenRequest { model: entry.clone(), prompt: prompt.to_vec(), params, hook: None, cancel: Arc::new(AtomicBool::new(false)), keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> Vec<u32> {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(_) => return ids,
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// Submits every prompt at once (they reach the idle engine together),
/// returns each one's greedy tokens and the (prefill forwards, chunks) run.
fn together(w: &Worker, entry: &Arc<ModelEntry>, prompts: &[Vec<u32>], max_tokens: usize, chunk: usize) -> (Vec<Vec<u32>>, u64, u64) {
    let s0 = w.stats();
    let mut rxs: Vec<_> = prompts.iter().map(|p| submit(w, entry, p, max_tokens, chunk)).collect();
    let outs = rxs.iter_mut().map(collect).collect();
    let s1 = w.stats();
    (outs, s1.prefill_forwards - s0.prefill_forwards, s1.prefill_chunks - s0.prefill_chunks)
}

/// Prompts of 1..70 tokens arriving together (whole prompts in one chunk,
/// then chunks of 8 so later chunks are ragged over cached context) answer
/// exactly as `rmlx generate` one at a time, and share prefill forwards.
#[test]
fn ragged_prefill_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat);
    let max_tokens = 12;
    let lens = [1usize, 5, 17, 40, 3, 70, 33, 29];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(k, &n)| prompt(n, k)).collect();
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy_reference(model, p, max_tokens)).collect();
        for chunk in [512, 8] {
            let (outs, forwards, chunks) = together(&w, &entry, &prompts, max_tokens, chunk);
            for (i, p) in prompts.iter().enumerate() {
                assert_eq!(outs[i], want[i], "{model} chunk {chunk}: prompt {i} ({} tokens) differs from one at a time", p.len());
            }
            assert!(forwards < chunks, "{model} chunk {chunk}: {chunks} prompt chunks took {forwards} forwards");
        }
    }
    common::stop_at_exit(w);
}

/// While a stream decodes, a step budget of many chunks (the GPU default of
/// `prefill_step_tokens`) lets the other prompts' chunks prefill together
/// instead of one chunk a step (the CPU default): the one-token prompt
/// decodes from the first step, and the seven others, in chunks of 8, take
/// fewer forwards under the larger budget and answer the same.
#[test]
fn step_budget_prefills_prompts_together_while_a_stream_decodes() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let entry = cat.get("llama-f32").unwrap();
    let lens = [1usize, 5, 17, 40, 3, 70, 33, 29];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(k, &n)| prompt(n, k)).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| common::greedy_reference("llama-f32", p, 12)).collect();
    let mut forwards = Vec::new();
    for step_tokens in [0, 4096] {
        let w = worker_with(&cat, SchedulerConfig { prefill_step_tokens: step_tokens, ..SchedulerConfig::default() });
        let (outs, f, chunks) = together(&w, &entry, &prompts, 12, 8);
        assert_eq!(outs, want, "step budget {step_tokens}: differs from one at a time");
        forwards.push((f, chunks));
        common::stop_at_exit(w);
    }
    let ((one, _), (many, chunks)) = (forwards[0], forwards[1]);
    assert!(many < one, "{chunks} chunks: {many} forwards with a budget of 4096 tokens a step, {one} with one chunk a step");
}

/// Eight prompts of similar length arriving together at an idle engine
/// prefill in ONE forward (counted in the stats and in /metrics'
/// rmlx_prefill_forwards_total), and answer as one at a time.
#[test]
fn prompts_arriving_together_share_one_prefill_forward() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat);
    let entry = cat.get("qwen3-f32").unwrap();
    // Load the model first, so the eight reach an idle, loaded engine.
    collect(&mut submit(&w, &entry, &[5, 6, 7], 2, 512));
    let lens = [21usize, 18, 17, 16, 19, 20, 15, 18];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(k, &n)| prompt(n, k)).collect();
    let (outs, forwards, chunks) = together(&w, &entry, &prompts, 8, 512);
    assert_eq!((forwards, chunks), (1, 8), "eight prompts arriving together: {chunks} chunks in {forwards} forwards");
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(outs[i], common::greedy_reference("qwen3-f32", p, 8), "prompt {i}");
    }
    // /metrics shows the engine's counters.
    let stats = w.stats();
    let state = Arc::new(rmlx::api::AppState { catalog: Arc::new(cat), worker: w, opts: Default::default() });
    let base = common::serve(state);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let text = rt.block_on(async { reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap() });
    let value = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(value("rmlx_prefill_forwards_total"), stats.prefill_forwards);
    assert_eq!(value("rmlx_prefill_chunks_total"), stats.prefill_chunks);
    assert_eq!(stats.prefill_chunks - stats.prefill_forwards, 7, "{stats:?}");
}
