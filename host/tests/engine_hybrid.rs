//! The server's engine on hybrid models (gated DeltaNet layers with a
//! recurrent state beside full-attention layers: the tiny qwen3_next,
//! qwen3_5 and qwen3_5_moe fixtures tests/arch_qwen3_next.rs checks against
//! mlx-lm). Each
//! sequence keeps its state beside its KV blocks (host/src/engine/recurrent.rs):
//! continuous batching with sequences joining and leaving, chunked prefill,
//! prefix-cache hits that resume from a state snapshot, and preemption all
//! give the one-sequence greedy output of `rmlx generate`, token for token.
mod common;

use rmlx::engine::block_manager::BlockStats;
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::worker::{FinishReason, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const MODELS: [&str; 3] = ["qwen3_next-f32", "qwen3_5-f32", "qwen3_5_moe-f32"];

fn catalog() -> ModelCatalog {
    let list: Vec<_> = MODELS.iter().map(|m| (None, common::fixture(&format!("models/{m}")))).collect();
    ModelCatalog::discover(&list, &[]).unwrap()
}

fn worker(catalog: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    let cfg = WorkerConfig {
        plugins_dir: common::plugins_dir(),
        max_queue_depth: 64,
        max_loaded_models: 2,
        idle_timeout: None,
        prefill_chunk: 512,
    };
    Worker::start_with(cfg, sched, catalog).unwrap()
}

/// A prompt of `n` token ids (< 256, the fixtures' vocabulary), varied by `k`.
fn prompt(n: usize, k: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32).collect()
}

fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize, chunk: usize) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: chunk, ..GenParams::default() };
    let cancel = Arc::new(AtomicBool::new(false));
    let req = GenRequest { model: entry.clone(), prompt: prompt.to_vec(), params, hook: None, cancel, keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

/// The next token of a stream (None at its end).
fn next_token(rx: &mut mpsc::UnboundedReceiver<GenEvent>, ids: &mut Vec<u32>) -> Option<u32> {
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => {
                ids.push(id);
                return Some(id);
            }
            GenEvent::Done(f) => {
                assert_eq!(f.reason, FinishReason::Length);
                return None;
            }
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// Reads a stream to its end (after the tokens already in `ids`).
fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>, mut ids: Vec<u32>) -> Vec<u32> {
    while next_token(rx, &mut ids).is_some() {}
    ids
}

/// One sequence at a time through `rmlx generate`'s loop (its contiguous
/// cache keeps the state; prefilled in one piece).
fn reference(model: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    common::greedy_reference(model, prompt, max_tokens)
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

/// Several requests of different lengths, some joining while others decode
/// and leaving at different steps (different max tokens): every one equals
/// the one-at-a-time greedy output. No prefix cache, so every state here is
/// built by batched forwards.
#[test]
fn hybrid_batched_serving_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let sched = SchedulerConfig { prefix_cache: false, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        // (prompt length, max tokens): a one-token prompt (its state starts
        // in a decode step beside rows that have one), short and long ones.
        let reqs: Vec<(Vec<u32>, usize)> =
            [(1, 10), (5, 6), (17, 12), (40, 9), (3, 14), (70, 8)].iter().enumerate().map(|(k, &(n, m))| (prompt(n, k), m)).collect();
        // Two at once; the third joins once the first streams, the others
        // once the third does.
        let mut rx: Vec<_> = reqs[..2].iter().map(|(p, m)| submit(&w, &entry, p, *m, 512)).collect();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        next_token(&mut rx[0], &mut got[0]).unwrap();
        next_token(&mut rx[0], &mut got[0]).unwrap();
        rx.push(submit(&w, &entry, &reqs[2].0, reqs[2].1, 512));
        next_token(&mut rx[2], &mut got[2]).unwrap();
        for (p, m) in &reqs[3..] {
            rx.push(submit(&w, &entry, p, *m, 512));
        }
        for (i, r) in rx.iter_mut().enumerate() {
            got[i] = collect(r, std::mem::take(&mut got[i]));
        }
        for (i, (p, m)) in reqs.iter().enumerate() {
            assert_eq!(got[i], reference(model, p, *m), "{model}: request {i} ({} prompt tokens)", p.len());
        }
        wait_idle(&w);
    }
    let s = w.stats();
    assert!(s.max_batch >= 3, "requests never decoded together: {s:?}");
}

/// A prompt prefilled in chunks of 4, 7 and 16 tokens (the state carried
/// from chunk to chunk) gives what one chunk gives, and the reference.
#[test]
fn hybrid_chunked_prefill_equals_one_chunk() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let sched = SchedulerConfig { prefix_cache: false, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        let p = prompt(61, 3);
        let want = reference(model, &p, 8);
        let one = collect(&mut submit(&w, &entry, &p, 8, 512), Vec::new());
        assert_eq!(one, want, "{model}: one chunk");
        // Chunked prompts prefill side by side (each its own state).
        let mut rx: Vec<_> = [4, 7, 16].iter().map(|&c| submit(&w, &entry, &p, 8, c)).collect();
        for (r, c) in rx.iter_mut().zip([4, 7, 16]) {
            assert_eq!(collect(r, Vec::new()), want, "{model}: chunks of {c}");
        }
        wait_idle(&w);
    }
}

