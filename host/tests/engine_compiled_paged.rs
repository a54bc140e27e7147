//! The server's compiled paged decode step (engine/compiled_paged.rs),
//! forced on for the CPU (`RMLX_COMPILE_PAGED=1`), gives the same tokens as
//! the op-by-op step (`RMLX_COMPILE_PAGED=0`) on the same requests: ragged
//! rows joining and leaving at different steps (row and table-width buckets
//! change), a prefix-cache hit, preemption under a small KV budget, greedy
//! rows beside sampled ones (which read logits), and the bf16 and turbo4 KV
//! families. Each run also checks which path served it (the process's
//! compiled step and trace counts), and that MLX reused its traces.
mod common;

use rmlx::engine::compiled_paged::{counts, failures};
use rmlx::engine::kv_family::KvChoice;
use rmlx::engine::sampler::SamplingParams;
use rmlx::engine::scheduler::{EngineStats, KvBudget, SchedulerConfig};
use rmlx::engine::worker::{GenEvent, GenParams, GenRequest, ModelCatalog, Worker, WorkerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const MODELS: [&str; 3] = ["llama-f32", "qwen3-f32", "gemma3_text-f32"];

fn catalog() -> ModelCatalog {
    let list: Vec<_> = MODELS.iter().map(|m| (None, common::fixture(&format!("models/{m}")))).collect();
    ModelCatalog::discover(&list, &[]).unwrap()
}

/// Blocks of 4 tokens, so a few dozen tokens cross several table widths.
fn sched(prefix_cache: bool, budget: KvBudget) -> SchedulerConfig {
    SchedulerConfig { kv_budget: budget, block_size: 4, prefix_cache, ..SchedulerConfig::default() }
}

const ROOMY: KvBudget = KvBudget::Bytes(32 << 20);

/// What one run of a scenario gave: every request's tokens, the engine's
/// stats at the end, and the compiled steps and traces it made.
struct Run<T> {
    out: T,
    stats: EngineStats,
    steps: u64,
    traces: u64,
}

/// Runs `f` on a fresh worker with the compiled paged step forced on or off
/// (the lanes read it when they are made); the worker is shut down after.
fn run<T>(compiled: bool, cfg: SchedulerConfig, f: impl FnOnce(&Worker, &ModelCatalog) -> T) -> Run<T> {
    std::env::set_var("RMLX_COMPILE_PAGED", if compiled { "1" } else { "0" });
    let cat = catalog();
    let w = Worker::start_with(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 3, idle_timeout: None, prefill_chunk: 512 },
        cfg,
        &cat,
    )
    .unwrap();
    let (s0, t0) = counts();
    let out = f(&w, &cat);
    let stats = wait_idle(&w);
    w.shutdown();
    drop(w);
    let (s1, t1) = counts();
    std::env::remove_var("RMLX_COMPILE_PAGED");
    Run { out, stats, steps: s1 - s0, traces: t1 - t0 }
}

/// Both ways; asserts the compiled run compiled and the other did not.
fn both<T: PartialEq + std::fmt::Debug>(cfg: SchedulerConfig, f: impl Fn(&Worker, &ModelCatalog) -> T) -> (Run<T>, Run<T>) {
    let op = run(false, cfg.clone(), &f);
    let comp = run(true, cfg, &f);
    assert_eq!(op.steps, 0, "the op-by-op run compiled");
    assert!(comp.steps > 0, "the compiled run never compiled a step");
    assert!(comp.traces < comp.steps, "traces are not reused: {} traces for {} steps", comp.traces, comp.steps);
    assert_eq!(comp.out, op.out, "compiled != op by op");
    eprintln!("{} compiled steps, {} traces", comp.steps, comp.traces);
    (op, comp)
}

fn params(max_tokens: usize) -> GenParams {
    GenParams { max_tokens, ignore_eos: true, prefill_chunk: 512, ..GenParams::default() }
}

fn submit(w: &Worker, cat: &ModelCatalog, model: &str, prompt: &[u32], params: GenParams) -> UnboundedReceiver<GenEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let req = GenRequest { model: cat.get(model).unwrap(), prompt: prompt.to_vec(), params, hook: None, cancel, keep_alive: None, events: tx };
    w.submit(req).unwrap();
    rx
}

/// A request's tokens; panics on its error.
fn collect(rx: &mut UnboundedReceiver<GenEvent>) -> Vec<u32> {
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

/// Waits for a request's first token (it has joined the decode batch).
fn first(rx: &mut UnboundedReceiver<GenEvent>) -> u32 {
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => return id,
            GenEvent::Error(e) => panic!("request failed: {e}"),
            GenEvent::Done(_) => panic!("ended before its first token"),
            _ => {}
        }
    }
}

