//! KV-cache families per request, through the engine API (Worker): every
//! family (and asymmetric pairs) serves a batch that mixes families, each
//! request equal to its family run alone; prefix-cache hits equal misses
//! within a family and never cross families; the SSD tier round-trips a
//! family's encoded blocks; preemption under a small budget completes every
//! request; and at one budget a compressed family admits proportionally more
//! concurrent sequences than the dense one.
//!
//! Models: llama-f32 (head_dim 16) for every family but the affine ones,
//! which need a head_dim that is a multiple of 32: those run on
//! qwen3-bonsai-q2-g128 (head_dim 32).
mod common;

use rmlx::engine::block_manager::BlockStats;
use rmlx::engine::kv_family::{self, KvChoice};
use rmlx::engine::scheduler::{EngineStats, KvBudget, SchedulerConfig};
use rmlx::engine::ssd::SsdConfig;
use rmlx::engine::worker::{
    GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig, WorkerError,
};
use rmlx::engine::LoadedModel;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const LLAMA: &str = "llama-f32";
const BONSAI: &str = "qwen3-bonsai-q2-g128";
const BLOCK: usize = 8;

/// Families that take head_dim 16 (llama-f32).
const HD16: &[&str] = &[
    "f16", "bf16", "f32", "fp8", "turbo4", "turbo3", "turbo2", "turbo4q", "turbo3q", "planar4", "planar3", "iso4", "iso3",
    "rotor4", "rotor3", "rotor4q", "rotor3q",
];
/// The affine families (head_dim a multiple of 32: qwen3-bonsai-q2-g128).
const AFFINE: &[&str] = &["q8", "q4", "q2"];

fn one(name: &str) -> KvChoice {
    KvChoice { k: Some(name.into()), v: Some(name.into()) }
}

fn pair(k: &str, v: &str) -> KvChoice {
    KvChoice { k: Some(k.into()), v: Some(v.into()) }
}

/// Every (model, families) the tests cover: each family on a model it fits,
/// and asymmetric pairs on both.
fn cases() -> Vec<(&'static str, KvChoice)> {
    let mut v: Vec<(&str, KvChoice)> = HD16.iter().map(|f| (LLAMA, one(f))).collect();
    v.extend(AFFINE.iter().map(|f| (BONSAI, one(f))));
    v.push((LLAMA, pair("fp8", "turbo3")));
    v.push((LLAMA, pair("turbo4q", "planar4")));
    v.push((BONSAI, pair("q8", "turbo3")));
    v.push((BONSAI, pair("q4", "f16")));
    v
}

/// float32 compute, as `rmlx serve` does on a CPU (`--dtype auto`): the
/// tests' process default keeps the files' dtypes, and qwen3-bonsai's
/// float16 runs several times slower on the CPU. Every test sets it first.
fn catalog() -> ModelCatalog {
    use rmlx::model::policy::{set_setting, ComputeDtype, Dequantize, PolicySetting};
    set_setting(PolicySetting { dtype: ComputeDtype::Float32, dequantize: Dequantize::Off });
    ModelCatalog::discover(
        &[(None, common::fixture(&format!("models/{LLAMA}"))), (None, common::fixture(&format!("models/{BONSAI}")))],
        &[],
    )
    .unwrap()
}

/// A budget for tests where it does not matter: the default (half the
/// memory) would make a lane of these tiny models millions of blocks long.
const ROOMY: KvBudget = KvBudget::Bytes(32 << 20);

fn sched() -> SchedulerConfig {
    SchedulerConfig { kv_budget: ROOMY, ..SchedulerConfig::default() }
}

fn worker(cat: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 256,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        SchedulerConfig { block_size: BLOCK, max_running: 64, ..sched },
        cat,
    )
    .unwrap()
}

struct Req {
    rx: mpsc::UnboundedReceiver<GenEvent>,
    _cancel: Arc<AtomicBool>,
}

