//! Structured output through the HTTP API with models that know nothing of
//! JSON: the tiny random-weights fixtures (llama-f32 and qwen3-f32, vocab 256)
//! given the 256-token `tiny256` fixture tokenizer and a Hermes-style chat
//! template. At temperature 1 with a 40-token budget, every `json_schema`
//! (strict), `json_object`, named-tool and `required`-tool output parses and
//! validates; `response_format` works on `/v1/completions`; schemas and
//! grammars that cannot be compiled are a 400 naming the field, with a short
//! message and no parser internals.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen3"];

const TEMPLATE: &str = "{%- for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}\n{% endfor %}\
{%- if tools %}<|tools|>{% for t in tools %}{{ t | tojson }}{% endfor %} Call one as <tool_call>{\"name\": .., \"arguments\": ..}</tool_call>\n{% endif %}\
{%- if add_generation_prompt %}<|assistant|>{% endif %}";

/// A fixture model's weights with the tiny256 tokenizer and the template.
fn model_dir(fixture: &str, root: &std::path::Path, id: &str) -> std::path::PathBuf {
    let m = root.join(id);
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
        std::os::unix::fs::symlink(common::fixture(&format!("models/{fixture}")).join(f), m.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(common::fixture("tokenizers/tiny256").join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("chat_template.jinja"), TEMPLATE).unwrap();
    m
}

fn base() -> &'static str {
    static BASE: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &BASE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let a = model_dir("llama-f32", dir.path(), MODELS[0]);
            let b = model_dir("qwen3-f32", dir.path(), MODELS[1]);
            let catalog = ModelCatalog::discover(&[(None, a), (None, b)], &[]).unwrap();
            let worker = Worker::start(
                WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 64, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 },
                &catalog,
            )
            .unwrap();
            let state = Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() });
            let base = common::serve(state);
            (dir, base)
        })
        .1
}

async fn post(path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}")))
}

fn validate(schema: &Value, v: &Value, ctx: &str) {
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(v) {
        panic!("{ctx}: {v} does not validate against {schema}: {e}");
    }
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"}
        },
        "required": ["city", "days", "unit"],
        "additionalProperties": false
    })
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "search", "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "exact": {"type": "boolean"}},
            "required": ["query", "exact"]}}}
    ])
}

fn tool_schema(name: &str) -> Value {
    tools().as_array().unwrap().iter().find(|t| t["function"]["name"] == name).unwrap()["function"]["parameters"].clone()
}

