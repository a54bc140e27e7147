//! Request validation and cross-site protection (api/limits.rs,
//! api/guard.rs): every bad value is a 4xx in the API's own shape naming the
//! field, the engine survives it, and browsers on other sites cannot drive
//! the server. Uses the tiny fixtures only (a copy of llama-f32 with a real
//! tokenizer and chat template stands in for a chat model).
mod common;

use rmlx::api::{guard::CrossSite, AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use serde_json::{json, Value};
use std::io::BufRead;
use std::sync::{Arc, OnceLock};

/// llama-f32's weights (context 512) with the Llama 3.1 tokenizer and
/// template: enough for requests that must be refused before generating.
fn chat_model() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("chatty");
        std::fs::create_dir(&m).unwrap();
        for f in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
            std::os::unix::fs::symlink(common::fixture("models/llama-f32").join(f), m.join(f)).unwrap();
        }
        for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
            std::os::unix::fs::symlink(common::fixture("tokenizers/llama3_1").join(f), m.join(f)).unwrap();
        }
        dir
    })
    .path()
}

fn state(opts: ServerOptions) -> Arc<AppState> {
    let catalog = ModelCatalog::discover(
        &[(None, chat_model().join("chatty")), (None, common::fixture("models/llama-f32"))],
        &[],
    )
    .unwrap();
    let worker = Worker::start(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 },
        &catalog,
    )
    .unwrap();
    Arc::new(AppState { catalog: Arc::new(catalog), worker, opts })
}

/// The shared server: loopback bind, no CORS origins configured.
fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| common::serve(state(ServerOptions::default())))
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_to(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(format!("{base}{path}")).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    post_to(base(), path, &body).await
}

fn chat(extra: Value) -> Value {
    merge(json!({"model": "chatty", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}), extra)
}
fn completion(extra: Value) -> Value {
    merge(json!({"model": "llama-f32", "prompt": [1, 2, 3], "max_tokens": 2}), extra)
}
fn message(extra: Value) -> Value {
    merge(json!({"model": "chatty", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}), extra)
}

fn merge(mut a: Value, b: Value) -> Value {
    for (k, v) in b.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

/// OpenAI's shape, naming `param`.
#[track_caller]
fn assert_openai_400(s: u16, v: &Value, param: &str) {
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"], param, "{v}");
}

/// Anthropic's shape, the field named in the message.
#[track_caller]
fn assert_anthropic_400(s: u16, v: &Value, field: &str) {
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(field), "{v}");
}

/// The engine still serves: one greedy completion on the fixture.
async fn assert_engine_serves(base: &str) {
    let (s, v) = post_to(base, "/v1/completions", &completion(json!({}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 2, "{v}");
}

const BAD_KEEP_ALIVE: [&str; 12] =
    ["1e19", "1e20", "1e308", "\"nan\"", "\"inf\"", "\"-inf\"", "-5", "\"-5m\"", "\"abc\"", "\"1e20\"", "\"18446744073709551615s\"", "1e400"];

#[tokio::test]
async fn keep_alive_out_of_range_is_400_on_every_route() {
    let _g = common::mlx_lock();
    for raw in BAD_KEEP_ALIVE {
        // 1e400 is not an f64: send it as raw JSON text.
        let send = |path: &'static str, body: Value| async move {
            let text = body.to_string().replace("\"__KA__\"", raw);
            let r = client()
                .post(format!("{}{path}", base()))
                .header("content-type", "application/json")
                .body(text)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path} keep_alive {raw}: no response: {e}"));
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        };
        let (s, v) = send("/v1/completions", completion(json!({"keep_alive": "__KA__"}))).await;
        assert_openai_400(s, &v, "keep_alive");
        let (s, v) = send("/v1/chat/completions", chat(json!({"keep_alive": "__KA__"}))).await;
        assert_openai_400(s, &v, "keep_alive");
        let (s, v) = send("/v1/messages", message(json!({"keep_alive": "__KA__"}))).await;
        assert_anthropic_400(s, &v, "keep_alive");
        let (s, v) = send("/v1/models/llama-f32/load", json!({"keep_alive": "__KA__"})).await;
        assert_openai_400(s, &v, "keep_alive");
    }
    // The engine took none of them: it still serves, and the good values work.
    assert_engine_serves(base()).await;
    for ok in [json!(-1), json!("-1"), json!("10m"), json!(300), json!("1h30m")] {
        let (s, v) = post("/v1/completions", completion(json!({"keep_alive": ok}))).await;
        assert_eq!(s, 200, "keep_alive {ok}: {v}");
    }
    let (s, v) = post("/v1/models/llama-f32/load", json!({"keep_alive": "5m"})).await;
    assert_eq!((s, &v["loaded"]), (200, &json!(true)), "{v}");
}