fn wait_idle(w: &Worker) -> EngineStats {
    let t0 = Instant::now();
    loop {
        let s = w.stats();
        if s.running == 0 && s.waiting == 0 && w.open_requests().load(Ordering::SeqCst) == 0 {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "engine did not go idle: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn prompt(seed: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + seed * 31 + 3) % 250 + 3) as u32).collect()
}

/// Rows of different lengths join while others decode and leave at
/// different steps (row buckets 1 to 8, table widths 1 to 32 blocks).
#[test]
fn ragged_joins_and_leaves_equal_op_by_op() {
    let _g = common::mlx_lock();
    let (_, comp) = both(sched(false, ROOMY), |w, cat| {
        let mut outs = Vec::new();
        for model in ["llama-f32", "qwen3-f32"] {
            let mut a = submit(w, cat, model, &prompt(0, 5), params(30));
            let mut b = submit(w, cat, model, &prompt(1, 40), params(9));
            let (fa, fb) = (first(&mut a), first(&mut b));
            let mut late: Vec<_> = [(1, 24), (17, 14), (70, 6)].iter().enumerate().map(|(i, &(n, m))| submit(w, cat, model, &prompt(2 + i, n), params(m))).collect();
            let mut got = vec![[vec![fa], collect(&mut a)].concat(), [vec![fb], collect(&mut b)].concat()];
            got.extend(late.iter_mut().map(collect));
            outs.push(got);
        }
        outs
    });
    assert!(comp.stats.max_batch >= 3, "{:?}", comp.stats);
}

/// A windowed model is not compiled (op by op, same tokens).
#[test]
fn sliding_window_models_stay_op_by_op() {
    let _g = common::mlx_lock();
    let comp = run(true, sched(false, ROOMY), |w, cat| {
        let mut rx = [submit(w, cat, "gemma3_text-f32", &prompt(3, 12), params(6)), submit(w, cat, "gemma3_text-f32", &prompt(4, 5), params(6))];
        rx.iter_mut().map(collect).collect::<Vec<_>>()
    });
    assert_eq!(comp.steps, 0);
    assert!(comp.out.iter().all(|o| o.len() == 6));
}

/// The second request's prompt starts with the first's whole conversation:
/// it resumes from the prefix cache, then decodes compiled.
#[test]
fn prefix_cache_hit_equals_op_by_op() {
    let _g = common::mlx_lock();
    let (_, comp) = both(sched(true, ROOMY), |w, cat| {
        let p = prompt(5, 33);
        let a = collect(&mut submit(w, cat, "qwen3-f32", &p, params(8)));
        let q = [p.clone(), a.clone(), prompt(6, 5)].concat();
        let b = collect(&mut submit(w, cat, "qwen3-f32", &q, params(12)));
        (a, b)
    });
    let hits: u64 = comp.stats.blocks.iter().map(|(_, b)| b.prefix_hits).sum();
    assert!(hits >= 1, "no prefix-cache hit: {:?}", comp.stats.blocks);
}

/// A budget far below what the requests need at once: sequences are
/// preempted and resumed, their rows leaving and rejoining the batch.
#[test]
fn preemption_under_a_small_budget_equals_op_by_op() {
    let _g = common::mlx_lock();
    // llama-f32: 2 layers x 2 KV heads x hd 16 x f32 x (K and V) = 512 bytes per token; 40 blocks of 4.
    let cfg = sched(false, KvBudget::Bytes(512 * 4 * 40));
    let (_, comp) = both(cfg, |w, cat| {
        let mut rx: Vec<_> = (0..5).map(|i| submit(w, cat, "llama-f32", &prompt(10 + i, 20 + 5 * i), params(24))).collect();
        rx.iter_mut().map(collect).collect::<Vec<_>>()
    });
    let pre: u64 = comp.stats.blocks.iter().map(|(_, b)| b.preemptions).sum();
    assert!(pre >= 1, "the budget never forced a preemption: {:?}", comp.stats.blocks);
}

/// Greedy rows and sampled rows (seeded; they read the step's logits) in
/// one batch, one greedy row with a logit bias applied on the device.
#[test]
fn greedy_and_sampled_rows_equal_op_by_op() {
    let _g = common::mlx_lock();
    both(sched(false, ROOMY), |w, cat| {
        let sampled = |seed| GenParams { sampling: SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(seed), ..SamplingParams::default() }, ..params(16) };
        let biased = GenParams { sampling: SamplingParams { logit_bias: vec![(7, 3.0), (100, -2.0)], ..SamplingParams::default() }, ..params(16) };
        let mut rx = [
            submit(w, cat, "qwen3-f32", &prompt(20, 9), params(16)),
            submit(w, cat, "qwen3-f32", &prompt(21, 14), sampled(1)),
            submit(w, cat, "qwen3-f32", &prompt(22, 3), sampled(2)),
            submit(w, cat, "qwen3-f32", &prompt(23, 21), biased),
        ];
        rx.iter_mut().map(collect).collect::<Vec<_>>()
    });
}

/// The bf16 family and a quantized one (turbo4: rotation, codes and norms)
/// in lanes of their own, a batch each.
#[test]
fn kv_families_equal_op_by_op() {
    let _g = common::mlx_lock();
    both(sched(false, ROOMY), |w, cat| {
        let mut outs = Vec::new();
        for fam in ["bf16", "turbo4"] {
            let kv = || GenParams { kv: Some(KvChoice { k: Some(fam.into()), v: Some(fam.into()) }), ..params(12) };
            let mut rx = [submit(w, cat, "llama-f32", &prompt(30, 7), kv()), submit(w, cat, "llama-f32", &prompt(31, 26), kv())];
            outs.push(rx.iter_mut().map(collect).collect::<Vec<_>>());
        }
        outs
    });
}

/// The step writes the pool in place (its arrays moved out of the pool for
/// the call, so MLX donates them): with a pool of 4 MB left by a burst of
/// long prompts, a short stream's decode steps raise MLX's peak memory by
/// far less than one layer's keys (1 MB), compiled as op by op. A step that
/// kept a second reference would copy every layer's arrays every step.
#[test]
fn the_pool_is_written_in_place() {
    let _g = common::mlx_lock();
    let burst = |w: &Worker, cat: &ModelCatalog| {
        // 12 x 500 tokens in blocks of 4: the pool grows to 2,048 blocks,
        // 8,192 slots x 2 KV heads x 16 x f32 = 1 MB per layer side.
        let mut rx: Vec<_> = (0..12).map(|i| submit(w, cat, "llama-f32", &prompt(40 + i, 500), params(1))).collect();
        rx.iter_mut().for_each(|r| drop(collect(r)));
        let mut rx = submit(w, cat, "llama-f32", &prompt(60, 5), params(40));
        let t = first(&mut rx);
        let before = mlx_rs::memory::active_memory().unwrap();
        mlx_rs::memory::reset_peak_memory().unwrap();
        let rest = collect(&mut rx);
        let peak = mlx_rs::memory::peak_memory().unwrap();
        ([vec![t], rest].concat(), peak.saturating_sub(before))
    };
    for compiled in [false, true] {
        let r = run(compiled, sched(false, ROOMY), burst);
        eprintln!("compiled {compiled}: {} steps; decode raised the peak by {} bytes", r.steps, r.out.1);
        assert!(!compiled || r.steps >= 30, "{} compiled steps", r.steps);
        assert!(r.out.1 < 512 << 10, "compiled {compiled}: decode steps raised MLX's peak by {} bytes", r.out.1);
    }
}

/// An architecture that evaluates inside its forward (the faulty test
/// plugin reads its tokens) cannot be traced: MLX refuses the trace, the
/// lane turns its compiled step off and decodes op by op, same tokens.
#[test]
fn a_forward_that_evaluates_falls_back_op_by_op() {
    let _g = common::mlx_lock();
    let lib = |name: &str| format!("lib{name}.{}", rmlx::plugins::loader::LIB_EXT);
    let plugins = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::plugins_dir()).unwrap() {
        let p = e.unwrap().path();
        std::os::unix::fs::symlink(&p, plugins.path().join(p.file_name().unwrap())).unwrap();
    }
    std::os::unix::fs::symlink(common::test_plugins_dir().join(lib("rmlx_test_faulty")), plugins.path().join(lib("rmlx_test_faulty"))).unwrap();
    // The tiny llama as the faulty architecture, with a trigger no token reaches.
    let model = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::fixture("models/llama-f32")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.path().join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.path().join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "rmlx_faulty".into();
    cfg["faulty_trigger"] = 100_000.into();
    std::fs::write(model.path().join("config.json"), cfg.to_string()).unwrap();
    let cat = ModelCatalog::discover(&[(Some("faulty".to_string()), model.path().to_path_buf())], &[]).unwrap();
    let mut outs = Vec::new();
    for compiled in [false, true] {
        std::env::set_var("RMLX_COMPILE_PAGED", if compiled { "1" } else { "0" });
        let w = Worker::start_with(
            WorkerConfig { plugins_dir: plugins.path().to_path_buf(), max_queue_depth: 64, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
            sched(false, ROOMY),
            &cat,
        )
        .unwrap();
        let (s0, t0, f0) = (counts().0, counts().1, failures());
        let mut rx = [submit(&w, &cat, "faulty", &prompt(50, 9), params(8)), submit(&w, &cat, "faulty", &prompt(51, 4), params(8))];
        outs.push(rx.iter_mut().map(collect).collect::<Vec<_>>());
        wait_idle(&w);
        w.shutdown();
        let (s1, t1, f1) = (counts().0, counts().1, failures());
        assert_eq!((s1 - s0, t1 - t0), (0, 0), "compiled {compiled}: no step may run compiled, no trace may succeed");
        // Forced on: the lane tried once, then stayed op by op.
        assert_eq!(f1 - f0, compiled as u64, "compiled {compiled}: compiled steps that failed");
    }
    std::env::remove_var("RMLX_COMPILE_PAGED");
    assert_eq!(outs[0], outs[1]);
}