/// A multi-turn chat (each turn's prompt: the previous prompt, its reply and
/// a new message): every turn restores the state snapshot of the deepest
/// cached block boundary and prefills only the rest, and answers what a cold
/// run answers. Prints the prefill tokens the snapshots saved.
#[test]
fn hybrid_prefix_hit_equals_miss_and_skips_prefill() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig::default());
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        let mut conv = prompt(40, 1);
        let (mut prompt_tokens, before) = (0, blocks(&w, model).prefix_hit_tokens);
        for turn in 0..4 {
            let hit0 = blocks(&w, model).prefix_hit_tokens;
            let out = collect(&mut submit(&w, &entry, &conv, 10, 512), Vec::new());
            assert_eq!(out, reference(model, &conv, 10), "{model}: turn {turn} ({} prompt tokens)", conv.len());
            let hit = blocks(&w, model).prefix_hit_tokens - hit0;
            prompt_tokens += conv.len();
            if turn > 0 {
                // The previous turn's prompt and reply but its last token
                // (never fed): conv less that token and the 8 new ones, in
                // whole blocks of 16 (a snapshot is kept at the last one).
                let cached = (conv.len() - 9) / 16 * 16;
                assert_eq!(hit as usize, cached, "{model}: turn {turn} resumed after {hit} tokens");
            }
            conv.extend(&out);
            conv.extend(prompt(8, 10 + turn));
        }
        let skipped = blocks(&w, model).prefix_hit_tokens - before;
        println!(
            "{model}: multi-turn chat, 4 turns: {prompt_tokens} prompt tokens, {skipped} restored from state snapshots \
             (prefill skipped), {} prefilled ({:.0}% saved)",
            prompt_tokens as u64 - skipped,
            100.0 * skipped as f64 / prompt_tokens as f64
        );
        assert!(skipped >= 3 * 48, "{model}: {skipped}");
        // The same prompt again: everything but its last block's tail comes
        // from the cache, and the answer is the same.
        let p = prompt(50, 4);
        let a = collect(&mut submit(&w, &entry, &p, 6, 512), Vec::new());
        let hit0 = blocks(&w, model).prefix_hit_tokens;
        let b = collect(&mut submit(&w, &entry, &p, 6, 512), Vec::new());
        assert_eq!(blocks(&w, model).prefix_hit_tokens - hit0, 48);
        assert_eq!((a.clone(), b), (reference(model, &p, 6), a));
        wait_idle(&w);
    }
}