/// Submits a greedy request (EOS ignored) in `kv`'s lane (None: the model's own).
fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize, kv: Option<KvChoice>) -> Req {
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: 512, kv, ..GenParams::default() };
    w.submit(GenRequest {
        model: entry.clone(),
        prompt: prompt.to_vec(),
        params,
        hook: None,
        cancel: cancel.clone(),
        keep_alive: None,
        events: tx,
    })
    .unwrap();
    Req { rx, _cancel: cancel }
}

/// Reads a request to its end: its tokens, or its error.
fn collect(r: &mut Req) -> Result<Vec<u32>, WorkerError> {
    let mut ids = Vec::new();
    loop {
        match r.rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(_) => return Ok(ids),
            GenEvent::Error(e) => return Err(e),
            _ => {}
        }
    }
}

fn run(w: &Worker, cat: &ModelCatalog, model: &str, prompt: &[u32], max_tokens: usize, kv: Option<KvChoice>) -> Vec<u32> {
    let label = kv.as_ref().map(KvChoice::label).unwrap_or_default();
    collect(&mut submit(w, &cat.get(model).unwrap(), prompt, max_tokens, kv))
        .unwrap_or_else(|e| panic!("{model} kv {label}: {e}"))
}

/// A prompt of `n` token ids below both models' vocabularies (256).
fn prompt(seed: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 13 + seed * 37) % 240 + 5) as u32).collect()
}

/// The stats label of `model`'s lane for `kv` (the model id is the default lane).
fn label(model: &str, kv: &KvChoice) -> String {
    let key = if kv.k == kv.v { kv.k.clone().unwrap() } else { format!("{}/{}", kv.k.as_ref().unwrap(), kv.v.as_ref().unwrap()) };
    if key == "f32" {
        model.to_string() // the tiny models' own family on the CPU
    } else {
        format!("{model} kv={key}")
    }
}

fn wait_idle(w: &Worker) -> EngineStats {
    let t0 = Instant::now();
    loop {
        let s = w.stats();
        if s.running == 0 && s.waiting == 0 && w.open_requests().load(Ordering::SeqCst) == 0 {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "engine did not go idle: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lane(stats: &EngineStats, label: &str) -> BlockStats {
    stats
        .blocks
        .iter()
        .find(|(l, _)| l == label)
        .map(|(_, b)| b.clone())
        .unwrap_or_else(|| panic!("no lane `{label}` in {:?}", stats.blocks.iter().map(|b| &b.0).collect::<Vec<_>>()))
}

/// Bytes one token takes in `model`'s pool with `kv` (all layers, K and V).
fn bytes_per_token(model: &str, kv: &KvChoice) -> usize {
    let reg = common::registry();
    let m = LoadedModel::load(&common::fixture(&format!("models/{model}")), &reg).unwrap();
    let (k, v) = kv_family::resolve(&reg, &m.spec, m.kv.0.dims.dtype, kv, None).unwrap();
    m.spec.num_layers as usize * (k.bytes_per_slot() + v.bytes_per_slot())
}

/// (a) Two requests of every case (ragged prompts) and two of each model's
/// own family, all at once: one batch of every family. Each request's tokens
/// equal its family run alone; the default lane's equal `rmlx generate`.
#[test]
fn mixed_families_in_one_batch_equal_each_family_alone() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig { prefix_cache: false, ..sched() });
    let max_tokens = 10;
    let mut jobs: Vec<(&str, Option<KvChoice>, Vec<u32>)> = Vec::new();
    for (i, (model, kv)) in cases().into_iter().enumerate() {
        jobs.push((model, Some(kv.clone()), prompt(i, 9 + i % 5)));
        jobs.push((model, Some(kv), prompt(i + 100, 17 + i % 7)));
    }
    for (i, model) in [LLAMA, BONSAI].into_iter().enumerate() {
        jobs.push((model, None, prompt(200 + i, 13)));
        jobs.push((model, None, prompt(300 + i, 20)));
    }
    let alone: Vec<Vec<u32>> = jobs.iter().map(|(m, kv, p)| run(&w, &cat, m, p, max_tokens, kv.clone())).collect();
    let before = wait_idle(&w).max_running;
    assert_eq!(before, 1, "the solo runs overlapped");
    let mut reqs: Vec<Req> =
        jobs.iter().map(|(m, kv, p)| submit(&w, &cat.get(m).unwrap(), p, max_tokens, kv.clone())).collect();
    let together: Vec<Vec<u32>> = reqs.iter_mut().map(|r| collect(r).unwrap()).collect();
    let stats = wait_idle(&w);
    assert_eq!(stats.max_running, jobs.len(), "the requests did not all run at once: {stats:?}");
    for (i, (model, kv, p)) in jobs.iter().enumerate() {
        let name = kv.as_ref().map(KvChoice::label).unwrap_or_else(|| "default".into());
        assert_eq!(together[i].len(), max_tokens, "{model} {name}");
        assert_eq!(together[i], alone[i], "{model} kv {name} (job {i}): in the mixed batch differs from alone");
        if kv.is_none() {
            assert_eq!(alone[i], common::greedy_reference(model, p, max_tokens), "{model}: default lane differs from rmlx generate");
        } else {
            // The family really ran in a lane of its own.
            lane(&stats, &label(model, kv.as_ref().unwrap()));
        }
    }
}

