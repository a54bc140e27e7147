//! Faults on the engine thread never stop the server: a client's value that
//! overflows, a forward that fails or panics in the middle of a batch, a
//! panic in a step or in the loop, a panicking logits hook. The request that
//! hit the fault fails; the others go on with unchanged output, the KV pool
//! and the prefix cache stay right, and /health tells the engine's state.
mod common;

use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{
    EnginePanic, FinishReason, GenEvent, GenParams, GenRequest, KeepAlive, LogitsHook, ModelCatalog, ModelEntry,
    Worker, WorkerConfig, WorkerError,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn lib(name: &str) -> String {
    format!("lib{name}.{}", rmlx::plugins::loader::LIB_EXT)
}

/// The shipped plugins plus the faulty test plugin (links in a temp dir).
fn plugins_with_faulty() -> tempfile::TempDir {
    let faulty = common::test_plugins_dir().join(lib("rmlx_test_faulty"));
    assert!(faulty.exists(), "{} missing: run `make build`", faulty.display());
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::plugins_dir()).unwrap() {
        let p = e.unwrap().path();
        std::os::unix::fs::symlink(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    std::os::unix::fs::symlink(&faulty, dir.path().join(lib("rmlx_test_faulty"))).unwrap();
    dir
}

/// The tiny llama's files with config.json for the faulty architecture.
fn write_faulty_model(dir: &Path, trigger: u32, mode: &str) {
    for e in std::fs::read_dir(common::fixture("models/llama-f32")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "config.json" {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let src = std::fs::read_to_string(common::fixture("models/llama-f32/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&src).unwrap();
    cfg["model_type"] = "rmlx_faulty".into();
    cfg["faulty_trigger"] = trigger.into();
    cfg["faulty_mode"] = mode.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn catalog(models: &[(&str, PathBuf)]) -> ModelCatalog {
    let list: Vec<_> = models.iter().map(|(id, p)| (Some(id.to_string()), p.clone())).collect();
    ModelCatalog::discover(&list, &[]).unwrap()
}

fn worker_in(plugins: &Path, catalog: &ModelCatalog, idle_timeout: Option<Duration>) -> Worker {
    Worker::start_with(
        WorkerConfig {
            plugins_dir: plugins.to_path_buf(),
            max_queue_depth: 64,
            max_loaded_models: 2,
            idle_timeout,
            prefill_chunk: 512,
        },
        SchedulerConfig::default(),
        catalog,
    )
    .unwrap()
}

struct Req {
    rx: mpsc::UnboundedReceiver<GenEvent>,
}

fn submit_with(
    w: &Worker,
    entry: &Arc<ModelEntry>,
    prompt: &[u32],
    max_tokens: usize,
    hook: Option<Box<dyn LogitsHook>>,
    keep_alive: Option<KeepAlive>,
) -> Req {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, ..GenParams::default() };
    w.submit(GenRequest {
        model: entry.clone(),
        prompt: prompt.to_vec(),
        params,
        hook,
        cancel: Arc::new(AtomicBool::new(false)),
        keep_alive,
        events: tx,
    })
    .unwrap();
    Req { rx }
}

fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize) -> Req {
    submit_with(w, entry, prompt, max_tokens, None, None)
}

/// Reads to the end: the tokens, and how it ended.
fn finish(r: &mut Req) -> (Vec<u32>, Result<FinishReason, WorkerError>) {
    let mut ids = Vec::new();
    loop {
        match r.rx.blocking_recv() {
            Some(GenEvent::Token { id, .. }) => ids.push(id),
            Some(GenEvent::Done(f)) => return (ids, Ok(f.reason)),
            Some(GenEvent::Error(e)) => return (ids, Err(e)),
            Some(_) => {}
            None => return (ids, Err(WorkerError::Internal("the engine dropped the request".into()))),
        }
    }
}

fn tokens(r: &mut Req) -> Vec<u32> {
    let (ids, end) = finish(r);
    assert_eq!(end.expect("the request failed"), FinishReason::Length);
    ids
}

/// Waits for a request's first token (it is then decoding in the batch).
fn first_token(r: &mut Req) -> u32 {
    loop {
        match r.rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => return id,
            GenEvent::Error(e) => panic!("request failed: {e}"),
            GenEvent::Done(_) => panic!("request ended before its first token"),
            _ => {}
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
        assert!(t0.elapsed() < Duration::from_secs(60), "engine did not go idle: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Prompts of a few lengths, ids in 3..250 (the fixtures' vocabulary is 256).
fn prompts() -> Vec<Vec<u32>> {
    [20usize, 35, 50]
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| ((i * 13 + k * 37 + 5) % 240 + 3) as u32).collect())
        .collect()
}

fn internal(end: &Result<FinishReason, WorkerError>) -> String {
    match end {
        Err(WorkerError::Internal(m)) => m.clone(),
        other => panic!("expected an internal error, got {other:?}"),
    }
}

/// One HTTP request: (status, JSON body).
fn http(method: &str, url: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let mut r = c.request(method.parse().unwrap(), url);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(serde_json::Value::Null))
    })
}

// ---------------------------------------------------------------- keep_alive

/// A keep-alive past what an `Instant` can hold (1e19 s, `Duration::MAX`) is
/// forever: the engine neither panics nor stops serving.
#[test]
fn keep_alive_past_an_instant_is_forever() {
    let _g = common::mlx_lock();
    let cat = catalog(&[("llama", common::fixture("models/llama-f32"))]);
    let e = cat.get("llama").unwrap();
    let w = worker_in(&common::plugins_dir(), &cat, Some(Duration::from_secs(u64::MAX)));
    for ka in [Duration::from_secs_f64(1e19), Duration::MAX] {
        let mut r = submit_with(&w, &e, &[1, 2, 3], 3, None, Some(KeepAlive::For(ka)));
        assert_eq!(tokens(&mut r).len(), 3);
        wait_idle(&w);
        let loaded = w.loaded();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].expires_at, None, "a keep-alive past the clock's range never expires");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(w.load(e.clone(), Some(KeepAlive::For(Duration::MAX)))).unwrap();
    // The engine still serves; the server's idle timeout of u64::MAX s too.
    let mut r = submit(&w, &e, &[4, 5, 6], 2);
    assert_eq!(tokens(&mut r).len(), 2);
    assert!(w.health().down.is_none());
}

// ---------------------------------------------------------------- a failing forward

/// Greedy outputs of `prompts` on the faulty model, each alone, with a
/// trigger no input holds.
fn references(plugins: &Path, model: &Path, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    write_faulty_model(model, u32::MAX, "bad_kv");
    let cat = catalog(&[("faulty", model.to_path_buf())]);
    let e = cat.get("faulty").unwrap();
    let w = worker_in(plugins, &cat, None);
    prompts.iter().map(|p| tokens(&mut submit(&w, &e, p, n))).collect()
}

/// One request's input breaks the batched forward (per `mode`): it fails with
/// an internal error, the sequences decoding beside it go on with the output
/// they have alone, and afterwards the prefix cache serves the same KV.
fn a_failing_forward_fails_only_its_request(mode: &str) {
    let _g = common::mlx_lock();
    let plugins = plugins_with_faulty();
    let model = tempfile::tempdir().unwrap();
    let ps = prompts();
    let n = 150;
    let refs = references(plugins.path(), model.path(), &ps, n);
    // A trigger no prompt or reference output holds.
    let used: Vec<u32> = ps.iter().chain(&refs).flatten().copied().collect();
    let trigger = (3..250u32).find(|t| !used.contains(t)).expect("an unused token id");
    write_faulty_model(model.path(), trigger, mode);
    let cat = catalog(&[("faulty", model.path().to_path_buf())]);
    let e = cat.get("faulty").unwrap();
    let w = worker_in(plugins.path(), &cat, None);
    // The others are decoding when the faulty one joins their batch: its
    // last prompt token (the first decode step's input) is the trigger.
    let mut reqs: Vec<Req> = ps.iter().map(|p| submit(&w, &e, p, n)).collect();
    let firsts: Vec<u32> = reqs.iter_mut().map(first_token).collect();
    let mut bad = submit(&w, &e, &[7, 8, 9, 10, trigger], 5);
    let (_, end) = finish(&mut bad);
    let msg = internal(&end);
    assert!(msg.contains("faulty") || msg.contains("do not fit the KV pool"), "{msg}");
    for (i, r) in reqs.iter_mut().enumerate() {
        let mut got = vec![firsts[i]];
        got.extend(tokens(r));
        assert_eq!(got, refs[i], "prompt {i}: output changed by another request's failed forward ({mode})");
    }
    wait_idle(&w);
    // The KV pool and the prefix cache are intact: the same prompts again
    // (their blocks come from the prefix cache) give the same output.
    for (p, want) in ps.iter().zip(&refs) {
        assert_eq!(&tokens(&mut submit(&w, &e, p, n)), want, "after the failure ({mode})");
    }
    let s = w.stats();
    assert!(s.blocks[0].1.prefix_hits >= ps.len() as u64, "{s:?}");
    // No block is left held by the failed request.
    wait_idle(&w);
    assert_eq!(w.stats().blocks[0].1.seq_blocks, 0);
    assert!(w.health().down.is_none());
}

#[test]
fn a_kv_write_error_mid_batch_fails_only_its_request() {
    a_failing_forward_fails_only_its_request("bad_kv");
}

#[test]
fn a_plugin_error_mid_batch_fails_only_its_request() {
    a_failing_forward_fails_only_its_request("error");
}

#[test]
fn a_plugin_panic_mid_batch_fails_only_its_request() {
    a_failing_forward_fails_only_its_request("panic");
}

/// A prompt that breaks the batched prefill forward it shares with others
/// (its trigger token mid-prompt, a KV write the host refuses after layer 0
/// already wrote the batch): the batch is retried row by row
/// (engine/scheduler/prefill.rs), so only that request fails, and the
/// prompts prefilled beside it answer as they do alone.
#[test]
fn a_failing_row_of_a_batched_prefill_fails_alone() {
    let _g = common::mlx_lock();
    let plugins = plugins_with_faulty();
    let model = tempfile::tempdir().unwrap();
    let ps = prompts();
    let n = 12;
    let refs = references(plugins.path(), model.path(), &ps, n);
    let used: Vec<u32> = ps.iter().chain(&refs).flatten().copied().collect();
    let trigger = (3..250u32).find(|t| !used.contains(t)).expect("an unused token id");
    write_faulty_model(model.path(), trigger, "bad_kv");
    let cat = catalog(&[("faulty", model.path().to_path_buf())]);
    let e = cat.get("faulty").unwrap();
    let w = worker_in(plugins.path(), &cat, None);
    // 48 tokens, the trigger at 10: one prefill group with the 20-, 35- and 50-token prompts.
    let mut bad_prompt: Vec<u32> = (0..48).map(|i| (i * 5 % 200 + 3) as u32).filter(|t| *t != trigger).collect();
    bad_prompt[10] = trigger;
    let mut reqs: Vec<Req> = ps.iter().map(|p| submit(&w, &e, p, n)).collect();
    let mut bad = submit(&w, &e, &bad_prompt, n);
    let (_, end) = finish(&mut bad);
    assert!(internal(&end).contains("do not fit the KV pool"), "{end:?}");
    for (i, r) in reqs.iter_mut().enumerate() {
        assert_eq!(tokens(r), refs[i], "prompt {i}: changed by another prompt's failed prefill");
    }
    wait_idle(&w);
    assert_eq!(w.stats().blocks[0].1.seq_blocks, 0);
}

// ---------------------------------------------------------------- panics on the engine thread

/// A logits hook that panics at its `n`th token.
struct PanickingHook {
    n: usize,
}

impl LogitsHook for PanickingHook {
    fn apply(&mut self, _logits: &mut [f32]) -> anyhow::Result<()> {
        if self.n == 0 {
            panic!("hook panicked");
        }
        self.n -= 1;
        Ok(())
    }
    fn commit(&mut self, _token: u32) -> anyhow::Result<()> {
        Ok(())
    }
}

fn two_models() -> ModelCatalog {
    catalog(&[("llama", common::fixture("models/llama-f32")), ("qwen3", common::fixture("models/qwen3-f32"))])
}

/// A panic in a request's own code (its logits hook) fails that request;
/// the one decoding beside it is unchanged.
#[test]
fn a_panicking_logits_hook_fails_only_its_request() {
    let _g = common::mlx_lock();
    let cat = two_models();
    let e = cat.get("llama").unwrap();
    let want = common::greedy_reference("llama-f32", &[5, 6, 7], 40);
    let w = worker_in(&common::plugins_dir(), &cat, None);
    let mut good = submit(&w, &e, &[5, 6, 7], 40);
    let mut bad = submit_with(&w, &e, &[5, 6, 7, 8], 40, Some(Box::new(PanickingHook { n: 3 })), None);
    let (ids, end) = finish(&mut bad);
    assert_eq!(ids.len(), 3);
    assert!(internal(&end).contains("hook panicked"));
    assert_eq!(tokens(&mut good), want);
    assert!(w.health().down.is_none());
}

/// A panic in one model's step fails that model's running requests (with an
/// internal error); the other model's request is unchanged, and the model
/// serves new requests right after, with its blocks all given back.
#[test]
fn a_panic_in_a_step_fails_that_models_requests_only() {
    let _g = common::mlx_lock();
    let cat = two_models();
    let (llama, qwen) = (cat.get("llama").unwrap(), cat.get("qwen3").unwrap());
    let want_q = common::greedy_reference("qwen3-f32", &[9, 8, 7, 6], 120);
    let want_l = common::greedy_reference("llama-f32", &[3, 4, 5], 10);
    let w = worker_in(&common::plugins_dir(), &cat, None);
    let mut q = submit(&w, &qwen, &[9, 8, 7, 6], 120);
    let mut l = submit(&w, &llama, &[3, 4, 5, 6, 7], 200);
    let q0 = first_token(&mut q);
    first_token(&mut l);
    w.inject_panic(EnginePanic::Step("llama".into()));
    let (_, end) = finish(&mut l);
    assert!(internal(&end).contains("injected panic"));
    let mut got = vec![q0];
    got.extend(tokens(&mut q));
    assert_eq!(got, want_q);
    assert_eq!(tokens(&mut submit(&w, &llama, &[3, 4, 5], 10)), want_l);
    wait_idle(&w);
    let s = w.stats();
    assert!(s.blocks.iter().all(|(_, b)| b.seq_blocks == 0), "{s:?}");
    let h = w.health();
    assert!(h.down.is_none() && h.restarts == 0, "{h:?}");
    assert!(h.last_panic.unwrap().contains("injected panic"));
}

/// A panic that escapes the loop fails the requests in the engine; the loop
/// restarts and serves the next request as before.
#[test]
fn the_engine_loop_restarts_after_a_panic() {
    let _g = common::mlx_lock();
    let cat = two_models();
    let e = cat.get("llama").unwrap();
    let want = common::greedy_reference("llama-f32", &[3, 4, 5], 10);
    let w = worker_in(&common::plugins_dir(), &cat, None);
    let mut r = submit(&w, &e, &[3, 4, 5, 6], 400);
    first_token(&mut r);
    w.inject_panic(EnginePanic::Loop);
    let (_, end) = finish(&mut r);
    assert!(internal(&end).contains("injected panic"));
    assert_eq!(tokens(&mut submit(&w, &e, &[3, 4, 5], 10)), want);
    let h = w.health();
    assert!(h.down.is_none(), "{h:?}");
    assert_eq!(h.restarts, 1);
}

/// /health: 200 while the engine serves, 503 with the reason once its
/// thread has stopped.
#[test]
fn health_is_503_when_the_engine_cannot_serve() {
    let _g = common::mlx_lock();
    let cat = Arc::new(two_models());
    let w = worker_in(&common::plugins_dir(), &cat, None);
    let state = Arc::new(rmlx::api::AppState {
        catalog: cat.clone(),
        worker: w.clone(),
        opts: rmlx::api::ServerOptions::default(),
    });
    let base = common::serve(state);
    let get = || http("GET", &format!("{base}/health"), None);
    let (code, body) = get();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ok");
    w.shutdown();
    let (code, body) = get();
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert!(body["reason"].as_str().unwrap().contains("stopped"), "{body}");
}

// ---------------------------------------------------------------- unload

/// POST /v1/models/{id}/unload while a request runs on the model: a 409
/// (`model_busy`) and the request goes on untouched; with `force` (query or
/// body) the model unloads and the request ends with an error.
#[test]
fn unload_of_a_busy_model_is_409_unless_forced() {
    let _g = common::mlx_lock();
    let cat = Arc::new(two_models());
    let e = cat.get("llama").unwrap();
    let want = common::greedy_reference("llama-f32", &[3, 4, 5], 300);
    let w = worker_in(&common::plugins_dir(), &cat, None);
    let state = Arc::new(rmlx::api::AppState { catalog: cat.clone(), worker: w.clone(), opts: rmlx::api::ServerOptions::default() });
    let base = common::serve(state);
    let url = format!("{base}/v1/models/llama/unload");
    // Busy: refused, nothing changes.
    let mut r = submit(&w, &e, &[3, 4, 5], 300);
    let t0 = first_token(&mut r);
    let (code, body) = http("POST", &url, None);
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "model_busy", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("force"), "{body}");
    let mut got = vec![t0];
    got.extend(tokens(&mut r));
    assert_eq!(got, want, "the running request is untouched");
    assert_eq!(w.loaded().len(), 1);
    // Forced, by query and by body: the running request ends with an error.
    for (u, b) in [(format!("{url}?force=true"), None), (url.clone(), Some(serde_json::json!({"force": true})))] {
        let mut r = submit(&w, &e, &[3, 4, 5], 300);
        first_token(&mut r);
        let (code, body) = http("POST", &u, b);
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["loaded"], false, "{body}");
        let (_, end) = finish(&mut r);
        assert!(internal(&end).contains("unloaded"));
        assert!(w.loaded().is_empty());
    }
    // Idle: unloads.
    assert_eq!(tokens(&mut submit(&w, &e, &[3, 4, 5], 5)), want[..5]);
    wait_idle(&w);
    let (code, body) = http("POST", &url, Some(serde_json::json!({})));
    assert_eq!(code, 200, "{body}");
    assert!(w.loaded().is_empty());
}

