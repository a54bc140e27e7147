//! Reasoning through the HTTP API (in process, port 0, SSE read to the end):
//! `enable_thinking`, thinking returned apart from the answer
//! (`reasoning_content` in OpenAI messages and deltas, `thinking` blocks and
//! `thinking_delta` events in Anthropic), the thinking budget, and
//! constrained output (json_schema, forced tool calls) that starts after the
//! thinking block.
//!
//! No fixture model thinks on its own, so the test model is the real default
//! model (SmolLM2-135M-Instruct, `make default-model`) in a temp dir, its
//! weights linked, with `tests/api/smollm2_think.jinja` as chat template: the
//! generation prompt ends with `<think>\n` (the output starts inside the
//! block) and `enable_thinking: false` renders an empty block like Qwen 3.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use rmlx::model::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, OnceLock};

const THINK: &str = "smol-think";
const CLOSE: &str = "\n</think>\n\n";

use common::{default_model, parse_sse};

/// The thinking test model: the default model's files linked into a temp dir,
/// plus the thinking chat template.
fn think_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(default_model()).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if name == "chat_template.jinja" {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), dir.path().join(&name)).unwrap();
        }
        std::fs::copy(common::repo().join("tests/api/smollm2_think.jinja"), dir.path().join("chat_template.jinja")).unwrap();
        dir
    })
    .path()
}

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_model_dir(think_model()).unwrap())
}

fn ntok(s: &str) -> usize {
    tokenizer().encode(s, false).unwrap().len()
}

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let catalog = ModelCatalog::discover(&[(Some(THINK.into()), think_model().to_path_buf())], &[]).unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        let state = Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() });
        common::serve(state)
    })
}

