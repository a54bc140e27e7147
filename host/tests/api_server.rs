//! The HTTP API in process on port 0: OpenAI and Anthropic routes read to the
//! end of their SSE streams, errors in each API's shape, auth, queue, models,
//! and schemas/openapi.json up to date. Uses the default model
//! (SmolLM2-135M-Instruct, `make default-model`) and the tiny fixtures.
mod common;

use rmlx::api::{self, AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

const SMOL: &str = "SmolLM2-135M-Instruct";

use common::default_model;

fn state(opts: ServerOptions, max_queue_depth: usize) -> Arc<AppState> {
    let catalog = ModelCatalog::discover(
        &[(Some(SMOL.into()), default_model()), (None, common::fixture("models/llama-f32")), (None, common::fixture("models/qwen3-f32"))],
        &[],
    )
    .unwrap();
    let worker = Worker::start(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth, max_loaded_models: 3, idle_timeout: None, prefill_chunk: 512 },
        &catalog,
    )
    .unwrap();
    Arc::new(AppState { catalog: Arc::new(catalog), worker, opts })
}

/// The shared server (one engine for the whole file).
fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| common::serve(state(ServerOptions { max_body_bytes: 1 << 20, ..Default::default() }, 16)))
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let r = client().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// SSE: (event name, data) pairs, read to the end of the stream.
async fn sse(path: &str, body: Value) -> Vec<(Option<String>, String)> {
    let r = client().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    parse_sse(&r.text().await.unwrap())
}

use common::parse_sse;

fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": SMOL, "messages": [{"role": "user", "content": content}], "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[test]
fn openapi_json_is_up_to_date() {
    let path = common::repo().join("schemas/openapi.json");
    let now = api::openapi_json();
    if std::env::var_os("RMLX_BLESS").is_some() {
        std::fs::write(&path, &now).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == now,
        "schemas/openapi.json is out of date: run `make openapi` (or RMLX_BLESS=1 cargo test --test api_server openapi)"
    );
    let v: Value = serde_json::from_str(&now).unwrap();
    for p in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/v1/models/{id}/load",
        "/v1/models/{id}/unload",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/health",
    ] {
        assert!(v["paths"][p].is_object(), "{p} undocumented");
    }
    for s in ["ChatCompletionChunk", "Completion", "AnthropicStreamEvent", "ErrorResponse", "AnthropicErrorResponse"] {
        assert!(v["components"]["schemas"][s].is_object(), "{s} undocumented");
    }
}

#[tokio::test]
async fn chat_plain_and_streamed_agree() {
    let _g = common::mlx_lock();
    let (s, v) = post("/v1/chat/completions", chat("What is the capital of France?", json!({}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);

    let events = sse(
        "/v1/chat/completions",
        chat("What is the capital of France?", json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e.1).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, text);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"], v["usage"]);
}

#[tokio::test]
async fn greedy_chat_equals_rmlx_generate() {
    let _g = common::mlx_lock();
    let prompt = "Write one sentence about the sea.";
    let out = std::process::Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate", "--chat", "--json"])
        .args(["--model", default_model().to_str().unwrap(), "--prompt", prompt, "--temperature", "0", "--max-tokens", "40"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (s, v) = post("/v1/chat/completions", chat(prompt, json!({"max_tokens": 40, "temperature": 0}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], cli["text"]);
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() as usize, cli["prompt_tokens"].as_array().unwrap().len());
}

#[tokio::test]
async fn completions_token_ids_logprobs_echo_and_stream() {
    let _g = common::mlx_lock();
    let out = std::process::Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "generate", "--json"])
        .args(["--model", common::fixture("models/llama-f32").to_str().unwrap(), "--prompt-tokens", "1,5,9", "--max-tokens", "6"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();

    let (s, v) = post("/v1/completions", json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 6, "logprobs": 3})).await;
    assert_eq!(s, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["token_ids"], cli["tokens"]);
    assert_eq!(c["finish_reason"], "length");
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3);
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        // greedy: the chosen token is the most likely one
        assert!((lp["token_logprobs"][i].as_f64().unwrap() - best).abs() < 1e-6);
        assert!(best <= 0.0);
    }
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}));

    // several prompts, echo
    let (s, v) =
        post("/v1/completions", json!({"model": "llama-f32", "prompt": [[1, 5, 9], [1, 2]], "max_tokens": 6, "echo": true, "logprobs": 0})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["token_ids"], cli["tokens"]);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 9);
    assert_eq!(v["choices"][0]["logprobs"]["token_logprobs"][0], Value::Null);

    // streamed
    let events = sse("/v1/completions", json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 6, "stream": true})).await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let ids: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.1).unwrap())
        .filter_map(|c| c["choices"][0]["token_ids"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(Value::Array(ids), cli["tokens"]);

    // text prompt on the default model
    let (s, v) = post("/v1/completions", json!({"model": SMOL, "prompt": "The capital of France is", "max_tokens": 4})).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["choices"][0]["text"].as_str().unwrap().contains("Paris"), "{v}");
}

