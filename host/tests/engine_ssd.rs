//! The KV prefix cache's SSD tier, through the engine API (Worker), on the
//! tiny llama-f32 fixture: blocks evicted from memory come back from disk,
//! a new worker on the same directory (a restart) reuses them, corrupt and
//! truncated files are skipped (never served), and the size cap holds.
//! Every output must equal a cold run's token for token.
mod common;

use rmlx::engine::block_manager::BlockStats;
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::ssd::{SsdConfig, FIXED};
use rmlx::engine::worker::{
    GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const MODEL: &str = "llama-f32";
/// llama-f32: 2 layers x 2 KV heads x hd 16 x f32 x (K and V) = 512 bytes a token.
const BLOCK: usize = 8;
const BLOCK_BYTES: u64 = 512 * BLOCK as u64;
/// One block's file: header, 8 token ids, 4 array descriptors, payload, CRC.
const FILE_BYTES: u64 = FIXED as u64 + 4 * 8 + 4 * 32 + BLOCK_BYTES + 4;

fn catalog() -> ModelCatalog {
    ModelCatalog::discover(&[(None, common::fixture(&format!("models/{MODEL}")))], &[]).unwrap()
}

/// A worker whose memory holds `ram_blocks` blocks, with the SSD tier in `dir`.
fn worker(cat: &ModelCatalog, dir: &Path, ram_blocks: u64, cap: u64) -> Worker {
    let sched = SchedulerConfig {
        kv_budget: KvBudget::Bytes(BLOCK_BYTES * ram_blocks),
        block_size: BLOCK,
        ssd: Some(SsdConfig {
            dir: dir.to_path_buf(),
            max_bytes: cap,
        }),
        ..SchedulerConfig::default()
    };
    Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 64,
            max_loaded_models: 1,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        sched,
        cat,
    )
    .unwrap()
}

fn prompt(seed: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 13 + seed * 37) % 240 + 5) as u32)
        .collect()
}

/// Greedy token ids of one request.
fn run(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let params = GenParams {
        max_tokens,
        ignore_eos: true,
        prefill_chunk: 512,
        ..GenParams::default()
    };
    let cancel = Arc::new(AtomicBool::new(false));
    w.submit(GenRequest {
        model: entry.clone(),
        prompt: prompt.to_vec(),
        params,
        hook: None,
        cancel,
        keep_alive: None,
        events: tx,
    })
    .unwrap();
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

/// A cold run through the CLI's generate loop (no cache of any kind).
fn reference(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    common::greedy_reference(MODEL, prompt, max_tokens)
}

/// Waits until `cond` holds (60 s at most: the engine or the writer hung).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The model's block figures once the engine is idle.
fn stats(w: &Worker) -> BlockStats {
    wait_for("the engine to go idle", || {
        let s = w.stats();
        s.running == 0 && s.waiting == 0 && w.open_requests().load(Ordering::SeqCst) == 0
    });
    w.stats()
        .blocks
        .iter()
        .find(|(id, _)| id == MODEL)
        .map(|(_, b)| b.clone())
        .unwrap()
}

/// Block files (`*.kvb`) and temp files under `dir`.
fn files(dir: &Path) -> (Vec<PathBuf>, usize) {
    let (mut kvb, mut tmp) = (Vec::new(), 0);
    for sub in std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let p = f.path();
            match p.extension().and_then(|e| e.to_str()) {
                Some("kvb") => kvb.push(p),
                Some("tmp") => tmp += 1,
                _ => {}
            }
        }
    }
    kvb.sort();
    (kvb, tmp)
}

/// Waits until the writer thread has put exactly `blocks` files on disk.
fn settle(dir: &Path, blocks: u64) {
    wait_for("the SSD writes to land", || {
        let (kvb, tmp) = files(dir);
        tmp == 0 && kvb.len() as u64 == blocks
    });
}