/// (b) Within every family a prefix-cache hit gives the miss's tokens, and
/// one family's cached blocks never serve another: each lane's first run of
/// the same prompt is a miss even though other lanes cached it before.
#[test]
fn prefix_hit_equals_miss_within_each_family() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, sched());
    let shared = prompt(7, 33);
    for (model, kv) in cases() {
        let name = kv.label();
        let miss = run(&w, &cat, model, &shared, 8, Some(kv.clone()));
        let after_miss = lane(&wait_idle(&w), &label(model, &kv));
        assert_eq!(after_miss.prefix_hits, 0, "{model} {name}: another family's blocks served it: {after_miss:?}");
        let hit = run(&w, &cat, model, &shared, 8, Some(kv.clone()));
        let after_hit = lane(&wait_idle(&w), &label(model, &kv));
        assert_eq!(after_hit.prefix_hits, 1, "{model} {name}: no prefix hit: {after_hit:?}");
        assert!(after_hit.prefix_hit_tokens >= 32, "{model} {name}: {after_hit:?}");
        assert_eq!(hit, miss, "{model} {name}: a prefix-cache hit differs from the miss");
        // A longer prompt sharing the prefix: a partial hit equals its own miss
        // in a fresh worker with no cache.
        let mut longer = shared.clone();
        longer.extend(prompt(8, 11));
        let partial = run(&w, &cat, model, &longer, 6, Some(kv.clone()));
        let cold = worker(&cat, SchedulerConfig { prefix_cache: false, ..sched() });
        assert_eq!(partial, run(&cold, &cat, model, &longer, 6, Some(kv.clone())), "{model} {name}: partial hit differs");
    }
}

/// (c) The SSD tier stores a family's encoded blocks and gives them back:
/// A's blocks are spilled when B needs the whole memory budget, A again reads
/// them from disk and gives the same tokens.
#[test]
fn ssd_tier_round_trips_encoded_blocks_of_every_family() {
    let _g = common::mlx_lock();
    let cat = catalog();
    for (model, kv) in cases() {
        let name = kv.label();
        let tmp = tempfile::tempdir().unwrap();
        let block_bytes = (bytes_per_token(model, &kv) * BLOCK) as u64;
        let w = worker(
            &cat,
            SchedulerConfig {
                kv_budget: KvBudget::Bytes(block_bytes * 16),
                ssd: Some(SsdConfig { dir: tmp.path().to_path_buf(), max_bytes: 1 << 30 }),
                ..sched()
            },
        );
        let a = prompt(1, 50);
        let first = run(&w, &cat, model, &a, 8, Some(kv.clone()));
        run(&w, &cat, model, &prompt(2, 120), 8, Some(kv.clone()));
        let spilled = lane(&wait_idle(&w), &label(model, &kv));
        assert!(spilled.ssd_writes >= 6, "{model} {name}: A's blocks were not spilled: {spilled:?}");
        let again = run(&w, &cat, model, &a, 8, Some(kv.clone()));
        let back = lane(&wait_idle(&w), &label(model, &kv));
        assert!(back.ssd_reads > spilled.ssd_reads, "{model} {name}: no block came from disk: {back:?}");
        assert_eq!(again, first, "{model} {name}: blocks read back from the SSD tier give other tokens");
    }
}

