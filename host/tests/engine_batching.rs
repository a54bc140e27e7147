//! Continuous batching, the KV budget and the prefix cache, through the engine
//! API (Worker) and through the HTTP server, on the tiny fixture models.
//! Batched greedy output must equal one-at-a-time output token for token.
mod common;

use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::worker::{
    FinishReason, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const MODELS: [&str; 8] = [
    "llama-f32",
    "qwen2-f32",
    "qwen3-f32",
    "bitnet-f32",
    "bitnet-options-f32",
    "gemma3_text-f32",
    "qwen3_moe-f32",
    "qwen3_moe-q4-g64",
];

fn catalog() -> ModelCatalog {
    let list: Vec<_> = MODELS
        .iter()
        .map(|m| (None, common::fixture(&format!("models/{m}"))))
        .collect();
    ModelCatalog::discover(&list, &[]).unwrap()
}

fn worker(catalog: &ModelCatalog, sched: SchedulerConfig) -> Worker {
    Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 64,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        sched,
        catalog,
    )
    .unwrap()
}

/// Prompts of several lengths (token ids < 256, the fixtures' vocabulary).
fn prompts() -> Vec<Vec<u32>> {
    [1usize, 5, 17, 40, 3, 70]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32)
                .collect()
        })
        .collect()
}

struct Req {
    rx: mpsc::UnboundedReceiver<GenEvent>,
    cancel: Arc<AtomicBool>,
}

fn submit(
    w: &Worker,
    entry: &Arc<ModelEntry>,
    prompt: &[u32],
    max_tokens: usize,
    chunk: usize,
) -> Req {
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let params = GenParams {
        max_tokens,
        ignore_eos: true,
        prefill_chunk: chunk,
        ..GenParams::default()
    };
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
    Req { rx, cancel }
}

/// Reads to the end: (token ids, finish reason).
fn collect(r: &mut Req) -> (Vec<u32>, FinishReason) {
    let mut ids = Vec::new();
    loop {
        match r.rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(f) => return (ids, f.reason),
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// One at a time through the CLI's generate loop (rmlx generate).
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
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "engine did not go idle: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn batched_greedy_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    let cat = catalog();
    // No prefix cache here: a pure batching check.
    let w = worker(
        &cat,
        SchedulerConfig {
            prefix_cache: false,
            ..SchedulerConfig::default()
        },
    );
    let max_tokens = 24;
    for model in MODELS {
        let entry = cat.get(model).unwrap();
        let ps = prompts();
        // one at a time through the server engine
        let solo: Vec<Vec<u32>> = ps
            .iter()
            .map(|p| collect(&mut submit(&w, &entry, p, max_tokens, 512)).0)
            .collect();
        // all at once, small prefill chunks so prefill interleaves with decode
        let mut reqs: Vec<Req> = ps
            .iter()
            .map(|p| submit(&w, &entry, p, max_tokens, 8))
            .collect();
        let batched: Vec<Vec<u32>> = reqs.iter_mut().map(|r| collect(r).0).collect();
        for (i, p) in ps.iter().enumerate() {
            let want = reference(model, p, max_tokens);
            assert_eq!(
                solo[i], want,
                "{model} prompt {i}: server one-at-a-time differs from rmlx generate"
            );
            assert_eq!(
                batched[i], want,
                "{model} prompt {i}: batched differs from one-at-a-time"
            );
        }
        let s = w.stats();
        assert!(s.max_batch >= 4, "requests did not decode together: {s:?}");
    }
    wait_idle(&w);
}

#[test]
fn prefix_cache_hit_equals_miss() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(&cat, SchedulerConfig::default());
    let entry = cat.get("llama-f32").unwrap();
    let shared: Vec<u32> = (0..50).map(|i| (i * 13 % 240 + 5) as u32).collect();
    let mut a = shared.clone();
    a.extend([7, 8, 9]);
    let mut b = shared.clone();
    b.extend([11, 12]);
    let (out_a, _) = collect(&mut submit(&w, &entry, &a, 16, 512));
    let before = w.stats().blocks[0].1.clone();
    let (out_b, _) = collect(&mut submit(&w, &entry, &b, 16, 512));
    let after = w.stats().blocks[0].1.clone();
    assert!(
        after.prefix_hits > before.prefix_hits,
        "no prefix-cache hit: {after:?}"
    );
    assert!(
        after.prefix_hit_tokens >= before.prefix_hit_tokens + 48,
        "{after:?}"
    );
    assert_eq!(out_a, reference("llama-f32", &a, 16));
    assert_eq!(out_b, reference("llama-f32", &b, 16));
    // Multi-turn: the next turn's prompt is the previous prompt + reply + more.
    let mut turn2 = b.clone();
    turn2.extend(&out_b);
    turn2.extend([20, 21, 22]);
    let hits0 = after.prefix_hit_tokens;
    let (out_t2, _) = collect(&mut submit(&w, &entry, &turn2, 8, 512));
    let s = w.stats().blocks[0].1.clone();
    assert!(
        s.prefix_hit_tokens >= hits0 + 64,
        "generated tokens were not cached: {s:?}"
    );
    assert_eq!(out_t2, reference("llama-f32", &turn2, 8));
    wait_idle(&w);
}