#[tokio::test]
async fn echo_scores_the_prompt() {
    let _g = common::mlx_lock();
    // Generate 3 tokens with their logprobs, then score prompt + those tokens with echo:
    // the echoed prompt's log-probabilities are the ones the generation saw.
    let (s, v) = post("/v1/completions", json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 3, "logprobs": 3, "temperature": 0})).await;
    assert_eq!(s, 200, "{v}");
    let gen = &v["choices"][0];
    let ids: Vec<u64> = gen["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let mut prompt = vec![1u64, 5, 9];
    prompt.extend(&ids);
    for stream in [false, true] {
        let body = json!({"model": "llama-f32", "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 3, "stream": stream});
        let lp = if stream {
            let events = sse("/v1/completions", body).await;
            assert_eq!(events.last().unwrap().1, "[DONE]");
            let first: Value = serde_json::from_str(&events[0].1).unwrap();
            first["choices"][0]["logprobs"].clone()
        } else {
            let (s, v) = post("/v1/completions", body).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["usage"]["completion_tokens"], 0);
            v["choices"][0]["logprobs"].clone()
        };
        let lps = lp["token_logprobs"].as_array().unwrap();
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), 6, "{lp}");
        assert_eq!((&lps[0], &tops[0]), (&Value::Null, &Value::Null));
        for i in 1..6 {
            let l = lps[i].as_f64().unwrap();
            let top = tops[i].as_object().unwrap();
            assert!(l <= 0.0 && top.len() == 3, "{lp}");
            assert!(top.values().all(|x| x.as_f64().unwrap() <= 0.0));
        }
        for (k, i) in (3..6).enumerate() {
            let want = gen["logprobs"]["token_logprobs"][k].as_f64().unwrap();
            assert!((lps[i].as_f64().unwrap() - want).abs() < 1e-3, "position {i}: {} vs {want}", lps[i]);
            let (a, b) = (tops[i].as_object().unwrap(), gen["logprobs"]["top_logprobs"][k].as_object().unwrap());
            let (mut ka, mut kb): (Vec<_>, Vec<_>) = (a.keys().collect(), b.keys().collect());
            ka.sort();
            kb.sort();
            assert_eq!(ka, kb, "top tokens at {i}");
        }
    }
    // A one-token prompt has nothing to score.
    let (_, v) = post("/v1/completions", json!({"model": "llama-f32", "prompt": [7], "max_tokens": 1, "echo": true, "logprobs": 1})).await;
    assert_eq!(v["choices"][0]["logprobs"]["token_logprobs"][0], Value::Null);
    assert!(v["choices"][0]["logprobs"]["token_logprobs"][1].is_number());
}

