//! `rmlx serve` (the binary, port 0) with `--models-dir`: GET /v1/models lists
//! the servable models, those in a Hugging Face cache folder, and the ones it
//! cannot serve (unknown `model_type`, broken config.json) as unavailable with
//! the reason, and they never stop it from starting. A symlinked model folder
//! is named by the link. A request may leave `model` out when exactly one
//! model is served.
mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `rmlx serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(common::rmlx_bin())
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--no-metrics-db", "--plugins"])
        .arg(common::plugins_dir())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let base = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("rmlx serve ended before serving:\n{}", seen.join("\n"));
        };
        if let Some(rest) = line.split("on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
        seen.push(line);
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, base }
}

fn get(url: &str) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    })
}

fn post(url: &str, body: Value) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    })
}

/// Links the fixture's files into `dir`, with config.json edited by `edit`.
fn fixture_copy(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let src = common::fixture("models/llama-f32");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["model.safetensors", "model.safetensors.index.json"] {
        symlink(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
}

/// A tiny word-level tokenizer over the fixture's 256 ids, and a chat
/// template, so the random fixture model can answer a chat request.
fn add_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, Value> = (0..256).map(|i| (format!("w{i}"), json!(i))).collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), json!({"eos_token": "w255"}).to_string()).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }} {% endfor %}").unwrap();
}

fn by_id<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["data"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("no {id} in {list}"))
}

#[test]
fn models_dir_lists_good_cached_and_unavailable_models_and_still_serves() {
    let root = tempfile::tempdir().unwrap();
    let models = root.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    // A good model, reached through a symlink: named by the link.
    symlink(common::fixture("models/llama-f32"), models.join("good-llama")).unwrap();
    // An architecture no plugin provides.
    fixture_copy(&models.join("alien"), |c| c["model_type"] = json!("no-such-arch"));
    // A config.json that is not JSON.
    std::fs::create_dir_all(models.join("broken")).unwrap();
    std::fs::write(models.join("broken/config.json"), "{ not json").unwrap();
    // A Hugging Face cache folder: named by its repo id.
    let snap = models.join("models--some-org--cached-llama/snapshots/c0ffee");
    fixture_copy(&snap, |_| {});
    std::fs::create_dir_all(models.join("models--some-org--cached-llama/refs")).unwrap();
    std::fs::write(models.join("models--some-org--cached-llama/refs/main"), "c0ffee").unwrap();

    let server = serve(&["--models-dir", models.to_str().unwrap()]);
    let (status, list) = get(&format!("{}/v1/models", server.base));
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 4, "{list}");
    for id in ["good-llama", "some-org/cached-llama"] {
        let m = by_id(&list, id);
        assert_eq!(m["available"], true, "{m}");
        assert_eq!(m["unavailable_reason"], Value::Null, "{m}");
        assert_eq!(m["loaded"], false, "{m}");
    }
    assert!(!list.to_string().contains("\"llama-f32\""), "the symlink's target name leaked: {list}");
    let alien = by_id(&list, "alien");
    assert_eq!(alien["available"], false);
    assert!(alien["unavailable_reason"].as_str().unwrap().contains("no-such-arch"), "{alien}");
    let broken = by_id(&list, "broken");
    assert_eq!(broken["available"], false);
    assert!(broken["unavailable_reason"].as_str().unwrap().contains("malformed JSON"), "{broken}");

    // One model, by id.
    let (status, m) = get(&format!("{}/v1/models/alien", server.base));
    assert_eq!((status, &m["available"]), (200, &json!(false)), "{m}");
    // A request for an unavailable model is a 400 naming the field and why.
    let (status, e) = post(
        &format!("{}/v1/chat/completions", server.base),
        json!({"model": "alien", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "model", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("no-such-arch"), "{e}");
    // Two servable models: `model` may not be left out.
    let (status, e) = post(&format!("{}/v1/chat/completions", server.base), json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}));
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "model", "{e}");
}

#[test]
fn a_server_with_only_unservable_models_still_starts() {
    let root = tempfile::tempdir().unwrap();
    fixture_copy(&root.path().join("alien"), |c| c["model_type"] = json!("no-such-arch"));
    let server = serve(&["--model", root.path().join("alien").to_str().unwrap()]);
    let (status, list) = get(&format!("{}/v1/models", server.base));
    assert_eq!(status, 200);
    assert_eq!(by_id(&list, "alien")["available"], false, "{list}");
}

#[test]
fn model_may_be_left_out_when_one_model_is_served() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("only-one");
    fixture_copy(&dir, |_| {});
    add_tokenizer(&dir);
    let server = serve(&["--model", dir.to_str().unwrap()]);
    let (status, r) = post(
        &format!("{}/v1/chat/completions", server.base),
        json!({"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], "only-one", "{r}");
    assert_eq!(r["usage"]["completion_tokens"].as_u64().unwrap() > 0, true, "{r}");
    let (status, r) = post(&format!("{}/v1/completions", server.base), json!({"prompt": "w1 w2", "max_tokens": 2, "temperature": 0}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], "only-one", "{r}");
    let (status, r) = post(
        &format!("{}/v1/messages", server.base),
        json!({"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], "only-one", "{r}");
    // The metrics name the model the request was served by.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let text = rt.block_on(async { reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap() });
    let chat_line = text
        .lines()
        .find(|l| l.starts_with("rmlx_requests_total") && l.contains("/v1/chat/completions") && l.contains("status=\"200\""))
        .unwrap_or_else(|| panic!("no chat line in\n{text}"));
    assert!(chat_line.contains("model=\"only-one\""), "{chat_line}");
    // A wrong id is still a 404.
    let (status, _) = post(&format!("{}/v1/completions", server.base), json!({"model": "nope", "prompt": "w1", "max_tokens": 1}));
    assert_eq!(status, 404);
}