/// (d) Many requests of several families under a budget that holds only a
/// few of them: preempted and requeued, every request completes with the
/// tokens it gives alone.
#[test]
fn preemption_under_a_small_budget_completes_every_request() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let families = [one("f32"), one("fp8"), one("turbo3"), one("planar4"), pair("fp8", "turbo3")];
    let max_tokens = 24;
    let jobs: Vec<(KvChoice, Vec<u32>)> = families
        .iter()
        .enumerate()
        .flat_map(|(i, kv)| (0..3).map(move |j| (kv.clone(), prompt(10 * i + j, 12 + 3 * j))))
        .collect();
    let roomy = worker(&cat, SchedulerConfig { prefix_cache: false, ..sched() });
    let alone: Vec<Vec<u32>> = jobs.iter().map(|(kv, p)| run(&roomy, &cat, LLAMA, p, max_tokens, Some(kv.clone()))).collect();
    drop(roomy);
    // 8 blocks of f32 (a request takes up to 6): far less than the 15 need.
    let f32_block = (bytes_per_token(LLAMA, &one("f32")) * BLOCK) as u64;
    let w = worker(&cat, SchedulerConfig { kv_budget: KvBudget::Bytes(f32_block * 8), ..sched() });
    let mut reqs: Vec<Req> =
        jobs.iter().map(|(kv, p)| submit(&w, &cat.get(LLAMA).unwrap(), p, max_tokens, Some(kv.clone()))).collect();
    for (i, r) in reqs.iter_mut().enumerate() {
        let out = collect(r).unwrap_or_else(|e| panic!("request {i} ({}) failed: {e}", jobs[i].0.label()));
        assert_eq!(out, alone[i], "request {i} ({}) differs from alone", jobs[i].0.label());
    }
    let stats = wait_idle(&w);
    let preemptions: u64 = stats.blocks.iter().map(|(_, b)| b.preemptions).sum();
    assert!(preemptions > 0, "nothing was preempted: {stats:?}");
    assert!(stats.kv_used_bytes <= stats.kv_budget_bytes, "{stats:?}");
    for (l, b) in &stats.blocks {
        assert_eq!(b.seq_blocks, 0, "{l}: blocks still held after every request ended: {b:?}");
    }
}

/// (e) At one budget, each family's lane holds budget / its real bytes per
/// block, and that many one-block requests run at once: a compressed family
/// admits proportionally more concurrent tokens than f32 (and f16).
#[test]
fn compressed_families_admit_proportionally_more_at_one_budget() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let dense = bytes_per_token(LLAMA, &one("f32"));
    let budget = (dense * BLOCK * 6) as u64; // 6 blocks of f32
    let n = 64; // requests of one block each (7 prompt tokens, 1 generated)
    let mut seen = Vec::new();
    for fam in ["f32", "f16", "fp8", "turbo4", "turbo3", "turbo2", "iso3"] {
        let kv = one(fam);
        let per_block = bytes_per_token(LLAMA, &kv) * BLOCK;
        let w = worker(&cat, SchedulerConfig { kv_budget: KvBudget::Bytes(budget), prefix_cache: false, ..sched() });
        let mut reqs: Vec<Req> = (0..n).map(|i| submit(&w, &cat.get(LLAMA).unwrap(), &prompt(i, 7), 1, Some(kv.clone()))).collect();
        for r in reqs.iter_mut() {
            assert_eq!(collect(r).unwrap().len(), 1);
        }
        let stats = wait_idle(&w);
        let total = lane(&stats, &label(LLAMA, &kv)).total_blocks;
        assert_eq!(total, budget as usize / per_block, "{fam}: the lane's blocks are not budget / its bytes per block");
        assert_eq!(stats.max_running, total.min(n), "{fam}: {} requests ran at once, the budget holds {total}", stats.max_running);
        seen.push((fam, per_block, stats.max_running));
    }
    let (_, f32_bytes, f32_running) = seen[0];
    assert_eq!(f32_running, 6);
    for &(fam, bytes, running) in &seen[1..] {
        // Concurrent sequences scale with the inverse of bytes per token
        // (exactly, up to whole blocks).
        assert_eq!(running, (6 * f32_bytes / bytes).min(n), "{fam}: {running} at once vs {f32_running} for f32");
        assert!(running > f32_running, "{fam}");
    }
    let turbo3 = seen.iter().find(|s| s.0 == "turbo3").unwrap();
    assert!(turbo3.2 >= 4 * f32_running, "turbo3 admits only {} vs {f32_running}", turbo3.2);
}

