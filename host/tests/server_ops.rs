//! `rmlx serve` run as users run it, as a subprocess: its log (one line per
//! request, model load/unload, shutdown; text and JSON; no colour codes into
//! a pipe; RMLX_LOG and --log-level), the SIGTERM/SIGINT drain, /docs on any
//! port, Anthropic tool ids, and tools a chat template cannot show the model.
//! Tiny fixtures only: llama-f32, and copies of it with the tiny256
//! tokenizer and a chat template that does / does not render `tools`.
mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A template that never reads `tools` (like SmolLM2's and Gemma 3's).
const NO_TOOLS_TEMPLATE: &str = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
/// The same with a tools section (like Qwen's).
const TOOLS_TEMPLATE: &str = "{% if tools %}tools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

/// `notools` and `withtools`: llama-f32's weights, the tiny256 tokenizer
/// (fits its 256-token vocabulary) and one of the templates above.
fn chat_models() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        for (name, template) in [("notools", NO_TOOLS_TEMPLATE), ("withtools", TOOLS_TEMPLATE)] {
            let m = dir.path().join(name);
            std::fs::create_dir(&m).unwrap();
            for f in ["config.json", "model.safetensors", "model.safetensors.index.json"] {
                std::os::unix::fs::symlink(common::fixture("models/llama-f32").join(f), m.join(f)).unwrap();
            }
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::os::unix::fs::symlink(common::fixture("tokenizers/tiny256").join(f), m.join(f)).unwrap();
            }
            std::fs::write(m.join("chat_template.jinja"), template).unwrap();
        }
        // A model whose config asks for a layer its weights lack: it fails at load.
        let m = dir.path().join("broken");
        std::fs::create_dir(&m).unwrap();
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("models/llama-f32/config.json")).unwrap()).unwrap();
        config["num_hidden_layers"] = json!(3);
        std::fs::write(m.join("config.json"), config.to_string()).unwrap();
        for f in ["model.safetensors", "model.safetensors.index.json"] {
            std::os::unix::fs::symlink(common::fixture("models/llama-f32").join(f), m.join(f)).unwrap();
        }
        dir
    })
    .path()
}

/// A running `rmlx serve`; its stderr is collected line by line.
struct Served {
    child: Child,
    base: String,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    raw: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Guards against a hang; never a speed assertion.
const PATIENCE: Duration = Duration::from_secs(120);

impl Served {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(common::rmlx_bin());
        cmd.arg("--plugins").arg(common::plugins_dir()).arg("serve").args(["--port", "0"]).args(args);
        cmd.env_remove("RMLX_LOG").env("RMLX_CACHE_DIR", chat_models().join("cache"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let (l2, r2) = (lines.clone(), raw.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            while err.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
                r2.lock().unwrap().extend_from_slice(&buf);
                l2.lock().unwrap().push(String::from_utf8_lossy(&buf).trim_end().to_string());
                buf.clear();
            }
        });
        let mut s = Served { child, base: String::new(), addr: String::new(), lines, raw, reader: Some(reader) };
        let line = s.wait_for(|l| l.contains("rmlx serving"));
        let at = line.find("http://").expect("address on the start line") + "http://".len();
        let addr: String = line[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
        s.base = format!("http://{addr}");
        s.addr = addr;
        s
    }

    /// The first stderr line matching `pred`, waiting for it.
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return l.clone();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!("rmlx serve exited ({st}) before the line came:\n{}", self.log());
            }
            assert!(t0.elapsed() < PATIENCE, "no such line in:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok, "kill -{sig}");
    }

    /// Sends `sig` and waits for the exit; returns its code and the whole stderr.
    fn stop(self, sig: &str) -> (Option<i32>, String, Vec<u8>) {
        self.signal(sig);
        self.stop_after_signal()
    }

