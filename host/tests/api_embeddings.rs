//! POST /v1/embeddings in process on port 0, with the tiny fixtures of
//! tests/goldens/embeddings_ref.py: a BERT with a tokenizer and
//! sentence-transformers files (mean + Normalize), the qwen3 decoder with a
//! modules.json (last token + Normalize), and the plain qwen3 (a generator).
//! Float and base64, batches, token-id inputs, and the 4xx cases in
//! OpenAI's error shape.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(common::fixture("embeddings/tiny.json")).unwrap()).unwrap())
}

/// The tiny qwen3 fixture plus modules.json (last token, Normalize).
fn qwen3_embedder() -> std::path::PathBuf {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    let d = D.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(common::fixture("models/qwen3-f32")).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
            }
        }
        std::fs::write(
            d.path().join("modules.json"),
            r#"[{"path":"","type":"sentence_transformers.models.Transformer"},
                {"path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        std::fs::create_dir(d.path().join("1_Pooling")).unwrap();
        std::fs::write(d.path().join("1_Pooling/config.json"), r#"{"pooling_mode_lasttoken": true}"#).unwrap();
        d
    });
    d.path().to_path_buf()
}

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let catalog = ModelCatalog::discover(
            &[
                (Some("bert".into()), common::fixture("models/bert-tiny-f32")),
                (Some("qwen3-embed".into()), qwen3_embedder()),
                (Some("qwen3".into()), common::fixture("models/qwen3-f32")),
            ],
            &[],
        )
        .unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 8, max_loaded_models: 3, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        common::serve(Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() }))
    })
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn unbase64(s: &str) -> Vec<f32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).expect("valid base64");
    bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[tokio::test]
async fn strings_batches_and_token_ids_give_the_reference_embeddings() {
    let g = &golden()["bert"];
    let texts = g["texts"].clone();
    // One string.
    let (s, v) = post("/v1/embeddings", json!({"model": "bert", "input": texts[0]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("list"), Some("bert")));
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["object"], "embedding");
    assert!(max_diff(&floats(&v["data"][0]["embedding"]), &floats(&g["embeddings"][0])) < 1e-5);
    let n0 = g["ids"][0].as_array().unwrap().len();
    assert_eq!(v["usage"], json!({"prompt_tokens": n0, "total_tokens": n0}));
    // A batch, in order (the longest input is truncated to 24 tokens).
    let (s, v) = post("/v1/embeddings", json!({"model": "bert", "input": texts, "encoding_format": "float"})).await;
    assert_eq!(s, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), g["texts"].as_array().unwrap().len());
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert!(max_diff(&floats(&d["embedding"]), &floats(&g["embeddings"][i])) < 1e-5, "input {i}");
    }
    // Token ids: one list, and a list of lists.
    let (s, v) = post("/v1/embeddings", json!({"model": "bert", "input": g["ids"][1]})).await;
    assert_eq!(s, 200, "{v}");
    assert!(max_diff(&floats(&v["data"][0]["embedding"]), &floats(&g["embeddings"][1])) < 1e-5);
    let (s, v) = post("/v1/embeddings", json!({"model": "bert", "input": [g["ids"][2], g["ids"][0]]})).await;
    assert_eq!(s, 200, "{v}");
    assert!(max_diff(&floats(&v["data"][0]["embedding"]), &floats(&g["embeddings"][2])) < 1e-5);
    assert!(max_diff(&floats(&v["data"][1]["embedding"]), &floats(&g["embeddings"][0])) < 1e-5);
    // base64: little-endian float32, the same values.
    let (s, v) = post("/v1/embeddings", json!({"model": "bert", "input": [texts[0], texts[3]], "encoding_format": "base64"})).await;
    assert_eq!(s, 200, "{v}");
    for (k, i) in [0, 3].into_iter().enumerate() {
        let got = unbase64(v["data"][k]["embedding"].as_str().unwrap());
        assert!(max_diff(&got, &floats(&g["embeddings"][i])) < 1e-5);
    }
}

#[tokio::test]
async fn a_decoder_embedder_pools_the_last_token() {
    let cases = golden()["qwen3"].as_array().unwrap();
    let input: Vec<Value> = cases.iter().map(|c| c["ids"].clone()).collect();
    let (s, v) = post("/v1/embeddings", json!({"model": "qwen3-embed", "input": input})).await;
    assert_eq!(s, 200, "{v}");
    for (i, c) in cases.iter().enumerate() {
        assert!(max_diff(&floats(&v["data"][i]["embedding"]), &floats(&c["embedding"])) < 1e-4, "row {i}");
    }
}

async fn refused(body: Value, status: u16, param: &str, says: &str) {
    let (s, v) = post("/v1/embeddings", body.clone()).await;
    assert_eq!(s, status, "{body} -> {v}");
    let e = &v["error"];
    let ty = if status == 404 { "not_found_error" } else { "invalid_request_error" };
    assert_eq!(e["type"], ty, "{v}");
    assert_eq!(e["param"], param, "{v}");
    assert!(e["message"].as_str().unwrap().contains(says), "{body}: {v}");
}

#[tokio::test]
async fn bad_requests_are_4xx_in_openai_shape() {
    refused(json!({"model": "bert", "input": ""}), 400, "input", "empty string").await;
    refused(json!({"model": "bert", "input": ["a dog", ""]}), 400, "input", "empty string (input 1)").await;
    refused(json!({"model": "bert", "input": []}), 400, "input", "empty").await;
    refused(json!({"model": "bert", "input": [[]]}), 400, "input", "empty token list").await;
    let many = vec!["a dog"; 2049];
    refused(json!({"model": "bert", "input": many}), 400, "input", "at most 2048").await;
    refused(json!({"model": "bert", "input": [2, 83, 3]}), 400, "input", "token id 83").await;
    refused(json!({"model": "bert", "input": [2, -1, 3]}), 400, "input", "token id -1").await;
    refused(json!({"model": "bert", "input": vec![5; 25]}), 400, "input", "at most 24").await;
    refused(json!({"model": "bert", "input": "a dog", "dimensions": 8}), 400, "dimensions", "does not support `dimensions`").await;
    refused(json!({"model": "bert", "input": "a dog", "encoding_format": "int8"}), 400, "encoding_format", "").await;
    refused(json!({"model": "bert", "input": {"text": "a dog"}}), 400, "input", "").await;
    refused(json!({"model": "qwen3", "input": [1, 2, 3]}), 400, "model", "not an embedding model").await;
    refused(json!({"model": "nope", "input": "a dog"}), 404, "model", "does not exist").await;
    // An embedding model does not chat.
    let (s, v) = post("/v1/chat/completions", json!({"model": "bert", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "model_not_generative");
    assert!(v["error"]["message"].as_str().unwrap().contains("/v1/embeddings"));
    let (s, v) = post("/v1/completions", json!({"model": "bert", "prompt": "hi"})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("model_not_generative")));
}
