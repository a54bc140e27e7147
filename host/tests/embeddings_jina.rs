//! jina-embeddings-v4's text path (issue 15) against its published
//! definition, on the tiny random model of tests/goldens/jina_v4_golden.py
//! (tests/fixtures/models/jina-v4-tiny: a Qwen2.5-VL checkpoint with
//! `task_names`, `matryoshka_dims` and per-task LoRA adapters in
//! `adapters/`; references in tests/fixtures/embeddings/jina_v4_tiny.json):
//! - through the engine: for each task and prompt name, five texts of
//!   different lengths in one padded batch, the same token ids (prefix
//!   included) and the same embeddings at full size and at Matryoshka 16
//!   (cosine >= 0.99999, max abs diff <= 2e-5); without a task, the base
//!   model differs;
//! - through POST /v1/embeddings: `task`, `prompt_name` (and Jina's
//!   `retrieval.passage` form), float and base64, `dimensions`, and the 400s
//!   (a task the model lacks, a prompt name, dimensions outside
//!   matryoshka_dims, `task` for a model without tasks).
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::{
    catalog::ModelEntry,
    embed::{embed, EmbedTokenizer},
    worker::{ModelCatalog, Worker, WorkerConfig},
    LoadedModel,
};
use rmlx::model::{pooling::Pooling, tokenizer::Tokenizer};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(common::fixture("embeddings/jina_v4_tiny.json")).unwrap()).unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// (cosine, max abs diff)
fn compare(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    (dot / (na * nb), a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max))
}

fn close(got: &[f32], want: &[f32], what: &str) {
    let (cos, max) = compare(got, want);
    assert!(cos >= 0.99999 && max <= 2e-5, "{what}: cosine {cos}, max abs diff {max}");
}

#[test]
fn every_task_and_prompt_matches_the_published_definition() {
    let _g = common::mlx_lock();
    let dir = common::fixture("models/jina-v4-tiny");
    let e = ModelEntry::open("jina".into(), &dir).unwrap();
    let spec = e.embedding.clone().expect("a multi-task embedder");
    let tasks = spec.tasks.clone().expect("tasks");
    assert_eq!((spec.pooling, spec.normalize), (Pooling::Mean, true));
    assert_eq!((tasks.names.clone(), tasks.dims.clone(), tasks.default), (vec!["retrieval".to_string(), "text-matching".into(), "code".into()], vec![8, 16, 32], 0));
    let tok = EmbedTokenizer::new(&Tokenizer::from_model_dir(&dir).unwrap(), spec.max_tokens).unwrap();
    let reg = common::registry();
    let mut model = LoadedModel::load(&dir, &reg).unwrap();
    let adapters = model.adapters.clone().expect("adapters loaded");
    assert_eq!(adapters.tasks, tasks.names);
    let g = golden();
    let texts: Vec<&str> = g["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let mut worst = (1.0f32, 0.0f32);
    for c in g["cases"].as_array().unwrap() {
        let (task, pn) = (c["task"].as_str().unwrap(), c["prompt_name"].as_str().unwrap());
        let t = tasks.task(task).unwrap();
        let prefix = tasks.prefix(t, pn).unwrap();
        let rows: Vec<Vec<u32>> = texts.iter().map(|s| tok.encode(&format!("{prefix}{s}")).unwrap()).collect();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r, &ids(&c["ids"][i]), "{task}/{pn} text {i}");
        }
        model.select_task(Some(t)).unwrap();
        let full = embed(&mut model, &spec, &rows, None).unwrap();
        let short = embed(&mut model, &spec, &rows, Some(16)).unwrap();
        model.select_task(None).unwrap();
        for i in 0..rows.len() {
            close(&full[i], &floats(&c["full"][i]), &format!("{task}/{pn} text {i}"));
            close(&short[i], &floats(&c["dims16"][i]), &format!("{task}/{pn} text {i} at 16"));
            for (got, want) in [(&full[i], &c["full"][i]), (&short[i], &c["dims16"][i])] {
                let (cos, max) = compare(got, &floats(want));
                worst = (worst.0.min(cos), worst.1.max(max));
            }
        }
    }
    eprintln!("jina-v4-tiny: lowest cosine {}, largest abs diff {}", worst.0, worst.1);
    // The adapters matter: the base model alone is far off.
    let c = &g["cases"][0];
    let rows: Vec<Vec<u32>> = (0..texts.len()).map(|i| ids(&c["ids"][i])).collect();
    let base = embed(&mut model, &spec, &rows, None).unwrap();
    assert!(compare(&base[0], &floats(&c["full"][0])).1 > 1e-2);
    // A model without adapters refuses a task.
    let bert = LoadedModel::load(&common::fixture("models/bert-tiny-f32"), &reg).unwrap();
    assert!(bert.select_task(Some(0)).is_err());
}

