//! Gemma 4 images through the server (issue 15), in process on port 0, on
//! the tiny random Gemma 4 vision fixture (tests/fixtures/models/
//! gemma4-vision-tiny: word-level tokenizer, a Gemma-4-style chat template
//! whose image part renders `<|image|>`, and a Gemma4ImageProcessor in
//! processor_config.json, all written by scripts/dev/gemma4_serve_golden.py).
//!
//! The host resizes each image to its own size under the soft-token budget
//! (37x23 -> 24x8: 3 soft tokens, 50x61 -> 16x16: 4, 61x5 -> 48x8: 6),
//! expands `<|image|>` to `<|image>` + `<|image|>` * T + `<image|>`, and
//! the engine runs one media forward per image size. Against mlx-vlm
//! 0.7.10's `stream_generate` on the same prompt and images
//! (tests/fixtures/goldens/gemma4-vision-serve), through the OpenAI route:
//! the prompt length, the greedy tokens and every step's top-5 log-probs
//! (the tiny model repeats "model" whatever the image; the runner-ups and
//! the values are what the image moves). The Anthropic route gives the same
//! text and prompt length, and count_tokens counts each image's own
//! placeholders (it loads the images to size them).
mod common;

use base64::Engine as _;
use common::api_images::ImageApi;
use serde_json::json;
use std::sync::OnceLock;

fn api() -> &'static ImageApi {
    static API: OnceLock<ImageApi> = OnceLock::new();
    API.get_or_init(|| ImageApi::start("gemma4", "models/gemma4-vision-tiny", "goldens/gemma4-vision-serve/golden.json"))
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma4_chats_with_images_as_mlx_vlm() {
    api().assert_chats_as_mlx_vlm().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma4_bad_images_are_400() {
    // Not an image: 400 naming the part, on chat and on count_tokens (which
    // loads images to size them).
    let bad = base64::engine::general_purpose::STANDARD.encode(b"hello");
    let body = json!({"model": "gemma4", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{bad}")}}]}]});
    let (s, v) = api().post("/v1/chat/completions", body).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages[0].content[1]", "{v}");
    let body = json!({"model": "gemma4", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": bad}}]}]});
    let (s, v) = api().post("/v1/messages/count_tokens", body).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("messages[0].content[0]"), "{v}");
}
