//! Embedding requests batched across requests (engine/worker/embeds.rs), on
//! the tiny BERT fixture: requests that wait together run as one engine
//! run whose rows share padded forwards, each gets exactly the vectors it
//! gets alone, /metrics shows the shared run, and a bad request fails alone.
//!
//! To make "waiting together" certain, the engine thread is held busy for a
//! moment (`Worker::on_engine` with a sleep) while the requests are sent.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig, WorkerError};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

struct Server {
    base: String,
    worker: Worker,
    catalog: Arc<ModelCatalog>,
}

/// One engine for the file (one MLX user per process); the tests take turns.
fn server() -> &'static Server {
    static S: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    S.get_or_init(start)
}
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start() -> Server {
    let catalog = Arc::new(ModelCatalog::discover(&[(Some("bert".into()), common::fixture("models/bert-tiny-f32"))], &[]).unwrap());
    let worker = Worker::start(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
        &catalog,
    )
    .unwrap();
    let base = common::serve(Arc::new(AppState { catalog: catalog.clone(), worker: worker.clone(), opts: ServerOptions::default() }));
    Server { base, worker, catalog }
}

/// Inputs of varied lengths (1 to 24 tokens after truncation).
fn texts() -> Vec<String> {
    let mut t: Vec<String> = ["The cat sat on the mat.", "a dog", "Red, blue and big!", "it was small", "xyzzy plugh", "the big red dog ran to the cat"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    t.push("the big red dog ran to the cat ".repeat(5));
    t.push("cat".into());
    t
}

async fn embed_one(base: &str, input: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{base}/v1/embeddings")).json(&json!({"model": "bert", "input": input})).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["data"].as_array().unwrap().iter().map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let diff = got.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let c = cosine(got, want);
    assert!(c >= 0.99999 && diff < 1e-5, "{what}: cosine {c}, max abs diff {diff}");
}

/// (count, sum) of histogram `name` for model bert, from /metrics.
async fn hist(base: &str, name: &str) -> (f64, f64) {
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    let read = |suffix: &str| -> f64 {
        let key = format!("{name}_{suffix}{{model=\"bert\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)).map(|v| v.trim().parse().unwrap()).unwrap_or(0.0)
    };
    (read("count"), read("sum"))
}

/// Holds the engine thread for `ms` (returns once the hold has begun).
async fn hold_engine(worker: &Worker, ms: u64) -> tokio::task::JoinHandle<()> {
    let (began_tx, began_rx) = tokio::sync::oneshot::channel();
    let w = worker.clone();
    let h = tokio::spawn(async move {
        w.on_engine(move |_| {
            let _ = began_tx.send(());
            std::thread::sleep(Duration::from_millis(ms));
        })
        .await
        .unwrap();
    });
    began_rx.await.unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_forwards_and_get_their_own_vectors() {
    let _turn = TURN.lock().await;
    let s = server();
    let texts = texts();
    let (c, sum) = hist(&s.base, "rmlx_embedding_batch_requests").await;
    let (fc, fsum) = hist(&s.base, "rmlx_embedding_forward_rows").await;
    // One at a time (each its own run).
    let mut alone = Vec::new();
    for t in &texts {
        let (st, v) = embed_one(&s.base, json!(t)).await;
        assert_eq!(st, 200, "{v}");
        alone.push(vectors(&v).remove(0));
    }
    let (c0, s0) = hist(&s.base, "rmlx_embedding_batch_requests").await;
    let n = texts.len() as f64;
    assert_eq!((c0 - c, s0 - sum), (n, n), "one run per request when they come one by one");
    let (fc0, fs0) = hist(&s.base, "rmlx_embedding_forward_rows").await;
    assert_eq!((fc0 - fc, fs0 - fsum), (n, n));

    // All at once, plus one request of two inputs, while the engine is busy.
    let hold = hold_engine(&s.worker, 1500).await;
    let mut tasks = Vec::new();
    for t in &texts {
        let (b, t) = (s.base.clone(), t.clone());
        tasks.push(tokio::spawn(async move { embed_one(&b, json!(t)).await }));
    }
    let (b, pair) = (s.base.clone(), json!([texts[6], texts[1]]));
    tasks.push(tokio::spawn(async move { embed_one(&b, pair).await }));
    let mut got = Vec::new();
    for t in tasks {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 200, "{v}");
        got.push(vectors(&v));
    }
    hold.await.unwrap();
    for (i, g) in got.iter().take(texts.len()).enumerate() {
        assert_eq!(g.len(), 1);
        same(&g[0], &alone[i], &format!("input {i} ({:?})", texts[i]));
    }
    let pair = &got[texts.len()];
    assert_eq!(pair.len(), 2);
    same(&pair[0], &alone[6], "the pair's first input");
    same(&pair[1], &alone[1], "the pair's second input");

    // One run served all 9 requests (10 rows); its forwards held several rows each.
    let rows = (texts.len() + 2) as f64;
    let (c1, s1) = hist(&s.base, "rmlx_embedding_batch_requests").await;
    assert_eq!((c1 - c0, s1 - s0), (1.0, (texts.len() + 1) as f64), "the concurrent requests ran as one");
    let (fc1, fs1) = hist(&s.base, "rmlx_embedding_forward_rows").await;
    assert_eq!(fs1 - fs0, rows);
    assert!(fc1 - fc0 <= rows / 2.0, "{} forwards for {rows} rows", fc1 - fc0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_request_fails_alone() {
    let _turn = TURN.lock().await;
    let s = server();
    let entry = s.catalog.get("bert").unwrap();
    let tok = rmlx::engine::embed::EmbedTokenizer::new(&rmlx::model::tokenizer::Tokenizer::from_model_dir(&entry.path).unwrap(), 24).unwrap();
    let good: Vec<Vec<u32>> = texts().iter().map(|t| tok.encode(t).unwrap()).collect();
    let alone = s.worker.embed(entry.clone(), good.clone(), None, None).await.unwrap();
    let (c0, s0) = hist(&s.base, "rmlx_embedding_batch_requests").await;
    let vocab = entry.vocab_size.unwrap() as u32;

    let hold = hold_engine(&s.worker, 1000).await;
    let ask = |rows: Vec<Vec<u32>>| {
        let (w, e) = (s.worker.clone(), entry.clone());
        tokio::spawn(async move { w.embed(e, rows, None, None).await })
    };
    let first = ask(good[..3].to_vec());
    let out_of_vocab = ask(vec![good[0].clone(), vec![2, vocab + 5, 3]]);
    let empty = ask(vec![vec![]]);
    let too_long = ask(vec![vec![5; 25]]);
    let rest = ask(good[3..].to_vec());
    hold.await.unwrap();
    let bad = |r: Result<Vec<Vec<f32>>, WorkerError>, says: &str| match r {
        Err(WorkerError::BadField { field, message }) => {
            assert_eq!(field, "input");
            assert!(message.contains(says), "{message}");
        }
        other => panic!("expected a bad input, got {other:?}"),
    };
    bad(out_of_vocab.await.unwrap(), &format!("token id {}", vocab + 5));
    bad(empty.await.unwrap(), "no tokens");
    bad(too_long.await.unwrap(), "at most 24");
    let mut got = first.await.unwrap().unwrap();
    got.extend(rest.await.unwrap().unwrap());
    assert_eq!(got.len(), alone.len());
    for (i, (g, w)) in got.iter().zip(&alone).enumerate() {
        same(g, w, &format!("row {i}"));
    }
    // The two good requests ran together.
    let (c, sum) = hist(&s.base, "rmlx_embedding_batch_requests").await;
    assert_eq!((c - c0, sum - s0), (1.0, 2.0), "the two good requests ran as one");
}
