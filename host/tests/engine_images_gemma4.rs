//! Gemma 4 images through the engine (issue 15) on the tiny random Gemma 4
//! vision fixture: the host preprocesses each image to its own size and
//! counts its placeholders (rmlx::media::vision), the engine runs one media
//! forward per size and lends the features to prefill. For the golden's
//! two-image chat (37x23 -> 3 soft tokens, 61x5 -> 6; mlx-vlm's ids and
//! `stream_generate`, tests/fixtures/goldens/gemma4-vision-serve) the
//! greedy tokens and every step's top-5 log-probs equal mlx-vlm's with the
//! prompt in one chunk, in chunks of 3 (each image split across chunks), and
//! again through a prefix-cache hit over both images.
mod common;

use common::vision::{assert_as_mlx_vlm, generate_with_media};

use rmlx::engine::media::{PromptImage, PromptMedia};
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{ModelCatalog, ModelEntry, Worker, WorkerConfig};
use rmlx::media::vision::VisionSpec;
use rmlx::media::{decode_image, MediaHash, MediaOptions};
use rmlx::model::tokenizer::Tokenizer;
use serde_json::Value;
use std::sync::Arc;

const MODEL: &str = "models/gemma4-vision-tiny";

fn case() -> Value {
    let g: Value =
        serde_json::from_slice(&std::fs::read(common::fixture("goldens/gemma4-vision-serve/golden.json")).unwrap()).unwrap();
    g["cases"]["two_images"].clone()
}

/// The case's prompt ids and images, as the API builds them.
fn prompt_and_media(case: &Value) -> (Vec<u32>, Arc<PromptMedia>) {
    let dir = common::fixture(MODEL);
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let spec = VisionSpec::from_model_dir(&dir, Some(&tok)).unwrap().expect("the fixture takes images");
    let mut images = Vec::new();
    let mut counts = Vec::new();
    for part in case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).filter(|p| p.ends_with(".png")) {
        let bytes = std::fs::read(common::fixture("images").join(part)).unwrap();
        let img = decode_image(part, &bytes, &MediaOptions::default()).unwrap();
        let pixels = spec.processor.preprocess(part, &img).unwrap();
        counts.push(spec.tokens_for(&pixels).unwrap());
        images.push((pixels, MediaHash::of_rgb(&img)));
    }
    let expanded = spec.expand(case["prompt"].as_str().unwrap(), &counts).unwrap();
    let ids = tok.encode(&expanded, false).unwrap();
    let want: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want, "the host's prompt ids differ from mlx-vlm's");
    let spans = spec.placeholder_spans(&ids, &counts).unwrap();
    let images = images.into_iter().zip(spans).map(|((p, h), s)| PromptImage::new(p, h, s)).collect();
    (ids, Arc::new(PromptMedia { images }))
}

fn worker(chunk: usize) -> (Worker, Arc<ModelEntry>) {
    let catalog = ModelCatalog::discover(&[(None, common::fixture(MODEL))], &[]).unwrap();
    let entry = catalog.entries[0].clone();
    let sched = SchedulerConfig { block_size: 4, ..SchedulerConfig::default() };
    let w = Worker::start_with(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 8, max_loaded_models: 1, idle_timeout: None, prefill_chunk: chunk },
        sched,
        &catalog,
    )
    .unwrap();
    common::stop_at_exit(w.clone());
    (w, entry)
}

fn hit_tokens(w: &Worker) -> u64 {
    w.stats().blocks.iter().map(|(_, b)| b.prefix_hit_tokens).sum()
}

#[test]
fn gemma4_images_of_two_sizes_generate_as_mlx_vlm() {
    let _l = common::mlx_lock();
    let case = case();
    let steps = case["tokens"].as_array().unwrap().len();
    let (prompt, media) = prompt_and_media(&case);
    assert_eq!(media.images.iter().map(|i| i.pixels.shape.clone()).collect::<Vec<_>>(), [vec![3, 8, 24], vec![3, 8, 48]]);

    let (w, e) = worker(512);
    assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt, media.clone(), 512, steps), &case, "one chunk");
    // The same prompt and images again: every full block but the last one's
    // comes from the prefix cache, the same answer.
    let before = hit_tokens(&w);
    assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt, media.clone(), 512, steps), &case, "prefix-cache hit");
    assert_eq!(hit_tokens(&w) - before, ((prompt.len() - 1) / 4 * 4) as u64);

    // Chunks of 3: each image's features split across chunks.
    let (w3, e3) = worker(3);
    assert_as_mlx_vlm(&generate_with_media(&w3, &e3, &prompt, media, 3, steps), &case, "chunks of 3");
}