#[test]
fn cancelled_stream_frees_its_blocks() {
    let _g = common::mlx_lock();
    let cat = catalog();
    let w = worker(
        &cat,
        SchedulerConfig {
            prefix_cache: false,
            ..SchedulerConfig::default()
        },
    );
    let entry = cat.get("qwen3-f32").unwrap();
    let mut r = submit(&w, &entry, &[1, 2, 3, 4], 400, 512);
    let mut seen = 0;
    while seen < 3 {
        if let GenEvent::Token { .. } = r.rx.blocking_recv().unwrap() {
            seen += 1;
        }
    }
    assert!(w.stats().blocks[0].1.seq_blocks > 0);
    // A client that goes away: drop the receiver.
    drop(r.rx);
    wait_idle(&w);
    let s = w.stats();
    assert_eq!(s.blocks[0].1.seq_blocks, 0, "{s:?}");
    // And by flag.
    let mut r = submit(&w, &entry, &[5, 6], 400, 512);
    while !matches!(r.rx.blocking_recv().unwrap(), GenEvent::Token { .. }) {}
    r.cancel.store(true, Ordering::SeqCst);
    let mut reason = None;
    while let Some(ev) = r.rx.blocking_recv() {
        if let GenEvent::Done(f) = ev {
            reason = Some(f.reason);
            break;
        }
    }
    assert_eq!(reason, Some(FinishReason::Cancelled));
    wait_idle(&w);
    assert_eq!(w.stats().blocks[0].1.seq_blocks, 0);
}

#[test]
fn small_kv_budget_queues_and_completes_everything() {
    let _g = common::mlx_lock();
    let cat = catalog();
    // llama-f32: 2 layers x 2 KV heads x hd 16 x f32 x (K and V) = 512 bytes per token.
    // 48 blocks of 8 tokens = 384 tokens: far less than 6 requests x ~110 tokens at once.
    let per_token = 2 * 2 * 16 * 4 * 2;
    let sched = SchedulerConfig {
        kv_budget: KvBudget::Bytes(per_token * 8 * 48),
        block_size: 8,
        ..SchedulerConfig::default()
    };
    let w = worker(&cat, sched);
    let entry = cat.get("llama-f32").unwrap();
    let ps: Vec<Vec<u32>> = prompts()
        .into_iter()
        .map(|mut p| {
            p.extend((0..40).map(|i| (i % 200 + 9) as u32));
            p
        })
        .collect();
    let max_tokens = 60;
    let mut reqs: Vec<Req> = ps
        .iter()
        .map(|p| submit(&w, &entry, p, max_tokens, 16))
        .collect();
    let outs: Vec<(Vec<u32>, FinishReason)> = reqs.iter_mut().map(collect).collect();
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(outs[i].1, FinishReason::Length);
        assert_eq!(
            outs[i].0,
            reference("llama-f32", p, max_tokens),
            "prompt {i}"
        );
    }
    wait_idle(&w);
    let s = w.stats();
    let b = &s.blocks[0].1;
    assert_eq!(b.total_blocks, 48);
    assert!(b.seq_blocks == 0 && b.cached_blocks <= 48, "{b:?}");
    assert!(s.max_batch >= 2, "{s:?}");
    assert!(
        b.preemptions >= 1,
        "the budget never forced a preemption: {b:?}"
    );
    // A prompt that can never fit is refused, not crashed on.
    let huge: Vec<u32> = (0..400).map(|i| (i % 200 + 3) as u32).collect();
    let mut r = submit(&w, &entry, &huge, 4, 512);
    loop {
        match r.rx.blocking_recv().unwrap() {
            GenEvent::Error(e) => {
                assert!(e.to_string().contains("kv-budget"), "{e}");
                break;
            }
            GenEvent::Done(f) => panic!("should not fit: {f:?}"),
            _ => {}
        }
    }
}

/// Serves the fixtures on 127.0.0.1:0; returns the base URL.
fn spawn_server(max_queue_depth: usize) -> String {
    use rmlx::api::{self, AppState, ServerOptions};
    let cat = catalog();
    let w = Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 16,
        },
        SchedulerConfig::default(),
        &cat,
    )
    .unwrap();
    let state = Arc::new(AppState {
        catalog: Arc::new(cat),
        worker: w,
        opts: ServerOptions {
            prefill_chunk: 16,
            ..Default::default()
        },
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            use poem::listener::{Acceptor, Listener};
            let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
                .into_acceptor()
                .await
                .unwrap();
            let addr = acceptor.local_addr()[0].as_socket_addr().cloned().unwrap();
            tx.send(format!("http://{addr}")).unwrap();
            poem::Server::new_with_acceptor(acceptor)
                .run(api::app(state))
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// Greedy token ids of one /v1/completions (streamed or not), from logprobs'
/// `token_id:N` strings (the fixtures have no tokenizer).
async fn http_ids(base: &str, prompt: &[u32], stream: bool) -> Vec<u32> {
    let body = serde_json::json!({"model": "qwen3-f32", "prompt": prompt, "max_tokens": 20, "temperature": 0, "logprobs": 0, "stream": stream});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut ids = Vec::new();
    let mut take = |v: &serde_json::Value| {
        for t in v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .into_iter()
            .flatten()
        {
            ids.push(
                t.as_str()
                    .unwrap()
                    .strip_prefix("token_id:")
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
    };
    if stream {
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("data: ") {
                if d != "[DONE]" {
                    take(&serde_json::from_str(d).unwrap());
                }
            }
        }
    } else {
        take(&serde_json::from_str(&text).unwrap());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_concurrent_streams_equal_sequential() {
    let _g = common::mlx_lock();
    let base = spawn_server(16);
    let ps = prompts();
    let mut seq = Vec::new();
    for p in &ps {
        seq.push(http_ids(&base, p, false).await);
    }
    let futs: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (base, p) = (base.clone(), p.clone());
            tokio::spawn(async move { http_ids(&base, &p, i % 2 == 0).await })
        })
        .collect();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(
            f.await.unwrap(),
            seq[i],
            "prompt {i}: concurrent differs from sequential"
        );
    }
    assert!(seq.iter().all(|s| !s.is_empty()));
}
