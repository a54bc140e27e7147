//! Sliding-window layers keep only their window in the server's paged pool
//! (host/src/engine/kv_groups.rs, docs/KV_CACHE.md): gemma3_text-f32 (three
//! window layers of 8 positions, one full layer) through the engine, with
//! blocks of 4 tokens, answers token for token as `rmlx generate` (whose
//! one-sequence pool keeps every layer's every block) over prompts and
//! generations that cross the window many times: one at a time, batched,
//! preempted, and from the prefix cache, a hit whose window blocks were
//! evicted cut to where they are. The window blocks sequences hold stay
//! bounded while their full blocks grow with the context.
mod common;

use rmlx::engine::block_manager::BlockStats;
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::worker::{FinishReason, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

const MODEL: &str = "gemma3_text-f32";
/// Bytes of one block of 4 tokens: the full layer's (2 K/V heads of 16,
/// keys and values, float32), and the three window layers'.
const FULL: u64 = 2 * 16 * 2 * 4 * 4;
const WIN: u64 = 3 * FULL;

fn worker(cat: &ModelCatalog, budget: u64) -> Worker {
    let sched = SchedulerConfig { kv_budget: KvBudget::Bytes(budget), block_size: 4, ..SchedulerConfig::default() };
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 };
    Worker::start_with(cfg, sched, cat).unwrap()
}

fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize, chunk: usize) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: chunk, ..GenParams::default() };
    let req = GenRequest { model: entry.clone(), prompt: prompt.to_vec(), params, hook: None, cancel: Arc::new(AtomicBool::new(false)), keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

fn stats(w: &Worker) -> BlockStats {
    lane_stats(w).expect("the model's lane")
}

/// The lane's stats as last published: none before the lane's first step
/// ends (a first token is sent within its step, before the step's stats).
fn lane_stats(w: &Worker) -> Option<BlockStats> {
    w.stats().blocks.iter().find(|(id, _)| id == MODEL).map(|(_, s)| s.clone())
}

/// The tokens of a stream; `each` sees the lane's stats at every token.
fn collect(w: &Worker, rx: &mut mpsc::UnboundedReceiver<GenEvent>, mut each: impl FnMut(&BlockStats)) -> Vec<u32> {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => {
                ids.push(id);
                if let Some(s) = lane_stats(w) {
                    each(&s);
                }
            }
            GenEvent::Done(f) => {
                assert_eq!(f.reason, FinishReason::Length);
                return ids;
            }
            GenEvent::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
}

fn prompt(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 13 + seed * 41 + 7) % 250 + 3) as u32).collect()
}

/// One at a time and three at once (prefilled in chunks of 8 and 5, so a
/// chunk's window reaches into earlier blocks), each over 40-90 tokens of
/// context: equal to `rmlx generate`. A long one holds at most its window's
/// blocks in the window group while its full blocks grow.
#[test]
fn windowed_layers_hold_their_window_and_answer_the_same() {
    let _g = common::mlx_lock();
    let cat = ModelCatalog::discover(&[(None, common::fixture(&format!("models/{MODEL}")))], &[]).unwrap();
    let w = worker(&cat, 1 << 24);
    let entry = cat.get(MODEL).unwrap();
    let s = stats_after_warmup(&w, &entry);
    assert_eq!((s.block_bytes, s.window_block_bytes), (FULL + WIN, WIN), "{s:?}");
    // A long stream: 160 prompt tokens in chunks of 16, 48 generated.
    let long = prompt(160, 9);
    let (mut most_held, mut most_seq) = (0, 0);
    let got = collect(&w, &mut submit(&w, &entry, &long, 48, 16), |s| {
        most_held = most_held.max(s.window_held);
        most_seq = most_seq.max(s.seq_blocks);
    });
    assert_eq!(got, common::greedy_reference(MODEL, &long, 48), "a long stream");
    // 208 tokens: 52 full blocks; the window group's: the 8-token window
    // (3 blocks of 4) while decoding, a 16-token chunk and its window while
    // prefilling.
    assert!(most_seq >= 50, "full blocks: {most_seq}");
    assert!(most_held <= 4 + 2 + 1, "window blocks held: {most_held}");
    // Three at once, chunked, longer than the window many times over.
    let three: Vec<Vec<u32>> = [(40, 1), (67, 2), (23, 3)].iter().map(|&(n, k)| prompt(n, k)).collect();
    let mut rxs: Vec<_> = three.iter().zip([8, 5, 8]).map(|(p, c)| submit(&w, &entry, p, 24, c)).collect();
    let together: Vec<Vec<u32>> = rxs.iter_mut().map(|r| collect(&w, r, |_| {})).collect();
    for (p, got) in three.iter().zip(&together) {
        assert_eq!(*got, common::greedy_reference(MODEL, p, 24), "three at once, prompt of {}", p.len());
    }
    assert!(w.stats().max_batch >= 3, "{:?}", w.stats());
    // A repeated prompt hits the prefix cache (its window blocks kept idle).
    let before = stats(&w);
    let again = collect(&w, &mut submit(&w, &entry, &three[1], 24, 512), |_| {});
    let after = stats(&w);
    assert!(after.prefix_hit_tokens >= before.prefix_hit_tokens + 60, "{after:?}");
    assert_eq!(again, together[1], "a prefix-cache hit answers differently");
    // A next turn: prompt + reply + more, cached through the reply.
    let mut turn = three[1].clone();
    turn.extend(&again);
    turn.extend([9, 10, 11]);
    let next = collect(&w, &mut submit(&w, &entry, &turn, 16, 8), |_| {});
    assert!(stats(&w).prefix_hit_tokens >= after.prefix_hit_tokens + 88, "{:?}", stats(&w));
    assert_eq!(next, common::greedy_reference(MODEL, &turn, 16), "next turn over cached blocks");
}