// ---------------------------------------------------------------- one KV budget

/// Two loaded models draw from the one --kv-budget: the second model's
/// prompts take room from the first model's idle prefix-cache blocks, and
/// the blocks the engine keeps never pass the budget.
#[test]
fn two_models_share_one_kv_budget() {
    let _g = common::mlx_lock();
    let cat = two_models();
    let (llama, qwen) = (cat.get("llama").unwrap(), cat.get("qwen3").unwrap());
    // Both tiny models: 2 layers x 2 kv heads x 16 dims x 16 tokens x 4 bytes x (k, v).
    let block = 2 * 2 * 2 * 16 * 16 * 4u64;
    let budget = 48 * block;
    let w = Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 64,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        SchedulerConfig { kv_budget: rmlx::engine::scheduler::KvBudget::Bytes(budget), ..SchedulerConfig::default() },
        &cat,
    )
    .unwrap();
    let long = |k: u32, n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 7 + k * 11) % 240 + 3).collect() };
    // llama keeps 3 x 9 = 27 blocks in its prefix cache.
    for k in 0..3 {
        tokens(&mut submit(&w, &llama, &long(k, 150), 1));
    }
    wait_idle(&w);
    let cached = |w: &Worker, id: &str| w.stats().blocks.iter().find(|(m, _)| m == id).map(|(_, b)| b.clone()).unwrap();
    assert!(cached(&w, "llama").cached_blocks >= 27);
    // qwen3 needs 2 x 13 = 26 blocks at once: only 21 are left in the budget.
    let ps = [long(5, 200), long(6, 200)];
    let wants: Vec<Vec<u32>> = ps.iter().map(|p| common::greedy_reference("qwen3-f32", p, 4)).collect();
    let mut reqs: Vec<Req> = ps.iter().map(|p| submit(&w, &qwen, p, 4)).collect();
    for (r, want) in reqs.iter_mut().zip(&wants) {
        assert_eq!(&tokens(r), want);
    }
    wait_idle(&w);
    let s = w.stats();
    assert_eq!(s.kv_budget_bytes, budget);
    assert!(s.kv_used_bytes <= budget, "{s:?}");
    let l = cached(&w, "llama");
    assert!(l.evictions > 0, "llama's idle blocks made room for qwen3: {l:?}");
    let kept: u64 = s.blocks.iter().map(|(_, b)| b.cached_blocks as u64 * b.block_bytes).sum();
    assert_eq!(kept, s.kv_used_bytes, "idle: what is charged is the cached blocks");
}