/// A family the model's shape does not fit (affine on head_dim 16) fails
/// that request alone with a message naming `kv_cache`; others go on.
#[test]
fn a_family_that_does_not_fit_the_model_fails_only_its_request() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, sched());
    let entry = cat.get(LLAMA).unwrap();
    let mut bad = submit(&w, &entry, &prompt(1, 9), 4, Some(one("q4")));
    let mut good = submit(&w, &entry, &prompt(2, 9), 4, Some(one("turbo3")));
    match collect(&mut bad) {
        Err(WorkerError::BadField { field, message }) => {
            assert_eq!(field, "kv_cache");
            assert!(message.contains("q4") && message.contains("head_dim 16"), "{message}");
        }
        other => panic!("expected a kv_cache error, got {other:?}"),
    }
    assert_eq!(collect(&mut good).unwrap().len(), 4);
    // A side left out takes the model's own: keys turbo3, values f32.
    let half = KvChoice { k: Some("turbo3".into()), v: None };
    run(&w, &cat, LLAMA, &prompt(3, 9), 4, Some(half));
    lane(&wait_idle(&w), &format!("{LLAMA} kv=turbo3/f32"));
}

/// A panic in one lane's step fails that lane's requests only: the model's
/// other lane goes on to the tokens it gives alone, both lanes' blocks are
/// given back, and the failed lane serves the next request as before.
#[test]
fn a_panic_in_one_lanes_step_fails_that_lane_only() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, sched());
    let entry = cat.get(LLAMA).unwrap();
    let (pa, pb) = (prompt(1, 9), prompt(2, 11));
    let want_a = run(&w, &cat, LLAMA, &pa, 6, None);
    let want_b = run(&w, &cat, LLAMA, &pb, 150, Some(one("turbo3")));
    // Lanes step in order: the model's own (f32) before turbo3.
    let mut a = submit(&w, &entry, &pa, 400, None);
    let mut b = submit(&w, &entry, &pb, 150, Some(one("turbo3")));
    let first = |r: &mut Req| loop {
        if let GenEvent::Token { id, .. } = r.rx.blocking_recv().expect("engine hung up") {
            return id;
        }
    };
    first(&mut a);
    let b0 = first(&mut b);
    w.inject_panic(rmlx::engine::worker::EnginePanic::Step(LLAMA.into()));
    match collect(&mut a) {
        Err(WorkerError::Internal(m)) => assert!(m.contains("injected panic"), "{m}"),
        other => panic!("the f32 lane's request should fail: {other:?}"),
    }
    let mut got_b = vec![b0];
    got_b.extend(collect(&mut b).expect("the turbo3 lane's request failed"));
    assert_eq!(got_b, want_b, "the other lane was disturbed");
    assert_eq!(run(&w, &cat, LLAMA, &pa, 6, None), want_a, "the failed lane does not serve as before");
    let s = wait_idle(&w);
    assert!(s.blocks.iter().all(|(_, b)| b.seq_blocks == 0), "{s:?}");
    assert!(w.health().last_panic.unwrap().contains("injected panic"));
}