/// A KV budget far too small for the requests at once: sequences are
/// preempted (their state dropped with their blocks) and prefilled again
/// later, from a snapshot or from zeros; every output is still the
/// reference. With an SSD tier: evicted blocks go to disk with their state
/// snapshots (tests/engine_hybrid_ssd.rs checks hits from there).
#[test]
fn hybrid_preemption_rebuilds_state() {
    let _g = common::mlx_lock();
    let cat = catalog();
    // qwen3_next-f32: 2 attention layers x 2 KV heads x hd 16 x f32 x (K and
    // V) = 512 bytes per token; 40 blocks of 8 = 320 tokens, less the state
    // snapshots (11 KB each) the prefix cache keeps: far less than 6
    // requests of ~95 tokens at once.
    let ssd = tempfile::tempdir().unwrap();
    let sched = SchedulerConfig {
        kv_budget: KvBudget::Bytes(512 * 8 * 40),
        block_size: 8,
        ssd: Some(rmlx::engine::ssd::SsdConfig::new(ssd.path(), 0.01).unwrap()),
        ..SchedulerConfig::default()
    };
    let w = worker(&cat, sched);
    let model = "qwen3_next-f32";
    let entry = cat.get(model).unwrap();
    let ps: Vec<Vec<u32>> = (0..6).map(|k| prompt(35 + 9 * k, k)).collect();
    let mut rx: Vec<_> = ps.iter().map(|p| submit(&w, &entry, p, 40, 16)).collect();
    let outs: Vec<Vec<u32>> = rx.iter_mut().map(|r| collect(r, Vec::new())).collect();
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(outs[i], reference(model, p, 40), "prompt {i}");
    }
    wait_idle(&w);
    let b = blocks(&w, model);
    println!(
        "{model} under a small budget: {} preemptions, {} prefix hits ({} tokens resumed from snapshots), {} evictions",
        b.preemptions, b.prefix_hits, b.prefix_hit_tokens, b.evictions
    );
    assert!(b.preemptions >= 1, "the budget never forced a preemption: {b:?}");
    assert!(b.ssd_state_writes <= b.ssd_writes, "a snapshot went to disk without its block: {b:?}");
    assert_eq!(b.seq_blocks, 0, "{b:?}");
    w.shutdown();
}

/// Two sequences that do not fit together: the newer one met at a block it
/// cannot have is preempted, its blocks and state snapshot go to the prefix
/// cache, and when it comes back it resumes from the snapshot (a prefix hit
/// on its own blocks), not from zeros: its output is still the reference.
#[test]
fn hybrid_preempted_sequence_resumes_from_its_snapshot() {
    let _g = common::mlx_lock();
    let cat = catalog();
    // 24 blocks of 8 tokens (4096 bytes each), and two recurrent states
    // (11264 bytes each: the running sequences' live states, or one live
    // state and the preempted sequence's snapshot, all charged to the budget).
    let sched = SchedulerConfig { kv_budget: KvBudget::Bytes(512 * 8 * 24 + 2 * 11264), block_size: 8, ..SchedulerConfig::default() };
    let w = worker(&cat, sched);
    let model = "qwen3_next-f32";
    let entry = cat.get(model).unwrap();
    let ps: Vec<Vec<u32>> = (0..2).map(|k| prompt(30, k + 7)).collect();
    let mut rx: Vec<_> = ps.iter().map(|p| submit(&w, &entry, p, 70, 512)).collect();
    let outs: Vec<Vec<u32>> = rx.iter_mut().map(|r| collect(r, Vec::new())).collect();
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(outs[i], reference(model, p, 70), "prompt {i}");
    }
    wait_idle(&w);
    let b = blocks(&w, model);
    println!(
        "{model}, two sequences in 24 blocks: {} preemptions, {} prefix hits ({} tokens resumed from snapshots)",
        b.preemptions, b.prefix_hits, b.prefix_hit_tokens
    );
    assert!(b.preemptions >= 1, "{b:?}");
    assert!(b.prefix_hits >= 1 && b.prefix_hit_tokens >= 8, "the preempted sequence did not resume from a snapshot: {b:?}");
}

/// The one-sequence paged pool (`rmlx generate` with a KV family other than
/// the dense default, `rmlx eval ppl`) keeps the state too: a prompt fed in
/// chunks of 10, then greedy steps, gives the reference.
#[test]
fn hybrid_one_sequence_pool_keeps_state() {
    use mlx_rs::{ops::indexing::argmax_axis, Array};
    use rmlx::engine::{seq_pool::SeqPool, LoadedModel};
    let _g = common::mlx_lock();
    let reg = common::registry();
    for model in MODELS {
        let mut m = LoadedModel::load(&common::fixture(&format!("models/{model}")), &reg).unwrap();
        let p = prompt(37, 2);
        let mut pool = SeqPool::new(&m);
        let mut logits = None;
        for c in p.chunks(10) {
            let ids: Vec<i32> = c.iter().map(|&t| t as i32).collect();
            logits = Some(pool.forward(&mut m, Array::from_slice(&ids, &[1, ids.len() as i32]), true).unwrap());
        }
        let mut got = Vec::new();
        for _ in 0..8 {
            let t = argmax_axis(logits.as_ref().unwrap(), -1, None).unwrap().item_exact::<u32>();
            got.push(t);
            logits = Some(pool.forward(&mut m, Array::from_slice(&[t as i32], &[1, 1]), true).unwrap());
        }
        assert_eq!(got, reference(model, &p, 8), "{model}");
    }
}
