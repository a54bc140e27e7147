//! Image parts through the HTTP API (issue 15), in process on port 0.
//!
//! Models: `llama-f32` (text only) and the tiny random Gemma 3 vision
//! fixture (tests/fixtures/models/gemma3-vision-tiny) copied into a temp dir
//! with a word-level tokenizer and a Gemma-3-style chat template written
//! here (the fixture has none): its image part renders `<start_of_image>`,
//! which the host expands to "\n\n<start_of_image>" + 4 x
//! `<image_soft_token>` + "<end_of_image>\n\n" as Gemma3Processor does.
//! Errors: an image to a text-only model, a bad data URL, a file outside the
//! allowed directories, each a 400 in its API's shape naming the part.
//! End to end: the same picture as a data URL (OpenAI) and a base64 block
//! (Anthropic) and as a file:// URL gives the same answer; another picture
//! changes it; count_tokens counts the placeholders.
mod common;

use base64::Engine as _;
use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::worker::{ModelCatalog, Worker, WorkerConfig};
use rmlx::media::MediaOptions;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

const TEXT: &str = "llama-f32";
const VISION: &str = "vision";

/// A Gemma-3-style template: content parts, `<start_of_image>` per image.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }} \
{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'image' %}<start_of_image>{% elif p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<end_of_turn> \
{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}";

/// tokenizer.json: word level over 300 ids; the image tokens at the
/// config's ids (boi 256, eoi 257, image 262) as special added tokens.
fn tokenizer_json() -> Value {
    let special = [(0, "<pad>"), (1, "<bos>"), (2, "<eos>"), (3, "<unk>"), (256, "<start_of_image>"), (257, "<end_of_image>"), (258, "<start_of_turn>"), (259, "<end_of_turn>"), (262, "<image_soft_token>")];
    let words = ["user", "model", "what", "is", "in", "this", "picture", "describe", "it", "please", "and", "the", "colour"];
    let mut vocab = serde_json::Map::new();
    for (id, s) in special {
        vocab.insert(s.into(), json!(id));
    }
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), json!(4 + i));
    }
    for id in 4 + words.len()..300 {
        if !special.iter().any(|(s, _)| *s == id) {
            vocab.insert(format!("w{id}"), json!(id));
        }
    }
    let added: Vec<Value> = special
        .iter()
        .map(|(id, s)| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The vision fixture with a tokenizer and chat template, in a temp dir.
fn vision_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join(VISION);
        std::fs::create_dir(&m).unwrap();
        for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
            std::fs::copy(common::fixture("models/gemma3-vision-tiny").join(f), m.join(f)).unwrap();
        }
        std::fs::write(m.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
        let tc = json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": TEMPLATE});
        std::fs::write(m.join("tokenizer_config.json"), tc.to_string()).unwrap();
        // A directory file:// image URLs may read.
        std::fs::create_dir(d.path().join("images")).unwrap();
        std::fs::write(d.path().join("images/red.png"), png([200, 30, 30])).unwrap();
        d
    })
    .path()
}

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = vision_dir();
        let catalog = ModelCatalog::discover(&[(None, common::fixture("models/llama-f32")), (None, dir.join(VISION))], &[]).unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 16, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        let media = MediaOptions { allowed_dirs: vec![dir.join("images")], ..MediaOptions::default() };
        let opts = ServerOptions { media, ..ServerOptions::default() };
        common::serve(std::sync::Arc::new(AppState { catalog: std::sync::Arc::new(catalog), worker, opts }))
    })
}

/// A 20x12 PNG of one colour with a diagonal line.
fn png(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(20, 12, |x, y| if x == y { image::Rgb([255, 255, 255]) } else { image::Rgb(rgb) });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", b64(bytes))
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// An OpenAI chat with one user message: text, then an image.
fn chat(model: &str, url: &str) -> Value {
    json!({"model": model, "max_tokens": 6, "logprobs": true, "top_logprobs": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image_url", "image_url": {"url": url}}
    ]}]})
}

/// An Anthropic message with one user turn: text, then an image block.
fn message(model: &str, source: Value) -> Value {
    json!({"model": model, "max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image", "source": source}
    ]}]})
}