#[tokio::test]
async fn sampling_seed_penalties_and_bias() {
    let _g = common::mlx_lock();
    let req = |seed: i64| json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "min_p": 0.01, "seed": seed});
    let a = post("/v1/completions", req(42)).await.1["choices"][0]["token_ids"].clone();
    let b = post("/v1/completions", req(42)).await.1["choices"][0]["token_ids"].clone();
    let c = post("/v1/completions", req(43)).await.1["choices"][0]["token_ids"].clone();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // logit_bias forces a token
    let (s, v) = post(
        "/v1/completions",
        json!({"model": "llama-f32", "prompt": [1, 5], "max_tokens": 3, "logit_bias": {"77": 100}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["token_ids"], json!([77, 77, 77]));
    // greedy with a logit_bias: the device adds the bias before its argmax
    // exactly as the host's sampler does (logprobs force the host path)
    let greedy = |logprobs: bool| {
        let mut r = json!({"model": "llama-f32", "prompt": [1, 5], "max_tokens": 8, "temperature": 0,
                           "logit_bias": {"77": 4, "78": 4, "5": -100}});
        if logprobs {
            r["logprobs"] = json!(1);
        }
        r
    };
    let (s, dev) = post("/v1/completions", greedy(false)).await;
    assert_eq!(s, 200, "{dev}");
    let (_, host) = post("/v1/completions", greedy(true)).await;
    assert_eq!(dev["choices"][0]["token_ids"], host["choices"][0]["token_ids"]);
    // a strong frequency penalty stops repeats of that token
    let (_, v) = post(
        "/v1/completions",
        json!({"model": "llama-f32", "prompt": [1, 5], "max_tokens": 3, "logit_bias": {"77": 5}, "frequency_penalty": 2.0, "repetition_penalty": 3.0}),
    )
    .await;
    let ids = v["choices"][0]["token_ids"].as_array().unwrap();
    assert!(ids.iter().filter(|t| **t == json!(77)).count() <= 1, "{ids:?}");
}

#[tokio::test]
async fn stop_strings_are_never_emitted() {
    let _g = common::mlx_lock();
    let body = chat("What is the capital of France?", json!({"stop": ["Paris"]}));
    let (_, v) = post("/v1/chat/completions", body.clone()).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.contains("Paris") && !text.contains("Par"), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut sb = body;
    sb["stream"] = json!(true);
    let events = sse("/v1/chat/completions", sb).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.1).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
    // Anthropic: stop_sequence
    let (_, m) = post(
        "/v1/messages",
        json!({"model": SMOL, "max_tokens": 24, "stop_sequences": ["Paris"], "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], "Paris");
}

#[tokio::test]
async fn anthropic_messages_stream_and_count_tokens() {
    let _g = common::mlx_lock();
    let body = json!({"model": SMOL, "max_tokens": 24, "system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "metadata": {"user_id": "u1"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]});
    let (s, m) = post("/v1/messages", body.clone()).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["content"][0]["type"], "text");
    let text = m["content"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(m["stop_reason"], "end_turn");

    let (s, c) = post("/v1/messages/count_tokens", json!({"model": SMOL, "system": body["system"], "messages": body["messages"]})).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["input_tokens"], m["usage"]["input_tokens"]);

    let mut sb = body;
    sb["stream"] = json!(true);
    let events = sse("/v1/messages", sb).await;
    let names: Vec<&str> = events.iter().map(|e| e.0.as_deref().unwrap()).collect();
    assert_eq!(&names[..3], &["message_start", "content_block_start", "ping"]);
    assert_eq!(&names[names.len() - 3..], &["content_block_stop", "message_delta", "message_stop"]);
    for (name, data) in &events {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], name.as_deref().unwrap());
    }
    let streamed: String = events
        .iter()
        .filter(|e| e.0.as_deref() == Some("content_block_delta"))
        .map(|e| serde_json::from_str::<Value>(&e.1).unwrap()["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);
    let delta: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], m["usage"]["output_tokens"]);
}

#[tokio::test]
async fn errors_in_each_apis_shape() {
    let _g = common::mlx_lock();
    let (s, v) = post("/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!((s, v["error"]["type"].as_str(), v["error"]["param"].as_str()), (404, Some("not_found_error"), Some("model")));
    let (s, v) = post("/v1/chat/completions", chat("x", json!({"temperature": 3}))).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("temperature")));
    let (s, v) = post("/v1/chat/completions", json!({"model": SMOL, "messages": [{"role": "user"}]})).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("messages[0].content")), "{v}");
    let (s, v) = post("/v1/chat/completions", json!({"model": SMOL, "messages": [{"role": "robot", "content": "x"}]})).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["param"].as_str().unwrap().starts_with("messages[0]"), "{v}");
    let long: Vec<u32> = vec![1; 600];
    let (s, v) = post("/v1/completions", json!({"model": "llama-f32", "prompt": long})).await;
    assert_eq!(s, 400);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("512") && msg.contains("600"), "{msg}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post("/v1/completions", json!({"model": "llama-f32", "prompt": [1, 999]})).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("prompt")), "{v}");
    // Anthropic shape
    let (s, v) = post("/v1/messages", json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!((s, v["type"].as_str(), v["error"]["type"].as_str()), (404, Some("error"), Some("not_found_error")));
    let (s, v) = post("/v1/messages", json!({"model": SMOL, "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!((s, v["error"]["type"].as_str()), (400, Some("invalid_request_error")));
    assert!(v["error"]["message"].as_str().unwrap().contains("max_tokens"), "{v}");
    // 413 (the shared server allows 1 MiB)
    let big = "x".repeat(2 << 20);
    let r = client().post(format!("{}/v1/chat/completions", base())).json(&chat(&big, json!({}))).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = client().post(format!("{}/v1/messages", base())).json(&json!({"x": big})).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "request_too_large");
    // not JSON (sent as JSON: a body of another content type is a 415, tests/api_guard.rs)
    let r = client()
        .post(format!("{}/v1/chat/completions", base()))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn models_list_load_unload_and_keep_alive() {
    let _g = common::mlx_lock();
    let v: Value = client().get(format!("{}/v1/models", base())).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![SMOL, "llama-f32", "qwen3-f32"]);
    let r = client().get(format!("{}/v1/models/qwen3-f32", base())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(client().get(format!("{}/v1/models/nope", base())).send().await.unwrap().status(), 404);
    let (s, v) = post("/v1/models/qwen3-f32/load", json!({"keep_alive": "10m"})).await;
    assert_eq!((s, &v["loaded"]), (200, &json!(true)), "{v}");
    assert!(v["expires_at"].as_u64().is_some());
    let r = client().post(format!("{}/v1/models/qwen3-f32/unload", base())).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["loaded"], false);
    // keep_alive 0: unloaded right after the request
    let (s, _) = post("/v1/completions", json!({"model": "qwen3-f32", "prompt": [1, 2], "max_tokens": 2, "keep_alive": 0})).await;
    assert_eq!(s, 200);
    let mut loaded = true;
    for _ in 0..50 {
        let v: Value = client().get(format!("{}/v1/models/qwen3-f32", base())).send().await.unwrap().json().await.unwrap();
        loaded = v["loaded"].as_bool().unwrap();
        if !loaded {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!loaded);
}

#[tokio::test]
async fn queue_full_is_429() {
    let _g = common::mlx_lock();
    let base = common::serve(state(ServerOptions::default(), 0));
    let c = client();
    // a long streamed generation holds the engine (the real model at a few
    // tokens/s here, EOS (id 2) suppressed so it cannot end early)...
    let first = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": SMOL, "prompt": "Once upon a time", "max_tokens": 400, "stream": true,
                      "logit_bias": {"2": -100}}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    // ...so with --max-queue-depth 0 the next request is refused.
    let r = c.post(format!("{base}/v1/completions")).json(&json!({"model": "llama-f32", "prompt": [1, 2], "max_tokens": 1})).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let r = c
        .post(format!("{base}/v1/messages"))
        .json(&json!({"model": SMOL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "rate_limit_error");
    drop(first); // cancels the generation
}

#[tokio::test]
async fn api_key_on_every_route_but_health() {
    let state = Arc::new(AppState {
        catalog: Arc::new(ModelCatalog::default()),
        worker: Worker::detached(),
        opts: ServerOptions { api_key: Some("sekret".into()), ..Default::default() },
    });
    let base = common::serve(state);
    let c = client();
    // No key needed (a detached handle has no engine behind it: 503, not 401).
    assert_eq!(c.get(format!("{base}/health")).send().await.unwrap().status(), 503);
    for path in ["/v1/models", "/openapi.json", "/docs/"] {
        assert_eq!(c.get(format!("{base}{path}")).send().await.unwrap().status(), 401, "{path}");
    }
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "authentication_error");
    let r = c.post(format!("{base}/v1/messages")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "authentication_error");
    assert_eq!(c.get(format!("{base}/v1/models")).bearer_auth("wrong").send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{base}/v1/models")).bearer_auth("sekret").send().await.unwrap().status(), 200);
    assert_eq!(c.get(format!("{base}/v1/models")).header("x-api-key", "sekret").send().await.unwrap().status(), 200);
    let spec = c.get(format!("{base}/openapi.json")).bearer_auth("sekret").send().await.unwrap();
    assert_eq!(spec.status(), 200);
    assert!(spec.json::<Value>().await.unwrap()["paths"]["/v1/chat/completions"].is_object());
}