// ---- the API ----

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let catalog = ModelCatalog::discover(
            &[(Some("jina".into()), common::fixture("models/jina-v4-tiny")), (Some("bert".into()), common::fixture("models/bert-tiny-f32"))],
            &[],
        )
        .unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 8, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        common::serve(Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() }))
    })
}

async fn post(body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}/v1/embeddings", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn unbase64(s: &str) -> Vec<f32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).expect("valid base64");
    bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn case(task: &str, pn: &str) -> &'static Value {
    golden()["cases"].as_array().unwrap().iter().find(|c| c["task"] == task && c["prompt_name"] == pn).unwrap()
}

async fn refused(body: Value, param: &str, says: &str) {
    let (s, v) = post(body.clone()).await;
    assert_eq!(s, 400, "{body} -> {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"], param, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(says), "{body}: {v}");
}

#[tokio::test]
async fn the_api_serves_tasks_prompts_dimensions_and_refuses_by_name() {
    let texts = golden()["texts"].clone();
    // Defaults: task retrieval, prompt query, full size; float.
    let (s, v) = post(json!({"model": "jina", "input": texts})).await;
    assert_eq!(s, 200, "{v}");
    let c = case("retrieval", "query");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        close(&floats(&d["embedding"]), &floats(&c["full"][i]), &format!("default, input {i}"));
    }
    let n: usize = (0..5).map(|i| c["ids"][i].as_array().unwrap().len()).sum();
    assert_eq!(v["usage"]["prompt_tokens"], n, "the prefix's tokens count");
    // code / passage at 16 dimensions, base64.
    let (s, v) = post(json!({"model": "jina", "input": [texts[1], texts[2]], "task": "code", "prompt_name": "passage", "dimensions": 16, "encoding_format": "base64"})).await;
    assert_eq!(s, 200, "{v}");
    let c = case("code", "passage");
    for (k, i) in [1, 2].into_iter().enumerate() {
        let got = unbase64(v["data"][k]["embedding"].as_str().unwrap());
        assert_eq!(got.len(), 16);
        close(&got, &floats(&c["dims16"][i]), &format!("code/passage input {i}"));
    }
    // Jina's API form `retrieval.passage`; text-matching embeds passages as queries.
    let (s, v) = post(json!({"model": "jina", "input": texts[0], "task": "retrieval.passage"})).await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["data"][0]["embedding"]), &floats(&case("retrieval", "passage")["full"][0]), "retrieval.passage");
    let (s, v) = post(json!({"model": "jina", "input": texts[3], "task": "text-matching", "prompt_name": "passage"})).await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["data"][0]["embedding"]), &floats(&case("text-matching", "query")["full"][3]), "text-matching passage");
    // Token ids are used as given (no prefix).
    let (s, v) = post(json!({"model": "jina", "input": [case("code", "query")["ids"][4]], "task": "code"})).await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["data"][0]["embedding"]), &floats(&case("code", "query")["full"][4]), "token ids");
    // Refused by name.
    refused(json!({"model": "jina", "input": "x", "task": "summarize"}), "task", "must be one of").await;
    refused(json!({"model": "jina", "input": "x", "prompt_name": "document"}), "prompt_name", "must be one of").await;
    refused(json!({"model": "jina", "input": "x", "task": "retrieval.query", "prompt_name": "passage"}), "prompt_name", "contradicts").await;
    refused(json!({"model": "jina", "input": "x", "dimensions": 12}), "dimensions", "[8, 16, 32]").await;
    refused(json!({"model": "bert", "input": "x", "task": "retrieval"}), "task", "no task adapters").await;
    refused(json!({"model": "bert", "input": "x", "prompt_name": "query"}), "prompt_name", "no task adapters").await;
}