/// The block file holding exactly these tokens (read from its header).
fn file_with_tokens(dir: &Path, tokens: &[u32]) -> PathBuf {
    files(dir)
        .0
        .into_iter()
        .find(|p| {
            let b = std::fs::read(p).unwrap();
            let n = u32::from_le_bytes(b[36..40].try_into().unwrap()) as usize;
            let t: Vec<u32> = (0..n)
                .map(|i| {
                    u32::from_le_bytes(b[FIXED + 4 * i..FIXED + 4 * i + 4].try_into().unwrap())
                })
                .collect();
            t == tokens
        })
        .unwrap_or_else(|| panic!("no block file holds {tokens:?}"))
}

/// Runs prompt A (50 tokens), then prompt B (120 tokens) that needs the
/// whole 16-block memory budget: A's 7 cached blocks are evicted, so written
/// to disk. Returns A and its output.
fn spill_a(w: &Worker, entry: &Arc<ModelEntry>) -> (Vec<u32>, Vec<u32>) {
    let a = prompt(1, 50);
    let out = run(w, entry, &a, 8);
    run(w, entry, &prompt(2, 120), 8);
    (a, out)
}

#[test]
fn evicted_blocks_come_back_from_ssd() {
    let _g = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog();
    let entry = cat.get(MODEL).unwrap();
    let w = worker(&cat, tmp.path(), 16, 1 << 30);
    let (a, first) = spill_a(&w, &entry);
    let before = stats(&w);
    assert!(
        before.ssd_writes >= 6 && before.evictions >= 6,
        "A's blocks were not spilled: {before:?}"
    );
    let again = run(&w, &entry, &a, 8);
    let after = stats(&w);
    assert!(
        after.ssd_reads > before.ssd_reads,
        "no block came from disk: {after:?}"
    );
    assert_eq!(
        after.prefix_hit_tokens - before.prefix_hit_tokens,
        48,
        "{after:?}"
    );
    assert_eq!(after.ssd_corrupt, 0);
    let cold = reference(&a, 8);
    assert_eq!(first, cold);
    assert_eq!(
        again, cold,
        "output from SSD blocks differs from a cold run"
    );
}

#[test]
fn restart_reuses_ssd_blocks() {
    let _g = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog();
    let entry = cat.get(MODEL).unwrap();
    let w1 = worker(&cat, tmp.path(), 16, 1 << 30);
    let (a, _) = spill_a(&w1, &entry);
    let s1 = stats(&w1);
    // B's 16 blocks (120 + 8 tokens: its last token's KV is written by the
    // pipelined step that follows it) stay in memory.
    assert_eq!((s1.ssd_blocks, s1.cached_blocks), (7, 16), "{s1:?}");
    // Shutting down spills the memory cache too.
    w1.shutdown();
    settle(tmp.path(), 23);
    drop(w1);
    // A new engine on the same directory, with room to spare in memory.
    let w2 = worker(&cat, tmp.path(), 64, 1 << 30);
    let out = run(&w2, &entry, &a, 8);
    let s2 = stats(&w2);
    assert_eq!(
        (s2.prefix_hits, s2.prefix_hit_tokens, s2.ssd_reads),
        (1, 48, 6),
        "{s2:?}"
    );
    assert_eq!((s2.ssd_corrupt, s2.evictions), (0, 0), "{s2:?}");
    assert_eq!(s2.ssd_blocks, 23);
    assert_eq!(
        out,
        reference(&a, 8),
        "output from a restart's SSD blocks differs from a cold run"
    );
    let b = prompt(2, 120);
    let out = run(&w2, &entry, &b, 8);
    let s3 = stats(&w2);
    assert_eq!(
        (
            s3.prefix_hit_tokens - s2.prefix_hit_tokens,
            s3.ssd_reads - s2.ssd_reads
        ),
        (112, 14),
        "{s3:?}"
    );
    assert_eq!(
        out,
        reference(&b, 8),
        "output from blocks spilled at shutdown differs from a cold run"
    );
}

