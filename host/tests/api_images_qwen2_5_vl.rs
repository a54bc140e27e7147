//! Qwen2.5-VL images through the server (issue 15), in process on port 0, on
//! the tiny random Qwen2.5-VL fixture (tests/fixtures/models/qwen2_5_vl-tiny:
//! word-level tokenizer, a Qwen-style chat template whose image part renders
//! `<|vision_start|><|image_pad|><|vision_end|>`, a Qwen2VLImageProcessor in
//! preprocessor_config.json; scripts/dev/qwen2_5_vl_golden.py).
//!
//! The host smart-resizes each image (24x16 stays: a multiple of patch 2 x
//! merge 2 in range), expands `<|image_pad|>` to the merged grid's 4 x 6 = 24
//! placeholders, runs the media forward and lays out the M-RoPE positions
//! from its MEDIA_POSITIONS (ABI 3.7). Against mlx-vlm 0.7.10's
//! `stream_generate` (tests/fixtures/goldens/qwen2_5_vl-serve), through the
//! OpenAI route: the prompt length, the greedy tokens and every step's top-5
//! log-probs (the decode steps at offset + rope delta). The Anthropic route
//! (`image` blocks) gives the same text and prompt length, and count_tokens
//! counts the image's placeholders.
mod common;

use common::api_images::ImageApi;

#[tokio::test(flavor = "multi_thread")]
async fn qwen2_5_vl_chats_with_images_as_mlx_vlm() {
    ImageApi::start("qwen-vl", "models/qwen2_5_vl-tiny", "goldens/qwen2_5_vl-serve/golden.json").assert_chats_as_mlx_vlm().await;
}
