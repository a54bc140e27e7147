//! Qwen3-VL images through the server (issue 15), in process on port 0, on
//! the tiny random Qwen3-VL fixture (tests/fixtures/models/qwen3_vl-tiny:
//! word-level tokenizer, a Qwen-style chat template whose image part renders
//! `<|vision_start|><|image_pad|><|vision_end|>`, patch 2 and merge 2 in
//! preprocessor_config.json; scripts/dev/qwen3_vl_golden.py).
//!
//! The host smart-resizes the 24x16 image (it stays), expands
//! `<|image_pad|>` to the merged grid's 4 x 6 = 24 placeholders, runs the
//! media forward (main features and 2 deepstack levels) and lays out the
//! interleaved M-RoPE positions from its MEDIA_POSITIONS. Against mlx-vlm
//! 0.7.10's `stream_generate` (tests/fixtures/goldens/qwen3_vl-serve),
//! through the OpenAI route (`image_url` parts): the prompt length, the
//! greedy tokens and every step's top-5 log-probs (5 steps: mlx-vlm's
//! sixth token is `<|im_end|>`, where the server stops with `stop`). The
//! Anthropic route (`image` blocks) gives the same text and prompt length,
//! and count_tokens counts the image's placeholders.
//! (engine_images_qwen3_vl.rs checks the same golden through the engine.)
mod common;

use common::api_images::ImageApi;

#[tokio::test(flavor = "multi_thread")]
async fn qwen3_vl_chats_with_images_as_mlx_vlm() {
    ImageApi::start("qwen3-vl", "models/qwen3_vl-tiny", "goldens/qwen3_vl-serve/golden.json").assert_chats_as_mlx_vlm().await;
}