    /// Waits for the exit after a signal already sent.
    fn stop_after_signal(mut self) -> (Option<i32>, String, Vec<u8>) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(t0.elapsed() < PATIENCE, "no exit after the signal:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipe is at its end: the reader has every line.
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let raw = self.raw.lock().unwrap().clone();
        (status.code(), self.log(), raw)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(body).send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

async fn get(base: &str, path: &str) -> (u16, String) {
    let r = reqwest::Client::new().get(format!("{base}{path}")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn llama() -> String {
    common::fixture("models/llama-f32").display().to_string()
}

fn request_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("access_log") && l.contains("request")).collect()
}

#[test]
fn text_log_has_a_line_per_request_and_no_colour() {
    let broken = chat_models().join("broken").display().to_string();
    let s = Served::start(&["--model", &llama(), "--model", &broken, "--no-metrics-db"], &[]);
    let base = s.base.clone();
    rt().block_on(async {
        let (st, _, _) = post(&base, "/v1/completions", &json!({"model": "broken", "prompt": [1, 5], "max_tokens": 2})).await;
        assert_eq!(st, 500);
        let body = json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 8, "logit_bias": {"2": -100}});
        let (st, _, _) = post(&base, "/v1/completions", &body).await;
        assert_eq!(st, 200);
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["max_tokens"] = json!(6);
        let (st, _, text) = post(&base, "/v1/completions", &streamed).await;
        assert_eq!(st, 200);
        assert!(text.contains("[DONE]"));
        assert_eq!(get(&base, "/v1/models").await.0, 200);
        assert_eq!(get(&base, "/health").await.0, 200);
        let (st, _, _) = post(&base, "/v1/chat/completions", &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(st, 404);
        let (st, _, _) = post(&base, "/v1/models/llama-f32/unload", &json!({})).await;
        assert_eq!(st, 200);
    });
    let (code, log, raw) = s.stop("TERM");
    assert_eq!(code, Some(0), "{log}");
    // A pipe gets no colour codes.
    assert!(!raw.contains(&0x1b), "ESC in the log:\n{log}");
    let req = request_lines(&log);
    let has = |needles: &[&str]| req.iter().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(
        has(&["method=POST", "path=/v1/completions", "model=llama-f32", "status=200", "prompt_tokens=3", "completion_tokens=8", "ttft_ms=", "duration_ms=", "finish=length"]),
        "{log}"
    );
    // The stream's line is written at its end, with all its tokens.
    assert!(has(&["path=/v1/completions", "completion_tokens=6", "finish=length"]), "{log}");
    assert!(has(&["method=GET", "path=/v1/models", "status=200"]), "{log}");
    assert!(has(&["path=/v1/chat/completions", "status=404"]), "{log}");
    // Probes stay out of the default log.
    assert!(!req.iter().any(|l| l.contains("path=/health")), "{log}");
    assert_eq!(req.len(), 6, "one line per request:\n{log}");
    // A model that fails to load: a warning, and its request's line.
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("loading model `broken`")), "{log}");
    assert!(has(&["model=broken", "status=500", "finish=error"]), "{log}");
    assert!(log.contains("loaded llama-f32"), "{log}");
    assert!(log.contains("unloaded llama-f32"), "{log}");
    assert!(log.contains("shutdown: SIGTERM received"), "{log}");
    assert!(log.contains("shutdown complete"), "{log}");
}

#[test]
fn json_log_lines_are_json() {
    let s = Served::start(&["--model", &llama(), "--no-metrics-db", "--log-format", "json"], &[]);
    let base = s.base.clone();
    rt().block_on(async {
        let body = json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 4, "logit_bias": {"2": -100}, "stream": true});
        assert_eq!(post(&base, "/v1/completions", &body).await.0, 200);
    });
    let (code, log, raw) = s.stop("INT");
    assert_eq!(code, Some(0), "{log}");
    assert!(!raw.contains(&0x1b), "{log}");
    let mut requests = Vec::new();
    for l in log.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(), "{l}");
        if v["message"] == "request" {
            requests.push(v);
        }
    }
    assert_eq!(requests.len(), 1, "{log}");
    let r = &requests[0];
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/v1/completions");
    assert_eq!(r["model"], "llama-f32");
    assert_eq!(r["status"], 200);
    assert_eq!(r["prompt_tokens"], 3);
    assert_eq!(r["completion_tokens"], 4);
    assert!(r["ttft_ms"].is_u64() && r["duration_ms"].is_u64(), "{r}");
    assert!(log.contains("SIGINT received"), "{log}");
}