fn chat(model: &str, seed: u64, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 40,
        "temperature": 1.0,
        "seed": seed,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// Runs `n` requests per model (seeds differ) and hands each 200 body to `check`.
async fn each(path: &str, n: u64, body: impl Fn(&str, u64) -> Value, check: impl Fn(&Value, &str)) {
    for seed in 0..n {
        let model = MODELS[seed as usize % MODELS.len()];
        let (status, v) = post(path, &body(model, 1000 + seed)).await;
        assert_eq!(status, 200, "{model} seed {seed}: {v}");
        check(&v, &format!("{model} seed {seed}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_json_schema_is_valid_within_40_tokens() {
    let rf = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "strict": true, "schema": schema()}}});
    each("/v1/chat/completions", 20, |m, s| chat(m, s, rf.clone()), |v, ctx| {
        let text = v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{ctx}: {v}"));
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {text:?}"));
        validate(&schema(), &out, ctx);
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 40);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_is_valid_within_40_tokens() {
    let rf = json!({"response_format": {"type": "json_object"}});
    each("/v1/chat/completions", 20, |m, s| chat(m, s, rf.clone()), |v, ctx| {
        let text = v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{ctx}: {v}"));
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {text:?}"));
        assert!(out.is_object(), "{ctx}: {text:?}");
        // Compact layout: no newlines (inside strings they are escaped).
        assert!(!text.contains('\n'), "{ctx}: loose layout {text:?}");
    })
    .await;
}

fn check_tool_call(v: &Value, ctx: &str, allowed: &[&str]) {
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{ctx}: {v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{ctx}: no tool_calls: {v}"));
    assert_eq!(calls.len(), 1, "{ctx}: {v}");
    let name = calls[0]["function"]["name"].as_str().unwrap();
    assert!(allowed.contains(&name), "{ctx}: {name}");
    let args = calls[0]["function"]["arguments"].as_str().unwrap();
    let args: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{ctx}: arguments not JSON ({e}): {args:?}"));
    validate(&tool_schema(name), &args, ctx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tool_call_is_valid_within_40_tokens() {
    let extra = json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "search"}}});
    each("/v1/chat/completions", 20, |m, s| chat(m, s, extra.clone()), |v, ctx| check_tool_call(v, ctx, &["search"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tool_call_is_valid_within_40_tokens() {
    let extra = json!({"tools": tools(), "tool_choice": "required"});
    each("/v1/chat/completions", 20, |m, s| chat(m, s, extra.clone()), |v, ctx| check_tool_call(v, ctx, &["get_weather", "search"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_follow_response_format() {
    let body = |m: &str, seed: u64| {
        json!({"model": m, "prompt": "Weather as JSON:", "max_tokens": 40, "temperature": 1.0, "seed": seed,
               "response_format": {"type": "json_schema", "json_schema": {"name": "w", "strict": true, "schema": schema()}}})
    };
    each("/v1/completions", 10, body, |v, ctx| {
        let text = v["choices"][0]["text"].as_str().unwrap();
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {text:?}"));
        validate(&schema(), &out, ctx);
    })
    .await;
    // Several prompts: each gets its own constraint.
    let (status, v) = post(
        "/v1/completions",
        &json!({"model": MODELS[0], "prompt": ["a", "b"], "max_tokens": 40, "temperature": 1.0, "seed": 7,
                "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        let out: Value = serde_json::from_str(c["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {c}"));
        assert!(out.is_object());
    }
    // Streamed.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", base()))
        .json(&json!({"model": MODELS[1], "prompt": "x", "max_tokens": 40, "temperature": 1.0, "seed": 3, "stream": true,
                      "response_format": {"type": "json_object"}}))
        .send()
        .await
        .unwrap();
    let text: String = common::parse_sse(&r.text().await.unwrap())
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str::<Value>(&d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert!(serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")).is_object());
}

/// Schemas, grammars and tools that cannot be compiled.
fn hostile() -> Vec<(&'static str, Value)> {
    let mut deep = json!({"type": "string"});
    for _ in 0..100 {
        deep = json!({"type": "array", "items": deep});
    }
    let js = |s: Value| json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": s}});
    vec![
        ("recursive $ref", js(json!({"$ref": "#"}))),
        ("self-referencing $defs", js(json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}))),
        ("huge pattern", js(json!({"type": "string", "pattern": "^a{1000000}$"}))),
        ("huge minItems", js(json!({"type": "array", "minItems": 1000000}))),
        ("huge maxItems", js(json!({"type": "array", "items": {"type": "integer"}, "maxItems": 5000000}))),
        ("huge minLength", js(json!({"type": "string", "minLength": 2000000}))),
        ("deep nesting", js(deep)),
        ("regex a{1000000}", json!({"type": "regex", "regex": "a{1000000}"})),
        ("grammar loop", json!({"type": "grammar", "grammar": "start: a\na: a"})),
    ]
}

fn assert_clean_400(status: u16, v: &Value, param: &str, ctx: &str) {
    assert_eq!(status, 400, "{ctx}: {v}");
    let e = &v["error"];
    assert_eq!(e["param"], param, "{ctx}: {v}");
    assert_eq!(e["type"], "invalid_request_error", "{ctx}: {v}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(param) && msg.len() < 400 && !msg.contains('\n'), "{ctx}: {msg:?}");
    for internal in ["<state>", "Parser:", "Tokens:", "lexer_cost", "NoExtensionBias", "grm_prefix"] {
        assert!(!msg.contains(internal), "{ctx}: parser internals in {msg:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompilable_specs_are_400_naming_the_field() {
    for (case, rf) in hostile() {
        let (status, v) = post("/v1/chat/completions", &chat(MODELS[0], 1, json!({"response_format": rf}))).await;
        assert_clean_400(status, &v, "response_format", &format!("chat, {case}"));
        let body = json!({"model": MODELS[1], "prompt": "x", "max_tokens": 5, "response_format": rf});
        let (status, v) = post("/v1/completions", &body).await;
        assert_clean_400(status, &v, "response_format", &format!("completions, {case}"));
    }
    // A tool whose parameters cannot be compiled, forced by tool_choice.
    let bad_tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}]);
    let (status, v) = post("/v1/chat/completions", &chat(MODELS[0], 1, json!({"tools": bad_tools, "tool_choice": "required"}))).await;
    assert_clean_400(status, &v, "tools", "required tool");
    // Anthropic's shape on /v1/messages.
    let body = json!({"model": MODELS[0], "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "a{9999999}"}}}}],
                      "tool_choice": {"type": "any"}});
    let (status, v) = post("/v1/messages", &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // The server still serves.
    let rf = json!({"response_format": {"type": "json_object"}});
    let (status, v) = post("/v1/chat/completions", &chat(MODELS[0], 1, rf)).await;
    assert_eq!(status, 200, "{v}");
}