#[test]
fn corrupt_and_truncated_files_are_skipped() {
    let _g = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog();
    let entry = cat.get(MODEL).unwrap();
    let w1 = worker(&cat, tmp.path(), 16, 1 << 30);
    let (a, _) = spill_a(&w1, &entry);
    settle(tmp.path(), stats(&w1).ssd_blocks);
    w1.shutdown();
    drop(w1);
    // Flip one payload byte of A's second block (found by its checksum when
    // read); cut the end off A's fourth (found by its length at start-up).
    let flipped = file_with_tokens(tmp.path(), &a[BLOCK..2 * BLOCK]);
    let mut b = std::fs::read(&flipped).unwrap();
    let n = b.len();
    b[n - 100] ^= 0x01;
    std::fs::write(&flipped, &b).unwrap();
    let cut = file_with_tokens(tmp.path(), &a[3 * BLOCK..4 * BLOCK]);
    let b = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &b[..b.len() - 64]).unwrap();
    let w2 = worker(&cat, tmp.path(), 64, 1 << 30);
    let out = run(&w2, &entry, &a, 8);
    let s = stats(&w2);
    assert_eq!(s.ssd_corrupt, 2, "{s:?}");
    // Only the first block was served; the flipped one broke the chain.
    assert_eq!(
        (s.ssd_reads, s.prefix_hit_tokens),
        (1, BLOCK as u64),
        "{s:?}"
    );
    assert_eq!(out, reference(&a, 8), "output differs from a cold run");
    wait_for("the corrupt files to be deleted", || {
        !flipped.exists() && !cut.exists()
    });
}

#[test]
fn size_cap_holds() {
    let _g = common::mlx_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog();
    let entry = cat.get(MODEL).unwrap();
    let cap = 10 * FILE_BYTES + 100;
    let w = worker(&cat, tmp.path(), 16, cap);
    for seed in 0..6 {
        run(&w, &entry, &prompt(10 + seed, 60), 8);
    }
    let s = stats(&w);
    assert!(s.ssd_writes > 10, "too few spills to test the cap: {s:?}");
    assert!(s.ssd_blocks <= 10 && s.ssd_bytes <= cap, "{s:?}");
    assert_eq!(s.ssd_bytes, s.ssd_blocks * FILE_BYTES);
    settle(tmp.path(), s.ssd_blocks);
    let on_disk: u64 = files(tmp.path())
        .0
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(on_disk, s.ssd_bytes);
    // Serving goes on right after all that deleting.
    let last = prompt(15, 60);
    let out = run(&w, &entry, &last, 8);
    assert_eq!(out, reference(&last, 8));
}

#[test]
fn bad_ssd_flags_are_cli_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let model = common::fixture(&format!("models/{MODEL}"));
    let dir = tmp.path().join("kv").display().to_string();
    let under_file = file.join("sub").display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (&["--kv-ssd-dir", &dir, "--kv-ssd-gb", "-1"], "--kv-ssd-gb"),
        (&["--kv-ssd-dir", &dir, "--kv-ssd-gb", "0"], "--kv-ssd-gb"),
        (&["--kv-ssd-dir", &under_file], "--kv-ssd-dir"),
        (&["--kv-ssd-gb", "5"], "needs --kv-ssd-dir"),
    ];
    for (flags, want) in cases {
        let out = std::process::Command::new(common::rmlx_bin())
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(flags)
            .args(["--port", "0"])
            .env("RMLX_CACHE_DIR", tmp.path())
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    // The same checks through rmlx.toml and the environment.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(
        cwd.join("rmlx.toml"),
        format!("[server]\nkv_ssd_dir = {under_file:?}\n"),
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(common::rmlx_bin())
            .args(["serve", "--port", "0", "--model"])
            .arg(&model)
            .envs(env.iter().copied())
            .current_dir(&cwd)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("--kv-ssd-dir") && err.contains("a-file"),
        "{err}"
    );
    let err = run(&[
        ("RMLX_SERVER__KV_SSD_DIR", &dir),
        ("RMLX_SERVER__KV_SSD_GB", "-1"),
    ]);
    assert!(
        err.contains("--kv-ssd-gb must be a positive number"),
        "{err}"
    );
}
