//! The prefix cache's SSD tier on a hybrid model (tiny qwen3_next-f32:
//! gated-DeltaNet layers with a recurrent state beside attention layers).
//! A block goes to disk with its state snapshot (`<hash>.kvs` beside its
//! `.kvb`, host/src/engine/ssd/state.rs), so a multi-turn chat whose prefix
//! was evicted to disk, or spilled at shutdown and reopened, resumes from
//! the disk's snapshot and answers what a cold run answers, token for
//! token; a corrupt snapshot file is never served: the hit stops at a
//! shallower snapshot, with the same output.
mod common;

use rmlx::engine::block_manager::BlockStats;
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::ssd::{SsdConfig, FIXED};
use rmlx::engine::worker::{FinishReason, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const MODEL: &str = "qwen3_next-f32";
/// 2 attention layers x 2 KV heads x hd 16 x f32 x (K and V) = 512 bytes a token.
const BLOCK: usize = 8;
const BLOCK_BYTES: u64 = 512 * BLOCK as u64;
/// One sequence's recurrent state (3 DeltaNet layers' conv and SSM states).
const STATE_BYTES: u64 = 11264;

fn catalog() -> ModelCatalog {
    ModelCatalog::discover(&[(None, common::fixture(&format!("models/{MODEL}")))], &[]).unwrap()
}

/// A worker whose memory holds 24 blocks and 3 states, with the SSD tier in `dir`.
fn worker(cat: &ModelCatalog, dir: &Path) -> Worker {
    let sched = SchedulerConfig {
        kv_budget: KvBudget::Bytes(BLOCK_BYTES * 24 + 3 * STATE_BYTES),
        block_size: BLOCK,
        ssd: Some(SsdConfig { dir: dir.to_path_buf(), max_bytes: 1 << 30 }),
        ..SchedulerConfig::default()
    };
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 };
    Worker::start_with(cfg, sched, cat).unwrap()
}

/// A prompt of `n` token ids (< 256, the fixture's vocabulary), varied by `k`.
fn prompt(n: usize, k: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32).collect()
}

/// Greedy token ids of one request.
fn run(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: 512, ..GenParams::default() };
    let cancel = Arc::new(AtomicBool::new(false));
    w.submit(GenRequest { model: entry.clone(), prompt: prompt.to_vec(), params, hook: None, cancel, keep_alive: None, events: tx })
        .unwrap();
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(f) => {
                assert_eq!(f.reason, FinishReason::Length);
                return ids;
            }
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// The model's block figures once the engine is idle.
fn stats(w: &Worker) -> BlockStats {
    let t0 = Instant::now();
    loop {
        let s = w.stats();
        if s.running == 0 && s.waiting == 0 && w.open_requests().load(Ordering::SeqCst) == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "engine never went idle: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    w.stats().blocks.iter().find(|(m, _)| m == MODEL).map(|(_, b)| b.clone()).unwrap_or_default()
}

/// State snapshot files (`*.kvs`) under `dir` of blocks of `conv`'s chain
/// (their header's tokens are `conv`'s at their depth), by depth.
fn state_files(dir: &Path, conv: &[u32]) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "kvs") {
                let b = std::fs::read(&p).unwrap();
                assert!(b.len() > FIXED);
                let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                let (depth, n) = (word(32) as usize, word(36) as usize);
                let tokens: Vec<u32> = (0..n).map(|i| word(FIXED + 4 * i)).collect();
                if conv.get(depth * BLOCK..(depth + 1) * BLOCK) == Some(&tokens[..]) {
                    out.push((depth as u32, p));
                }
            }
        }
    }
    out.sort();
    out
}

/// Tokens a turn's prompt resumes after: the previous turn's prompt and
/// reply but its last token (never fed), in whole blocks.
fn resumable(conv_len: usize, new: usize) -> u64 {
    ((conv_len - new - 1) / BLOCK * BLOCK) as u64
}

