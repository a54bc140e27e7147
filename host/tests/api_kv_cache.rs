//! The `kv_cache` extension field over HTTP (in process, port 0): as a
//! string and as `{"k", "v"}` in OpenAI chat completions, completions and
//! Anthropic messages, each request running in its family's lane; an
//! unknown family, a malformed value or a family the model does not fit is a
//! 400 in the API's own shape naming the field. Uses the tiny llama-f32
//! fixture (completions by token ids) and the default model
//! (SmolLM2-135M-Instruct, `make default-model`) for the chat routes.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::scheduler::{KvBudget, SchedulerConfig};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

const SMOL: &str = "SmolLM2-135M-Instruct";
const LLAMA: &str = "llama-f32";

/// The shared server (one engine for the whole file) and its state.
fn server() -> &'static (String, Arc<AppState>) {
    static S: OnceLock<(String, Arc<AppState>)> = OnceLock::new();
    S.get_or_init(|| {
        let catalog = ModelCatalog::discover(
            &[(Some(SMOL.into()), common::default_model()), (None, common::fixture(&format!("models/{LLAMA}")))],
            &[],
        )
        .unwrap();
        let worker = Worker::start_with(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 },
            SchedulerConfig { kv_budget: KvBudget::Bytes(256 << 20), ..SchedulerConfig::default() },
            &catalog,
        )
        .unwrap();
        let state = Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() });
        (common::serve(state.clone()), state)
    })
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", server().0)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn completion(kv: Value) -> Value {
    json!({"model": LLAMA, "prompt": (5..20).collect::<Vec<u32>>(), "max_tokens": 6, "temperature": 0, "kv_cache": kv})
}

fn chat(kv: Value) -> Value {
    json!({"model": SMOL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "temperature": 0, "kv_cache": kv})
}

fn message(kv: Value) -> Value {
    json!({"model": SMOL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, "temperature": 0, "kv_cache": kv})
}

/// The engine's lane labels (model id for the models' own families).
fn lanes() -> Vec<String> {
    server().1.worker.stats().blocks.into_iter().map(|(l, _)| l).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_cache_as_a_string_and_as_an_object_runs_in_its_lane() {
    // Completions: "turbo3" and {"k": "turbo3", "v": "turbo3"} are one lane
    // (same tokens); keys and values apart are another.
    let (s, a) = post("/v1/completions", completion(json!("turbo3"))).await;
    assert_eq!(s, 200, "{a}");
    let tokens = a["choices"][0]["token_ids"].clone();
    assert_eq!(tokens.as_array().unwrap().len(), 6, "{a}");
    let (s, b) = post("/v1/completions", completion(json!({"k": "turbo3", "v": "turbo3"}))).await;
    assert_eq!((s, &b["choices"][0]["token_ids"]), (200, &tokens), "{b}");
    let (s, c) = post("/v1/completions", completion(json!({"k": "fp8", "v": "turbo3"}))).await;
    assert_eq!(s, 200, "{c}");
    // "auto" and null are the model's own family (the default lane).
    let (s, d) = post("/v1/completions", completion(json!("auto"))).await;
    assert_eq!(s, 200, "{d}");
    let (s, e) = post("/v1/completions", completion(Value::Null)).await;
    assert_eq!((s, &e["choices"][0]["token_ids"]), (200, &d["choices"][0]["token_ids"]), "{e}");
    let have = lanes();
    for want in [format!("{LLAMA} kv=turbo3"), format!("{LLAMA} kv=fp8/turbo3"), LLAMA.to_string()] {
        assert!(have.contains(&want), "no lane {want}: {have:?}");
    }

    // Chat completions, plain and streamed, and Anthropic messages.
    let (s, v) = post("/v1/chat/completions", chat(json!("q4"))).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    let mut body = chat(json!({"k": "q8", "v": "turbo3"}));
    body["stream"] = json!(true);
    let r = reqwest::Client::new().post(format!("{}/v1/chat/completions", server().0)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let events = common::parse_sse(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    assert!(events.iter().all(|(_, d)| !d.contains("\"error\"")), "{events:?}");
    let (s, v) = post("/v1/messages", message(json!({"k": "q8"}))).await;
    assert_eq!((s, v["type"].as_str()), (200, Some("message")), "{v}");
    let have = lanes();
    for want in ["kv=q4", "kv=q8/turbo3", "kv=q8/"] {
        assert!(have.iter().any(|l| l.starts_with(SMOL) && l.contains(want)), "no {SMOL} lane {want}: {have:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_kv_cache_is_a_400_naming_the_field() {
    // Unknown names, in each API's shape, listing the known families.
    let (s, v) = post("/v1/chat/completions", chat(json!("q5"))).await;
    assert_eq!((s, v["error"]["type"].as_str(), v["error"]["param"].as_str()), (400, Some("invalid_request_error"), Some("kv_cache")), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"q5\"") && msg.contains("turbo3") && msg.contains("f16"), "{msg}");
    let (s, v) = post("/v1/completions", completion(json!({"k": "q8", "v": "nope"}))).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("kv_cache.v")), "{v}");
    let (s, v) = post("/v1/messages", message(json!("nope"))).await;
    assert_eq!((s, v["type"].as_str(), v["error"]["type"].as_str()), (400, Some("error"), Some("invalid_request_error")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("kv_cache"), "{v}");
    // Malformed values.
    for bad in [json!(5), json!({"k": "q8", "x": "q4"}), json!(""), json!(["q4"])] {
        let (s, v) = post("/v1/completions", completion(bad.clone())).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"]["param"].as_str().unwrap_or_default().starts_with("kv_cache"), "{bad}: {v}");
    }
    // `{}` leaves both sides out: the model's own family, as `null` does.
    let (s, v) = post("/v1/completions", completion(json!({}))).await;
    assert_eq!(s, 200, "{v}");
    // A family the model's shape does not fit (affine needs head_dim % 32).
    let (s, v) = post("/v1/completions", completion(json!("q4"))).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("kv_cache")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("head_dim 16"), "{v}");
}
