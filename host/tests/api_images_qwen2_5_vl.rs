//! Qwen2.5-VL images through the server (issue 15), in process on port 0, on
//! the tiny random Qwen2.5-VL fixture (tests/fixtures/models/qwen2_5_vl-tiny:
//! word-level tokenizer, a Qwen-style chat template whose image part renders
//! `<|vision_start|><|image_pad|><|vision_end|>`, a Qwen2VLImageProcessor in
//! preprocessor_config.json; scripts/dev/qwen2_5_vl_golden.py).
//!
//! The host smart-resizes each image (24x16 stays: a multiple of patch 2 x
//! merge 2 in range), expands `<|image_pad|>` to the merged grid's 4 x 6 = 24
//! placeholders, runs the media forward and lays out the M-RoPE positions
//! from its MEDIA_POSITIONS (ABI 3.7). Against mlx-vlm 0.7.10's
//! `stream_generate` (tests/fixtures/goldens/qwen2_5_vl-serve), through the
//! OpenAI route: the prompt length, the greedy tokens and every step's top-5
//! log-probs (the decode steps at offset + rope delta). The Anthropic route
//! (`image` blocks) gives the same text and prompt length, and count_tokens
//! counts the image's placeholders.
mod common;

use base64::Engine as _;
use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::OnceLock;

const MODEL: &str = "models/qwen2_5_vl-tiny";
const GOLDEN: &str = "goldens/qwen2_5_vl-serve/golden.json";

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| serde_json::from_slice(&std::fs::read(common::fixture(GOLDEN)).unwrap()).unwrap())
}

/// The fixture's vocabulary: token string -> id.
fn vocab() -> &'static HashMap<String, u32> {
    static V: OnceLock<HashMap<String, u32>> = OnceLock::new();
    V.get_or_init(|| {
        let t: Value = serde_json::from_slice(&std::fs::read(common::fixture(MODEL).join("tokenizer.json")).unwrap()).unwrap();
        t["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap() as u32)).collect()
    })
}

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let catalog = ModelCatalog::discover(&[(Some("qwen-vl".into()), common::fixture(MODEL))], &[]).unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        common::serve(std::sync::Arc::new(AppState { catalog: std::sync::Arc::new(catalog), worker, opts: ServerOptions::default() }))
    })
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn b64(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(common::fixture("images").join(name)).unwrap())
}

/// A golden case's parts as OpenAI content parts (images as data URLs).
fn openai_parts(case: &Value) -> Vec<Value> {
    let parts = case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap());
    parts
        .map(|p| match p.ends_with(".png") {
            true => json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(p))}}),
            false => json!({"type": "text", "text": p}),
        })
        .collect()
}

/// The same as Anthropic content blocks.
fn anthropic_blocks(case: &Value) -> Vec<Value> {
    let parts = case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap());
    parts
        .map(|p| match p.ends_with(".png") {
            true => json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(p)}}),
            false => json!({"type": "text", "text": p}),
        })
        .collect()
}

fn id(token: &str) -> u32 {
    *vocab().get(token).unwrap_or_else(|| panic!("token {token:?} is not in the fixture's vocabulary"))
}

#[tokio::test(flavor = "multi_thread")]
async fn qwen2_5_vl_chats_with_images_as_mlx_vlm() {
    let g = golden();
    let steps = g["steps"].as_u64().unwrap();
    for (name, case) in g["cases"].as_object().unwrap() {
        let prompt_len = case["prompt_ids"].as_array().unwrap().len();
        let body = json!({"model": "qwen-vl", "max_tokens": steps, "temperature": 0, "logprobs": true, "top_logprobs": 5,
            "messages": [{"role": "user", "content": openai_parts(case)}]});
        let (s, v) = post("/v1/chat/completions", body).await;
        assert_eq!(s, 200, "{name}: {v}");
        assert_eq!(v["usage"]["prompt_tokens"], prompt_len, "{name}: {v}");
        let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
        let tokens: Vec<u32> = content.iter().map(|t| id(t["token"].as_str().unwrap())).collect();
        let want: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(tokens, want, "{name}: greedy tokens");
        let mut worst = 0f64;
        for (step, (got, want)) in content.iter().zip(case["top5"].as_array().unwrap()).enumerate() {
            let got: Vec<(u32, f64)> =
                got["top_logprobs"].as_array().unwrap().iter().map(|t| (id(t["token"].as_str().unwrap()), t["logprob"].as_f64().unwrap())).collect();
            let want: Vec<(u32, f64)> = want.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap())).collect();
            for ((gi, gl), (wi, wl)) in got.iter().zip(&want) {
                assert_eq!(gi, wi, "{name} step {step}: top-5 {got:?} vs mlx-vlm {want:?}");
                assert!((gl - wl).abs() < 1e-4, "{name} step {step}: logprob of {gi}: {gl} vs mlx-vlm {wl}");
                worst = worst.max((gl - wl).abs());
            }
        }
        eprintln!("{name}: {prompt_len} prompt tokens, {} steps, top-5 logprobs within {worst:.1e} of mlx-vlm", content.len());
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();

        // Anthropic: the same prompt, the same answer.
        let body = json!({"model": "qwen-vl", "max_tokens": steps, "temperature": 0, "messages": [{"role": "user", "content": anthropic_blocks(case)}]});
        let (s, m) = post("/v1/messages", body.clone()).await;
        assert_eq!(s, 200, "{name}: {m}");
        assert_eq!(m["usage"]["input_tokens"], prompt_len, "{name}: {m}");
        assert_eq!(m["content"][0]["text"].as_str().unwrap(), text, "{name}: {m}");
        let (s, c) = post("/v1/messages/count_tokens", body).await;
        assert_eq!(s, 200, "{name}: {c}");
        assert_eq!(c["input_tokens"], prompt_len, "{name}: count_tokens {c}");
    }
}