#[test]
fn idle_timeout_out_of_range_is_a_cli_error() {
    for (flag, env) in [(Some("18446744073709551615"), None), (Some("18446744073709551615m"), None), (Some("nan"), None), (None, Some("18446744073709551615"))] {
        let mut cmd = std::process::Command::new(common::rmlx_bin());
        cmd.args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0"]);
        cmd.args(["--model", common::fixture("models/llama-f32").to_str().unwrap()]);
        if let Some(f) = flag {
            cmd.args(["--idle-timeout", f]);
        }
        if let Some(e) = env {
            cmd.env("RMLX_SERVER__IDLE_TIMEOUT", e);
        }
        cmd.env("RUST_BACKTRACE", "0").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // A server that starts instead of refusing would never exit: read
        // stderr until it exits or says it is serving.
        let mut err = String::new();
        let mut served = false;
        for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
            let line = line.unwrap();
            served |= line.contains("rmlx serving");
            err.push_str(&line);
            err.push('\n');
            if served {
                break;
            }
        }
        if served {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        assert!(!served, "{flag:?}/{env:?}: the server started: {err}");
        assert!(!status.success(), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line expected: {err}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains("idle"), "{err}");
    }
}

#[tokio::test]
async fn stop_logit_bias_and_n_limits() {
    let _g = common::mlx_lock();
    let five: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    let long = "x".repeat(1000);
    for (path, body) in [("/v1/chat/completions", chat(json!({}))), ("/v1/completions", completion(json!({})))] {
        let (s, v) = post(path, merge(body.clone(), json!({"stop": five}))).await;
        assert_openai_400(s, &v, "stop");
        let (s, v) = post(path, merge(body.clone(), json!({"stop": long}))).await;
        assert_openai_400(s, &v, "stop");
        let bias: serde_json::Map<String, Value> = (0..301).map(|i| (i.to_string(), json!(1))).collect();
        let (s, v) = post(path, merge(body.clone(), json!({"logit_bias": bias}))).await;
        assert_openai_400(s, &v, "logit_bias");
        let (s, v) = post(path, merge(body.clone(), json!({"logit_bias": {"1": 101}}))).await;
        assert_openai_400(s, &v, "logit_bias");
        for n in [0, 2, 1000] {
            let (s, v) = post(path, merge(body.clone(), json!({"n": n}))).await;
            assert_openai_400(s, &v, "n");
        }
    }
    let seventeen: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let (s, v) = post("/v1/messages", message(json!({"stop_sequences": seventeen}))).await;
    assert_anthropic_400(s, &v, "stop_sequences");
    let (s, v) = post("/v1/messages", message(json!({"stop_sequences": [long]}))).await;
    assert_anthropic_400(s, &v, "stop_sequences");
    // 65 prompts in one completions request
    let many: Vec<Vec<u32>> = vec![vec![1, 2]; 65];
    let (s, v) = post("/v1/completions", completion(json!({"prompt": many}))).await;
    assert_openai_400(s, &v, "prompt");
    // within the limits: 4 stop strings (an empty one is ignored) and 300 biases
    let bias: serde_json::Map<String, Value> = (0..256).map(|i| (i.to_string(), json!(0))).collect();
    let (s, v) = post("/v1/completions", completion(json!({"stop": ["a", "b", "c", ""], "logit_bias": bias}))).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn max_tokens_must_fit_the_context_beside_the_prompt() {
    let _g = common::mlx_lock();
    // llama-f32: context 512. 3 prompt tokens + 510 > 512.
    let (s, v) = post("/v1/completions", completion(json!({"max_tokens": 510}))).await;
    assert_openai_400(s, &v, "max_tokens");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post("/v1/completions", completion(json!({"max_tokens": u32::MAX}))).await;
    assert_openai_400(s, &v, "max_tokens");
    let (s, v) = post("/v1/chat/completions", chat(json!({"max_tokens": 600}))).await;
    assert_openai_400(s, &v, "max_tokens");
    let (s, v) = post("/v1/chat/completions", chat(json!({"max_tokens": null, "max_completion_tokens": 600}))).await;
    assert_openai_400(s, &v, "max_completion_tokens");
    let (s, v) = post("/v1/messages", message(json!({"max_tokens": 100000}))).await;
    assert_anthropic_400(s, &v, "max_tokens");
    // 508 + 4 fills the context exactly: served; 508 + 5 is refused; with
    // no max_tokens the default (16) is capped to the room left (4)
    let prompt: Vec<u32> = (0..508).map(|i| 3 + i % 200).collect();
    let body = |max: Value| json!({"model": "llama-f32", "prompt": prompt, "max_tokens": max, "logit_bias": {"2": -100}});
    let (s, v) = post("/v1/completions", body(json!(5))).await;
    assert_openai_400(s, &v, "max_tokens");
    let (s, v) = post("/v1/completions", body(json!(4))).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post("/v1/completions", body(Value::Null)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 4, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn a_prompt_far_over_the_context_is_refused_before_tokenizing() {
    let _g = common::mlx_lock();
    // 1 MB of text; context 512 tokens: at most 512 * 32 + 64 KiB bytes are tokenized.
    let big = "hello world ".repeat(90_000);
    let check = |s: u16, v: &Value| {
        assert_eq!(s, 400, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("bytes") && msg.contains("512"), "refused by its byte length: {v}");
    };
    let (s, v) = post("/v1/completions", json!({"model": "chatty", "prompt": big, "max_tokens": 1})).await;
    check(s, &v);
    assert_eq!((v["error"]["param"].as_str(), v["error"]["code"].as_str()), (Some("prompt"), Some("context_length_exceeded")));
    let (s, v) = post("/v1/completions", json!({"model": "chatty", "prompt": ["x", big], "max_tokens": 1})).await;
    check(s, &v);
    let (s, v) = post("/v1/chat/completions", chat(json!({"messages": [{"role": "user", "content": big}]}))).await;
    check(s, &v);
    assert_eq!(v["error"]["param"], "messages");
    let (s, v) = post("/v1/messages", message(json!({"messages": [{"role": "user", "content": big}]}))).await;
    check(s, &v);
    assert_eq!(v["type"], "error");
    let (s, v) = post("/v1/messages/count_tokens", json!({"model": "chatty", "messages": [{"role": "user", "content": big}]})).await;
    check(s, &v);
    // a prompt under the bound is still tokenized and counted
    let (s, v) = post("/v1/messages/count_tokens", json!({"model": "chatty", "messages": [{"role": "user", "content": "hello world"}]})).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["input_tokens"].as_u64().unwrap() > 2, "{v}");
}

// ------------------------------------------------------------- cross-site

async fn raw_post(base: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = client().post(format!("{base}{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.body(body.to_string()).send().await.unwrap();
    let (s, h) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    (s, h, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn port(base: &str) -> &str {
    base.rsplit(':').next().unwrap()
}

#[tokio::test]
async fn json_routes_need_a_json_content_type() {
    let _g = common::mlx_lock();
    let body = completion(json!({})).to_string();
    for ct in ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let (s, _, v) = raw_post(base(), "/v1/completions", &[("content-type", ct)], &body).await;
        assert_eq!(s, 415, "{ct}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("application/json"), "{v}");
        let (s, _, v) = raw_post(base(), "/v1/messages", &[("content-type", ct)], &message(json!({})).to_string()).await;
        assert_eq!((s, &v["type"]), (415, &json!("error")), "Anthropic shape: {v}");
        let (s, _, _) = raw_post(base(), "/v1/models/llama-f32/unload", &[("content-type", ct)], "{}").await;
        assert_eq!(s, 415, "{ct}");
    }
    // a body without a content type is refused too
    let (s, _, v) = raw_post(base(), "/v1/completions", &[], &body).await;
    assert_eq!(s, 415, "{v}");
    // JSON, with parameters, is served; a POST without a body needs none
    let (s, _, v) = raw_post(base(), "/v1/completions", &[("content-type", "application/json; charset=utf-8")], &body).await;
    assert_eq!(s, 200, "{v}");
    let r = client().post(format!("{}/v1/models/llama-f32/unload", base())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn loopback_bind_accepts_only_loopback_hosts() {
    let p = port(base()).to_string();
    let get = |host: String| async move {
        client().get(format!("{}/v1/models", base())).header("host", host).send().await.unwrap()
    };
    for h in [format!("127.0.0.1:{p}"), format!("localhost:{p}"), format!("[::1]:{p}"), "localhost".into(), format!("app.localhost:{p}")] {
        assert_eq!(get(h.clone()).await.status(), 200, "{h}");
    }
    for h in [format!("evil.example:{p}"), "evil.example".into(), format!("10.1.2.3:{p}"), format!("localhost.evil.example:{p}")] {
        let r = get(h.clone()).await;
        assert_eq!(r.status(), 403, "{h}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("--allowed-host"), "{v}");
    }
    // DNS rebinding on a POST, in the Anthropic shape
    let (s, _, v) = raw_post(base(), "/v1/messages", &[("host", "evil.example"), ("content-type", "application/json")], "{}").await;
    assert_eq!((s, &v["error"]["type"]), (403, &json!("permission_error")), "{v}");
    // --allowed-host adds names; a non-loopback bind accepts any host
    let opts = |cs: CrossSite| ServerOptions { cross_site: cs, ..Default::default() };
    let detached = |o: ServerOptions| {
        Arc::new(AppState { catalog: Arc::new(ModelCatalog::default()), worker: Worker::detached(), opts: o })
    };
    let b = common::serve(detached(opts(CrossSite { allowed_hosts: vec!["myhost".into(), "*.lan".into()], ..Default::default() })));
    for (h, want) in [("myhost:1", 200), ("box.lan", 200), ("evil.example", 403), ("localhost", 200)] {
        let r = client().get(format!("{b}/v1/models")).header("host", h).send().await.unwrap();
        assert_eq!(r.status(), want, "{h}");
    }
    let b = common::serve(detached(opts(CrossSite::for_bind("0.0.0.0", vec![], vec![]))));
    let r = client().get(format!("{b}/v1/models")).header("host", "my-server.example:8080").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn cross_origin_requests_are_refused_unless_allowed() {
    let _g = common::mlx_lock();
    let own = base().to_string(); // http://127.0.0.1:PORT
    let json_ct = ("content-type", "application/json");
    let body = completion(json!({})).to_string();
    // another site: refused, reads and writes alike
    for origin in ["https://evil.example", "http://evil.example:8080", "null", "file://"] {
        let (s, h, v) = raw_post(base(), "/v1/completions", &[json_ct, ("origin", origin)], &body).await;
        assert_eq!(s, 403, "{origin}: {v}");
        assert!(h.get("access-control-allow-origin").is_none());
        assert!(v["error"]["message"].as_str().unwrap().contains("--cors-origin"), "{v}");
        let r = client().get(format!("{own}/v1/models")).header("origin", origin).send().await.unwrap();
        assert_eq!(r.status(), 403, "{origin}");
        let (s, _, _) = raw_post(base(), "/v1/models/llama-f32/unload", &[("origin", origin)], "").await;
        assert_eq!(s, 403, "{origin}");
        // its preflight too
        let r = client()
            .request(reqwest::Method::OPTIONS, format!("{own}/v1/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{origin}");
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }
    // the server's own origin (its /docs page) and loopback pages are served
    for origin in [own.as_str(), "http://localhost:5173", "http://127.0.0.1:3000"] {
        let (s, h, v) = raw_post(base(), "/v1/completions", &[json_ct, ("origin", origin)], &body).await;
        assert_eq!(s, 200, "{origin}: {v}");
        assert_eq!(h["access-control-allow-origin"], origin);
    }
}

#[tokio::test]
async fn cors_origin_allows_a_site_and_answers_its_preflight() {
    let _g = common::mlx_lock();
    let cs = CrossSite { cors_origins: vec!["https://app.example".into()], ..Default::default() };
    let b = common::serve(state(ServerOptions { cross_site: cs, ..Default::default() }));
    let preflight = |origin: &'static str| {
        client()
            .request(reqwest::Method::OPTIONS, format!("{b}/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type, x-stainless-os")
            .send()
    };
    let r = preflight("https://app.example").await.unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    let allowed = h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for want in ["authorization", "content-type", "x-stainless-os"] {
        assert!(allowed.contains(want), "{allowed}");
    }
    assert!(h["vary"].to_str().unwrap().contains("Origin"));
    assert_eq!(preflight("https://other.example").await.unwrap().status(), 403);
    // the request itself: served, readable by the page
    let (s, h, v) = raw_post(&b, "/v1/completions", &[("content-type", "application/json"), ("origin", "https://app.example")], &completion(json!({})).to_string()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    // errors too carry the header, so the page can read them
    let (s, h, _) = raw_post(&b, "/v1/completions", &[("content-type", "application/json"), ("origin", "https://app.example")], "{}").await;
    assert_eq!(s, 400);
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    // `*` allows any origin
    let cs = CrossSite { cors_origins: vec!["*".into()], ..Default::default() };
    let any = common::serve(Arc::new(AppState {
        catalog: Arc::new(ModelCatalog::default()),
        worker: Worker::detached(),
        opts: ServerOptions { cross_site: cs, ..Default::default() },
    }));
    let r = client().get(format!("{any}/v1/models")).header("origin", "https://anywhere.example").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://anywhere.example");
}

/// `rmlx serve --cors-origin ... --allowed-host ...` reach the guard.
#[tokio::test]
async fn serve_flags_configure_the_guard() {
    let mut child = std::process::Command::new(common::rmlx_bin())
        .args(["--plugins", common::plugins_dir().to_str().unwrap(), "serve", "--port", "0", "--no-metrics-db"])
        .args(["--model", common::fixture("models/llama-f32").to_str().unwrap()])
        .args(["--cors-origin", "https://app.example", "--allowed-host", "myhost"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(i) = line.find("on http://") {
            break line[i + 3..].split_whitespace().next().unwrap().to_string();
        }
    };
    let c = client();
    let r = c.get(format!("{url}/v1/models")).header("origin", "https://app.example").header("host", "myhost:1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
    let r = c.get(format!("{url}/v1/models")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c.get(format!("{url}/v1/models")).header("host", "evil.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------- blocking work

/// `common::serve`, but on a current-thread runtime: one blocking call on
/// the async thread stops every other request.
fn serve_on_one_thread(state: Arc<AppState>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            use poem::listener::{Acceptor, Listener};
            let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0").into_acceptor().await.unwrap();
            tx.send(format!("http://{}", acceptor.local_addr()[0].as_socket_addr().unwrap())).unwrap();
            poem::Server::new_with_acceptor(acceptor).run(rmlx::api::app(state)).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// A model's template files are read on the blocking pool: with its
/// `chat_template.jinja` a FIFO that nobody writes yet, a chat request waits
/// in the read, and the server (on ONE async thread) still answers others.
#[tokio::test]
async fn template_files_are_read_off_the_async_threads() {
    use std::io::Write;
    use std::os::unix::{ffi::OsStrExt, fs::OpenOptionsExt};
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("fifo-chat");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
        std::os::unix::fs::symlink(common::fixture("models/llama-f32").join(f), m.join(f)).unwrap();
    }
    // the template itself comes from tokenizer_config.json; the .jinja file
    // is read again for its source (the tool-call and thinking formats)
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(common::fixture("tokenizers/llama3_1").join(f), m.join(f)).unwrap();
    }
    let fifo = m.join("chat_template.jinja");
    let path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let catalog = ModelCatalog::discover(&[(None, m.clone())], &[]).unwrap();
    let base = serve_on_one_thread(Arc::new(AppState {
        catalog: Arc::new(catalog),
        worker: Worker::detached(),
        opts: ServerOptions::default(),
    }));
    // max_tokens over the context: refused once the prompt is rendered
    let b = base.clone();
    let body = json!({"model": "fifo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600});
    let chat = tokio::spawn(async move { post_to(&b, "/v1/chat/completions", &body).await });
    // Wait until the server has the FIFO open for reading (a non-blocking
    // open for writing fails with ENXIO until then).
    let mut writer = loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo) {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(e) => panic!("{e}"),
        }
    };
    // The read is waiting; the server answers anyway (the limit only turns
    // a server that stopped answering into a failure instead of a hang).
    let r = client().get(format!("{base}/v1/models")).timeout(std::time::Duration::from_secs(60)).send().await;
    assert!(r.as_ref().is_ok_and(|r| r.status() == 200), "the server stopped answering while a template file was read: {r:?}");
    writer.write_all(b"{{ bos_token }}").unwrap();
    drop(writer);
    let (s, v) = chat.await.unwrap();
    assert_openai_400(s, &v, "max_tokens");
}