async fn post(path: &str, body: Value) -> Value {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

/// SSE (event name, data), read to the end of the stream.
async fn sse(path: &str, body: Value) -> Vec<(Option<String>, String)> {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    parse_sse(&r.text().await.unwrap())
}

fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": THINK, "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// OpenAI chunks (before `[DONE]`): (reasoning, content, finish_reason), and
/// checks that every reasoning delta comes before the first content delta.
fn oai_stream(events: &[(Option<String>, String)]) -> (String, String, String, Vec<Value>) {
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e.1).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (mut reasoning, mut content, mut finish) = (String::new(), String::new(), String::new());
    for c in &chunks {
        let Some(ch) = c["choices"].get(0) else { continue };
        if let Some(r) = ch["delta"]["reasoning_content"].as_str() {
            assert!(content.is_empty(), "reasoning after content: {r:?}");
            reasoning.push_str(r);
        }
        if let Some(t) = ch["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (reasoning, content, finish, chunks)
}

#[tokio::test]
async fn openai_thinking_budget_closes_the_block_then_the_model_answers() {
    let _g = common::mlx_lock();
    const N: usize = 6;
    let req = chat("What is the capital of France?", json!({"thinking_budget": N, "logprobs": true}));
    let v = post("/v1/chat/completions", req.clone()).await;
    let m = &v["choices"][0]["message"];
    let reasoning = m["reasoning_content"].as_str().expect("reasoning_content").to_string();
    let content = m["content"].as_str().unwrap().to_string();
    assert!(!reasoning.is_empty() && !content.trim().is_empty(), "{m}");
    assert!(!reasoning.contains("think>") && !content.contains("think>"), "{m}");
    assert!(ntok(&reasoning) <= N, "{reasoning:?} is more than {N} tokens");
    // Token by token: N thinking tokens, then exactly the forced closing tag, then the answer.
    let toks: Vec<String> =
        v["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap().to_string()).collect();
    let k = ntok(CLOSE);
    assert!(toks.len() > N + k, "{toks:?}");
    assert_eq!(toks[..N].concat().trim(), reasoning, "{toks:?}");
    assert_eq!(toks[N..N + k].concat(), CLOSE, "{toks:?}");
    assert_eq!(toks[N + k..].concat().trim_start(), content, "{toks:?}");
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() as usize, toks.len());

    // Streamed: the same split, reasoning deltas first.
    let mut sreq = req;
    sreq["stream"] = json!(true);
    let (r, c, finish, _) = oai_stream(&sse("/v1/chat/completions", sreq).await);
    assert_eq!((r.as_str(), c.as_str()), (reasoning.as_str(), content.as_str()));
    assert_eq!(finish, v["choices"][0]["finish_reason"].as_str().unwrap());
}

#[tokio::test]
async fn openai_without_budget_thinks_until_the_model_stops() {
    let _g = common::mlx_lock();
    let v = post("/v1/chat/completions", chat("What is the capital of France?", json!({"max_tokens": 16}))).await;
    let c = &v["choices"][0];
    let reasoning = c["message"]["reasoning_content"].as_str().expect("reasoning_content");
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    // The model never writes `</think>` here: all it says (up to EOS or max_tokens) is thinking.
    assert!(reasoning.contains("Paris"), "{c}");
    assert_eq!(c["message"]["content"], "", "{c}");
    assert!(completion <= 16 && ntok(reasoning) <= completion, "{v}");
    if c["finish_reason"] == "length" {
        assert_eq!(completion, 16);
    }
}

#[tokio::test]
async fn enable_thinking_false_reaches_the_template() {
    let _g = common::mlx_lock();
    let on = post("/v1/chat/completions", chat("What is the capital of France?", json!({"max_tokens": 12}))).await;
    let off = post("/v1/chat/completions", chat("What is the capital of France?", json!({"max_tokens": 12, "enable_thinking": false}))).await;
    // The empty block `<think>\n\n</think>\n\n` is in the prompt instead of `<think>\n`.
    let extra = ntok("<think>\n\n</think>\n\n") - ntok("<think>\n");
    assert_eq!(off["usage"]["prompt_tokens"].as_u64().unwrap() - on["usage"]["prompt_tokens"].as_u64().unwrap(), extra as u64);
    let m = &off["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none_or(Value::is_null), "{m}");
    let content = m["content"].as_str().unwrap();
    assert!(content.contains("Paris") && content == content.trim_start(), "{m}");
    // chat_template_kwargs reach the template the same way.
    let kw = post(
        "/v1/chat/completions",
        chat("What is the capital of France?", json!({"max_tokens": 12, "chat_template_kwargs": {"enable_thinking": false}})),
    )
    .await;
    assert_eq!(kw["choices"][0]["message"], off["choices"][0]["message"]);
    // Anthropic: `thinking: disabled` renders the same prompt.
    let n = post(
        "/v1/messages/count_tokens",
        json!({"model": THINK, "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(n["input_tokens"], off["usage"]["prompt_tokens"]);
}

#[tokio::test]
async fn anthropic_thinking_blocks_plain_and_streamed() {
    let _g = common::mlx_lock();
    const N: usize = 5;
    let req = json!({
        "model": THINK, "max_tokens": 20, "temperature": 0,
        "thinking": {"type": "enabled", "budget_tokens": N},
        "messages": [{"role": "user", "content": "What is the capital of France?"}]
    });
    let v = post("/v1/messages", req.clone()).await;
    let content = v["content"].as_array().unwrap();
    assert_eq!(content.len(), 2, "{v}");
    assert_eq!(content[0]["type"], "thinking");
    assert_eq!(content[1]["type"], "text");
    let thinking = content[0]["thinking"].as_str().unwrap();
    let text = content[1]["text"].as_str().unwrap();
    assert!(!thinking.is_empty() && !text.trim().is_empty() && ntok(thinking) <= N, "{v}");
    assert!(content[0]["signature"].is_string());

    let mut sreq = req;
    sreq["stream"] = json!(true);
    let events = sse("/v1/messages", sreq).await;
    let names: Vec<&str> = events.iter().map(|e| e.0.as_deref().unwrap()).collect();
    let data: Vec<Value> = events.iter().map(|e| serde_json::from_str(&e.1).unwrap()).collect();
    for (n, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *n);
    }
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(data[1]["content_block"]["type"], "thinking");
    assert_eq!(data[1]["index"], 0);
    let (mut st, mut sx) = (String::new(), String::new());
    let mut order = Vec::new();
    for d in &data {
        match d["type"].as_str().unwrap() {
            "content_block_start" => order.push(format!("start {} {}", d["index"], d["content_block"]["type"].as_str().unwrap())),
            "content_block_stop" => order.push(format!("stop {}", d["index"])),
            "content_block_delta" => match d["delta"]["type"].as_str().unwrap() {
                "thinking_delta" => {
                    assert_eq!(d["index"], 0);
                    st.push_str(d["delta"]["thinking"].as_str().unwrap())
                }
                "text_delta" => {
                    assert_eq!(d["index"], 1);
                    sx.push_str(d["delta"]["text"].as_str().unwrap())
                }
                other => panic!("unexpected delta {other}"),
            },
            _ => {}
        }
    }
    assert_eq!(order, ["start 0 thinking", "stop 0", "start 1 text", "stop 1"]);
    assert_eq!((st.as_str(), sx.as_str()), (thinking, text));
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert_eq!(data[data.len() - 2]["delta"]["stop_reason"], v["stop_reason"]);
    assert_eq!(data[data.len() - 2]["usage"]["output_tokens"], v["usage"]["output_tokens"]);
}

fn city_schema() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false})
}

fn assert_city(content: &str) {
    let j: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
    let o = j.as_object().unwrap();
    assert!(o.len() == 1 && o["city"].is_string(), "{content}");
}

#[tokio::test]
async fn json_schema_starts_after_the_thinking_block() {
    let _g = common::mlx_lock();
    let fmt = json!({"type": "json_schema", "json_schema": {"name": "city", "strict": true, "schema": city_schema()}});
    // Thinking on: free thinking (closed by the budget), then JSON that validates.
    let v = post(
        "/v1/chat/completions",
        chat("Name a city, as JSON.", json!({"max_tokens": 40, "thinking_budget": 6, "response_format": fmt})),
    )
    .await;
    let m = &v["choices"][0]["message"];
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let reasoning = m["reasoning_content"].as_str().expect("reasoning_content");
    assert!(!reasoning.is_empty() && ntok(reasoning) <= 6, "{m}");
    assert_city(m["content"].as_str().unwrap());
    // Streamed, the same.
    let (r, c, finish, _) = oai_stream(
        &sse(
            "/v1/chat/completions",
            chat("Name a city, as JSON.", json!({"max_tokens": 40, "thinking_budget": 6, "response_format": fmt, "stream": true})),
        )
        .await,
    );
    assert_eq!((r.as_str(), c.as_str(), finish.as_str()), (reasoning, m["content"].as_str().unwrap(), "stop"));
    // Thinking off: JSON from the first token, no reasoning.
    let v = post(
        "/v1/chat/completions",
        chat("Name a city, as JSON.", json!({"max_tokens": 40, "enable_thinking": false, "response_format": fmt})),
    )
    .await;
    let m = &v["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none_or(Value::is_null), "{m}");
    assert_city(m["content"].as_str().unwrap());
}

#[tokio::test]
async fn forced_tool_calls_start_after_the_thinking_block() {
    let _g = common::mlx_lock();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
        "parameters": city_schema()}}]);
    let req = chat(
        "What is the weather in Paris?",
        json!({"max_tokens": 60, "thinking_budget": 5, "tools": tools, "tool_choice": "required", "stream": true}),
    );
    let (reasoning, _, finish, chunks) = oai_stream(&sse("/v1/chat/completions", req).await);
    assert!(!reasoning.is_empty() && ntok(&reasoning) <= 5, "{reasoning:?}");
    assert_eq!(finish, "tool_calls");
    let (mut name, mut args) = (String::new(), String::new());
    for c in &chunks {
        for tc in c["choices"].get(0).and_then(|ch| ch["delta"]["tool_calls"].as_array()).into_iter().flatten() {
            name.push_str(tc["function"]["name"].as_str().unwrap_or(""));
            args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(name, "get_weather");
    assert_city(&args);

    // Anthropic: a thinking block, then the tool_use block.
    let v = post(
        "/v1/messages",
        json!({"model": THINK, "max_tokens": 60, "temperature": 0, "thinking": {"type": "enabled", "budget_tokens": 5},
               "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
               "tools": [{"name": "get_weather", "input_schema": city_schema()}], "tool_choice": {"type": "any"}}),
    )
    .await;
    let content = v["content"].as_array().unwrap();
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    assert_eq!(content[0]["type"], "thinking", "{v}");
    let uses: Vec<&Value> = content.iter().filter(|b| b["type"] == "tool_use").collect();
    assert_eq!(uses.len(), 1, "{v}");
    assert_eq!(uses[0]["name"], "get_weather");
    assert_city(&uses[0]["input"].to_string());
}