fn openai_error(v: &Value) -> (&str, &str) {
    (v["error"]["param"].as_str().unwrap_or(""), v["error"]["message"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread")]
async fn image_to_a_text_model_is_400() {
    let (s, v) = post("/v1/chat/completions", chat(TEXT, &data_url(&png([1, 2, 3])))).await;
    assert_eq!(s, 400, "{v}");
    let (_, msg) = openai_error(&v);
    assert!(msg.contains("takes no images"), "{v}");
    let (s, v) = post("/v1/messages", message(TEXT, json!({"type": "base64", "media_type": "image/png", "data": b64(&png([1, 2, 3]))}))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("takes no images"), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_images_are_400_naming_the_part() {
    // A data URL whose payload is not base64.
    let (s, v) = post("/v1/chat/completions", chat(VISION, "data:image/png;base64,@@@not base64@@@")).await;
    assert_eq!(s, 400, "{v}");
    let (param, msg) = openai_error(&v);
    assert_eq!(param, "messages[0].content[1]", "{v}");
    assert!(msg.contains("messages[0].content[1]") && msg.contains("base64"), "{v}");
    // Valid base64 that is no image.
    let (s, v) = post("/v1/chat/completions", chat(VISION, &format!("data:image/png;base64,{}", b64(b"hello")))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(openai_error(&v).0, "messages[0].content[1]", "{v}");
    // Anthropic: a base64 block that is no image, in its own error shape.
    let (s, v) = post("/v1/messages", message(VISION, json!({"type": "base64", "media_type": "image/png", "data": b64(b"hello")}))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("messages[0].content[1]"), "{v}");
    // An http URL to a loopback address: refused by the SSRF guard
    // (allow_private_urls is off), never fetched.
    let (s, v) = post("/v1/chat/completions", chat(VISION, "http://127.0.0.1:9/pic.png")).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(openai_error(&v).0, "messages[0].content[1]", "{v}");
    assert!(openai_error(&v).1.contains("refused"), "{v}");
    // More images than the context holds placeholders for (512 / 4), refused
    // before any is decoded (these are not even images).
    let parts: Vec<Value> = (0..128).map(|_| json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})).collect();
    let (s, v) = post("/v1/chat/completions", json!({"model": VISION, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]})).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    // An image in an assistant turn.
    let body = json!({"model": VISION, "max_tokens": 2, "messages": [
        {"role": "user", "content": "what"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(&png([1, 2, 3]))}}]}]});
    let (s, v) = post("/v1/chat/completions", body).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(openai_error(&v).0, "messages[1].content[0]", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_outside_the_allowed_dirs_are_400() {
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), png([9, 9, 9])).unwrap();
    for url in [format!("file://{}", outside.path().display()), "file:///etc/passwd".to_string()] {
        let (s, v) = post("/v1/chat/completions", chat(VISION, &url)).await;
        assert_eq!(s, 400, "{url}: {v}");
        assert_eq!(openai_error(&v).0, "messages[0].content[1]", "{v}");
    }
    // `..` out of an allowed directory is outside too.
    let sneaky = format!("file://{}/images/../vision/config.json", vision_dir().display());
    let (s, v) = post("/v1/chat/completions", chat(VISION, &sneaky)).await;
    assert_eq!(s, 400, "{v}");
}

/// The answer's text and its first token's top-5 log-probabilities.
fn text_and_first_logprob(v: &Value) -> (String, Vec<f64>) {
    let c = &v["choices"][0];
    let top = c["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
    (c["message"]["content"].as_str().unwrap().to_string(), top)
}

fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chat_with_an_image_end_to_end() {
    let red = png([200, 30, 30]);
    let (s, v) = post("/v1/chat/completions", chat(VISION, &data_url(&red))).await;
    assert_eq!(s, 200, "{v}");
    let (text, lp) = text_and_first_logprob(&v);
    // bos, <start_of_turn>, user, 5 words, boi + 4 image tokens + eoi,
    // <end_of_turn>, <start_of_turn>, model: 17 prompt tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 17, "{v}");

    // The same pixels from a file under an allowed directory: the same answer.
    let file = format!("file://{}/images/red.png", vision_dir().display());
    let (s, v2) = post("/v1/chat/completions", chat(VISION, &file)).await;
    assert_eq!(s, 200, "{v2}");
    assert_eq!(text_and_first_logprob(&v2).0, text);
    assert!(same(&text_and_first_logprob(&v2).1, &lp), "{v2}");

    // Anthropic, base64 block: the same prompt, the same answer.
    let (s, m) = post("/v1/messages", message(VISION, json!({"type": "base64", "media_type": "image/png", "data": b64(&red)}))).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["content"][0]["text"].as_str().unwrap(), text, "{m}");
    assert_eq!(m["usage"]["input_tokens"], 17, "{m}");
    let (s, c) = post("/v1/messages/count_tokens", message(VISION, json!({"type": "base64", "media_type": "image/png", "data": b64(&red)}))).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["input_tokens"], 17, "{c}");

    // Another picture, the same text: the image reaches the model.
    let (s, v3) = post("/v1/chat/completions", chat(VISION, &data_url(&png([10, 40, 220])))).await;
    assert_eq!(s, 200, "{v3}");
    let (text3, lp3) = text_and_first_logprob(&v3);
    assert!(text3 != text || !same(&lp3, &lp), "another image changed nothing: {v3}");

    // The same chat without the image is another prompt (no placeholders).
    let body = json!({"model": VISION, "max_tokens": 2, "messages": [{"role": "user", "content": "what is in this picture"}]});
    let (s, v4) = post("/v1/chat/completions", body).await;
    assert_eq!(s, 200, "{v4}");
    assert_eq!(v4["usage"]["prompt_tokens"], 11, "{v4}");
}