/// Turn 1, then a long unrelated prompt that needs nearly the whole budget:
/// turn 1's blocks and state snapshots are evicted to disk. Turn 2 reads
/// its prefix and the snapshot back and answers what a cold run answers.
/// Then the worker stops (spilling its cache), the deepest snapshot file is
/// corrupted, and turn 3 on a new worker over the same directory resumes
/// at the next snapshot down, with the cold run's output.
#[test]
fn hybrid_prefix_resumes_from_ssd_snapshots() {
    let _g = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog();
    let entry = cat.get(MODEL).unwrap();
    let w = worker(&cat, tmp.path());
    let mut conv = prompt(40, 1);
    let out = run(&w, &entry, &conv, 10);
    assert_eq!(out, common::greedy_reference(MODEL, &conv, 10), "turn 1");
    // 180 + 4 tokens: 23 of the 24 blocks.
    let filler = prompt(180, 9);
    assert_eq!(run(&w, &entry, &filler, 4), common::greedy_reference(MODEL, &filler, 4), "filler");
    let before = stats(&w);
    assert!(before.ssd_state_writes >= 1 && before.ssd_writes >= 2, "turn 1's snapshot was not spilled: {before:?}");

    // Turn 2: the previous prompt, its reply and 8 new tokens.
    conv.extend(&out);
    conv.extend(prompt(8, 20));
    let out2 = run(&w, &entry, &conv, 10);
    let after = stats(&w);
    assert_eq!(out2, common::greedy_reference(MODEL, &conv, 10), "turn 2 from the SSD prefix");
    assert_eq!(after.prefix_hit_tokens - before.prefix_hit_tokens, resumable(conv.len(), 8), "turn 2's hit: {after:?}");
    assert!(after.ssd_reads > before.ssd_reads, "no block came from disk: {after:?}");
    assert!(after.ssd_state_reads > before.ssd_state_reads, "no snapshot came from disk: {after:?}");
    assert!(after.ssd_bytes > after.ssd_blocks * BLOCK_BYTES, "snapshot bytes are not counted: {after:?}");
    println!(
        "{MODEL}: turn 2 resumed after {} tokens from disk ({} blocks, {} snapshots read; {} bytes on disk)",
        after.prefix_hit_tokens - before.prefix_hit_tokens,
        after.ssd_reads - before.ssd_reads,
        after.ssd_state_reads - before.ssd_state_reads,
        after.ssd_bytes
    );
    w.shutdown();

    // Turn 3's deepest resumable snapshot (turn 2's last block boundary) corrupted.
    conv.extend(&out2);
    conv.extend(prompt(8, 21));
    let deep = resumable(conv.len(), 8) as usize / BLOCK;
    let files = state_files(tmp.path(), &conv);
    let (_, path) = files.iter().find(|(d, _)| *d as usize == deep - 1).unwrap_or_else(|| panic!("no snapshot at block {deep}: {files:?}"));
    let shallower = files.iter().filter(|(d, _)| (*d as usize) < deep - 1).map(|(d, _)| *d as u64 + 1).max().expect("a shallower snapshot");
    let mut b = std::fs::read(path).unwrap();
    let n = b.len();
    b[n - 20] ^= 0x40;
    std::fs::write(path, b).unwrap();

    let w = worker(&cat, tmp.path());
    let out3 = run(&w, &entry, &conv, 10);
    let s = stats(&w);
    assert_eq!(out3, common::greedy_reference(MODEL, &conv, 10), "turn 3 after the corrupt snapshot");
    assert_eq!(s.ssd_corrupt, 1, "{s:?}");
    assert_eq!(s.prefix_hit_tokens, shallower * BLOCK as u64, "turn 3 resumes at the next snapshot down: {s:?}");
    assert!(s.ssd_state_reads >= 1, "{s:?}");
    assert!(!path.exists(), "the corrupt snapshot file was not deleted");
    w.shutdown();
}