#[test]
fn rmlx_log_filters_and_log_level_wins() {
    let one_request = |args: &[&str], env: &[(&str, &str)]| {
        let mut a = vec!["--model", "L", "--no-metrics-db"];
        a.extend_from_slice(args);
        let l = llama();
        a[1] = &l;
        let s = Served::start(&a, env);
        let base = s.base.clone();
        rt().block_on(async {
            let body = json!({"model": "llama-f32", "prompt": [1, 5, 9], "max_tokens": 2});
            assert_eq!(post(&base, "/v1/completions", &body).await.0, 200);
        });
        let (code, log, _) = s.stop("TERM");
        assert_eq!(code, Some(0), "{log}");
        log
    };
    // RMLX_LOG=warn: no request lines.
    let log = one_request(&[], &[("RMLX_LOG", "warn")]);
    assert!(request_lines(&log).is_empty(), "{log}");
    // --log-level wins over RMLX_LOG.
    let log = one_request(&["--log-level", "info"], &[("RMLX_LOG", "warn")]);
    assert_eq!(request_lines(&log).len(), 1, "{log}");
    // RMLX_LOG takes per-target directives.
    let log = one_request(&[], &[("RMLX_LOG", "warn,rmlx::api::access_log=info")]);
    assert_eq!(request_lines(&log).len(), 1, "{log}");
    assert!(!log.contains("loaded llama-f32"), "{log}");
}

/// One HTTP/1.0 request on a raw socket (the body ends when the server
/// closes), so the test controls when it reads.
fn raw_post(addr: &str, path: &str, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    s
}

fn count_files(dir: &Path, ext: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| e.path())
        .map(|p: PathBuf| if p.is_dir() { count_files(&p, ext) } else { usize::from(p.extension().is_some_and(|x| x == ext)) })
        .sum()
}

#[test]
fn sigterm_drains_a_running_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("runs.sqlite");
    let ssd = tmp.path().join("ssd");
    let (db_s, ssd_s) = (db.display().to_string(), ssd.display().to_string());
    let mut s = Served::start(&["--model", &llama(), "--metrics-db", &db_s, "--kv-ssd-dir", &ssd_s, "--shutdown-timeout", "600"], &[]);
    // 40 prompt tokens (two full KV blocks for the prefix cache), 400 tokens out, no EOS.
    let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 250).collect();
    let body = json!({"model": "llama-f32", "prompt": prompt, "max_tokens": 400, "logit_bias": {"2": -100}, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut stream = raw_post(&s.addr, "/v1/completions", &body);
    // Wait until tokens flow, then ask the server to stop.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"text\"") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s.signal("TERM");
    s.wait_for(|l| l.contains("shutdown: SIGTERM received"));
    // New connections are refused from now on (the listener closes as the drain starts).
    let t0 = Instant::now();
    loop {
        match TcpStream::connect(&s.addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connect: {e}"),
            Ok(_) => {
                assert!(t0.elapsed() < PATIENCE, "still accepting after SIGTERM:\n{}", s.log());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    // The running stream finishes whole.
    stream.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got).to_string();
    let events = common::parse_sse(text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or(""));
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"), "{text}");
    let usage = events.iter().filter_map(|e| serde_json::from_str::<Value>(&e.1).ok()).find(|v| v["usage"].is_object()).expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 400, "{text}");
    let (code, log, _) = s.stop_after_signal();
    assert_eq!(code, Some(0), "{log}");
    // The request was still running when the signal came: its line comes after.
    let sig_at = log.find("shutdown: SIGTERM received").unwrap();
    let req_at = log.find("completion_tokens=400").expect("the stream's log line");
    assert!(req_at > sig_at, "{log}");
    // The run log has the run's end; the prefix cache went to the SSD tier.
    let conn = rmlx::metrics_db::open_read(&db).unwrap();
    let runs = rmlx::metrics_db::runs(&conn).unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].ended_at.is_some(), "no end time recorded");
    assert_eq!(runs[0].requests, 1);
    assert!(count_files(&ssd, "kvb") >= 2, "prefix cache not spilled to {}", ssd.display());
}