// ---------------------------------------------------------------- echo scoring

/// Scoring a prompt is one teacher-forced forward (no scheduler step runs),
/// and gives the log-probabilities a generation from the shorter prompt saw.
#[test]
fn scoring_a_prompt_is_one_forward_with_generations_logprobs() {
    let _g = common::mlx_lock();
    let cat = two_models();
    let e = cat.get("llama").unwrap();
    let w = worker_in(&common::plugins_dir(), &cat, None);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens: 3, ignore_eos: true, logprobs: Some(2), ..GenParams::default() };
    w.submit(GenRequest { model: e.clone(), prompt: vec![1, 5, 9], params, hook: None, cancel: Arc::new(AtomicBool::new(false)), keep_alive: None, events: tx }).unwrap();
    let mut gen = Vec::new();
    loop {
        match rx.blocking_recv().unwrap() {
            GenEvent::Token { id, logprob, .. } => gen.push((id, logprob.unwrap())),
            GenEvent::Done(_) => break,
            GenEvent::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    wait_idle(&w);
    let steps = w.stats().steps;
    let prompt: Vec<u32> = [1, 5, 9].into_iter().chain(gen.iter().map(|g| g.0)).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scores = rt.block_on(w.score(e.clone(), prompt.clone(), 2, None)).unwrap();
    assert_eq!(w.stats().steps, steps, "scoring runs no decode step");
    assert_eq!(scores.len(), prompt.len());
    assert!(scores[0].is_none());
    for (k, (_, lp)) in gen.iter().enumerate() {
        let (got, top) = scores[3 + k].clone().unwrap();
        assert!((got - lp.logprob).abs() < 1e-3, "token {k}: {got} vs {}", lp.logprob);
        let mut a: Vec<u32> = top.iter().map(|t| t.0).collect();
        let mut b: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert!(top[0].1 >= top[1].1, "most likely first");
    }
    // Out-of-vocabulary ids are an error, not a panic.
    assert!(rt.block_on(w.score(e.clone(), vec![1, 999], 0, None)).is_err());
}