fn stats_after_warmup(w: &Worker, entry: &Arc<ModelEntry>) -> BlockStats {
    let p = prompt(3, 0);
    assert_eq!(collect(w, &mut submit(w, entry, &p, 2, 512), |_| {}), common::greedy_reference(MODEL, &p, 2));
    stats(w)
}

/// A budget three streams do not fit: the newest are preempted and come
/// back (mostly from the prefix cache); every stream answers the same.
#[test]
fn preempted_streams_answer_the_same() {
    let _g = common::mlx_lock();
    let cat = ModelCatalog::discover(&[(None, common::fixture(&format!("models/{MODEL}")))], &[]).unwrap();
    let entry = cat.get(MODEL).unwrap();
    // Room for about 36 full blocks and their windows: 2.5 streams of 24 + 32 tokens.
    let w = worker(&cat, 30 * FULL + 12 * WIN);
    let three: Vec<Vec<u32>> = (0..3).map(|k| prompt(24 + 3 * k, 20 + k)).collect();
    let mut rxs: Vec<_> = three.iter().map(|p| submit(&w, &entry, p, 32, 8)).collect();
    let got: Vec<Vec<u32>> = rxs.iter_mut().map(|r| collect(&w, r, |_| {})).collect();
    for (p, g) in three.iter().zip(&got) {
        assert_eq!(*g, common::greedy_reference(MODEL, p, 32), "preempted stream, prompt of {}", p.len());
    }
    assert!(stats(&w).preemptions > 0, "nothing was preempted: {:?}", stats(&w));
}

/// A budget so tight that a stream evicts its own released window blocks:
/// a later prompt sharing its first 24 tokens finds their full blocks but
/// not the window blocks its next query reads, its hit is cut, and it
/// still answers as `rmlx generate`.
#[test]
fn a_hit_cut_for_its_window_blocks_answers_the_same() {
    let _g = common::mlx_lock();
    let cat = ModelCatalog::discover(&[(None, common::fixture(&format!("models/{MODEL}")))], &[]).unwrap();
    let entry = cat.get(MODEL).unwrap();
    // 64 tokens = 16 full blocks, about 5 window blocks of room besides.
    let w = worker(&cat, 17 * FULL + 5 * WIN);
    let a = prompt(48, 30);
    assert_eq!(collect(&w, &mut submit(&w, &entry, &a, 16, 8), |_| {}), common::greedy_reference(MODEL, &a, 16));
    let s = stats(&w);
    assert!(s.window_evictions > 0, "{s:?}");
    let mut b = a[..24].to_vec();
    b.extend(prompt(16, 31));
    let got = collect(&w, &mut submit(&w, &entry, &b, 8, 8), |_| {});
    let s = stats(&w);
    assert!(s.window_cut_tokens > 0, "the hit was not cut: {s:?}");
    assert_eq!(got, common::greedy_reference(MODEL, &b, 8), "a cut hit answers differently");
}

/// Measures the KV bytes a long prompt holds with and without the window
/// group (`RMLX_KV_WINDOW_GROUPS=0`), on the model at `RMLX_WINDOW_KV_MODEL`
/// (e.g. the converted Gemma-3-270M), prompt `RMLX_WINDOW_KV_TOKENS` tokens
/// long (default 8192), prefix cache off, and checks both answer the same.
/// Run by hand: `cargo test -p rmlx --test engine_window_kv -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_window_kv_bytes() {
    let Ok(dir) = std::env::var("RMLX_WINDOW_KV_MODEL") else { return };
    let n: usize = std::env::var("RMLX_WINDOW_KV_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(8192);
    let _g = common::mlx_lock();
    let cat = ModelCatalog::discover(&[(Some("m".into()), std::path::PathBuf::from(&dir))], &[]).unwrap();
    let entry = cat.get("m").unwrap();
    let p: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % 30000 + 100) as u32).collect();
    let mut outs = Vec::new();
    for split in ["1", "0"] {
        std::env::set_var("RMLX_KV_WINDOW_GROUPS", split);
        let sched = SchedulerConfig { kv_budget: KvBudget::Bytes(8 << 30), prefix_cache: false, ..SchedulerConfig::default() };
        let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 4, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 };
        let w = Worker::start_with(cfg, sched, &cat).unwrap();
        let t0 = std::time::Instant::now();
        let (mut used, mut held, mut win) = (0u64, 0usize, 0usize);
        let mut rx = submit(&w, &entry, &p, 8, 512);
        let mut ids = Vec::new();
        loop {
            match rx.blocking_recv().expect("engine hung up") {
                GenEvent::Token { id, .. } => {
                    ids.push(id);
                    let st = w.stats();
                    used = used.max(st.kv_used_bytes);
                    if let Some(b) = st.blocks.iter().find(|(id, _)| id == "m").map(|(_, s)| s.clone()) {
                        held = held.max(b.seq_blocks);
                        win = win.max(b.window_held);
                    }
                }
                GenEvent::Done(_) => break,
                GenEvent::Error(e) => panic!("{e:?}"),
                _ => {}
            }
        }
        let s = w.stats().blocks[0].1.clone();
        eprintln!(
            "window groups {split}: {n}-token prompt + 8, {:.1}s; KV held at most {used} bytes ({:.1} MiB): {held} full blocks, {win} window blocks held; block {} bytes (window {})",
            t0.elapsed().as_secs_f64(),
            used as f64 / (1 << 20) as f64,
            s.block_bytes,
            s.window_block_bytes
        );
        outs.push(ids);
        w.shutdown();
    }
    std::env::remove_var("RMLX_KV_WINDOW_GROUPS");
    assert_eq!(outs[0], outs[1], "the window group answers differently");
}