#[test]
fn docs_work_on_any_port() {
    let s = Served::start(&["--model", &llama(), "--no-metrics-db"], &[]);
    let base = s.base.clone();
    rt().block_on(async {
        let (st, spec) = get(&base, "/openapi.json").await;
        assert_eq!(st, 200);
        let v: Value = serde_json::from_str(&spec).unwrap();
        // No fixed server: clients use the origin they fetched the document from.
        let servers = v.get("servers").and_then(|s| s.as_array()).cloned().unwrap_or_default();
        assert!(servers.iter().all(|s| s["url"].as_str().is_some_and(|u| u.starts_with('/'))), "{servers:?}");
        let (st, page) = get(&base, "/docs").await;
        assert_eq!(st, 200);
        for text in [&spec, &page] {
            for fixed in ["127.0.0.1:8080", "localhost:8080"] {
                assert!(!text.contains(fixed), "{fixed} in the docs");
            }
        }
        assert!(page.contains("swagger") || page.contains("Swagger"));
    });
    let (code, log, _) = s.stop("TERM");
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn tools_a_template_cannot_show_are_reported() {
    let (no, with) = (chat_models().join("notools"), chat_models().join("withtools"));
    let s = Served::start(&["--model", &no.display().to_string(), "--model", &with.display().to_string(), "--no-metrics-db"], &[]);
    let base = s.base.clone();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["unit"]}}}]);
    rt().block_on(async {
        let chat = |model: &str| {
            json!({"model": model, "messages": [{"role": "user", "content": "weather?"}], "tools": tools, "tool_choice": "auto", "max_tokens": 4})
        };
        let (st, h, body) = post(&base, "/v1/chat/completions", &chat("notools")).await;
        assert_eq!(st, 200, "{body}");
        let w = h.get("x-rmlx-warning").expect("warning header").to_str().unwrap();
        assert!(w.contains("tools not shown to the model") && w.contains("notools"), "{w}");
        // A template that renders them: no warning.
        let (st, h, body) = post(&base, "/v1/chat/completions", &chat("withtools")).await;
        assert_eq!(st, 200, "{body}");
        assert!(h.get("x-rmlx-warning").is_none());
        // Streams carry it too.
        let mut streamed = chat("notools");
        streamed["stream"] = json!(true);
        let (st, h, _) = post(&base, "/v1/chat/completions", &streamed).await;
        assert_eq!(st, 200);
        assert!(h.get("x-rmlx-warning").is_some());
        // Anthropic: the same header; a forced call gets an Anthropic-shaped id.
        let msg = json!({"model": "notools", "max_tokens": 48, "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"name": "get_weather", "input_schema": tools[0]["function"]["parameters"]}], "tool_choice": {"type": "any"}});
        let (st, h, body) = post(&base, "/v1/messages", &msg).await;
        assert_eq!(st, 200, "{body}");
        assert!(h.get("x-rmlx-warning").is_some());
        let v: Value = serde_json::from_str(&body).unwrap();
        let uses: Vec<&Value> = v["content"].as_array().unwrap().iter().filter(|b| b["type"] == "tool_use").collect();
        assert!(!uses.is_empty(), "{body}");
        for u in uses {
            let id = u["id"].as_str().unwrap();
            assert!(id.starts_with("toolu_") && id.len() == 30 && id[6..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        }
    });
    let (code, log, _) = s.stop("TERM");
    assert_eq!(code, Some(0), "{log}");
    // Logged as a warning and on the request's line.
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("tools not shown to the model")), "{log}");
    assert!(request_lines(&log).iter().any(|l| l.contains("model=notools") && l.contains("warning=")), "{log}");
    assert!(!request_lines(&log).iter().any(|l| l.contains("model=withtools") && l.contains("warning=")), "{log}");
}
