//! Images through the server's engine (issue 15) on the tiny random Gemma 3
//! vision fixture (tests/fixtures/models/gemma3-vision-tiny): the request's
//! pixels are preprocessed by the host (crate::media), the engine runs the
//! media forward and lends the features to prefill. The first generated
//! token's log-probabilities match mlx-vlm's logits for the same prompt and
//! images (tests/fixtures/goldens/gemma3-vision-tiny), with the prompt in one
//! chunk or in chunks of 3 (images split across chunks), and through a
//! prefix-cache hit; the prefix cache shares blocks over the same image and
//! none from a different image on.
mod common;

use rmlx::engine::media::{PromptImage, PromptMedia};
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig};
use rmlx::media::{decode_image, ImageProcessor, MediaHash, MediaOptions};
use serde_json::Value;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

const MODEL: &str = "models/gemma3-vision-tiny";
const GOLDEN: &str = "goldens/gemma3-vision-tiny";

fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(common::fixture(GOLDEN).join("golden.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The golden's images (`order` picks and orders them), as the API builds them.
fn media(prompt: &[u32], order: &[usize]) -> Arc<PromptMedia> {
    let g = golden();
    let files: Vec<String> = g["images"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let proc = ImageProcessor::from_model_dir(&common::fixture(MODEL)).unwrap();
    let t = g["mm_tokens_per_image"].as_u64().unwrap() as usize;
    let tok = g["image_token_index"].as_u64().unwrap() as u32;
    let starts: Vec<usize> = (0..prompt.len()).filter(|&i| prompt[i] == tok && (i == 0 || prompt[i - 1] != tok)).collect();
    assert_eq!(starts.len(), order.len());
    let images = starts
        .iter()
        .zip(order)
        .map(|(&s, &k)| {
            let bytes = std::fs::read(common::repo().join(&files[k])).unwrap();
            let img = decode_image("test", &bytes, &MediaOptions::default()).unwrap();
            PromptImage::new(proc.preprocess("test", &img).unwrap(), MediaHash::of_rgb(&img), s..s + t)
        })
        .collect();
    Arc::new(PromptMedia { images })
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

/// The first generated token's top-5 (id, logprob), greedy.
fn first_top5(w: &Worker, e: &Arc<ModelEntry>, prompt: &[u32], media: Arc<PromptMedia>, chunk: usize) -> Vec<(u32, f32)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens: 1, ignore_eos: true, prefill_chunk: chunk, logprobs: Some(5), media: Some(media), ..GenParams::default() };
    w.submit(GenRequest {
        model: e.clone(),
        prompt: prompt.to_vec(),
        params,
        hook: None,
        cancel: Arc::new(AtomicBool::new(false)),
        keep_alive: None,
        events: tx,
    })
    .unwrap();
    let mut top = None;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenEvent::Token { logprob, .. } => top = Some(logprob.unwrap().top.iter().map(|(id, _, lp)| (*id, *lp)).collect()),
            GenEvent::Done(_) => break,
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    top.expect("one token")
}

/// log_softmax of the golden logits at prompt position `pos`: top 5.
fn golden_top5(pos: usize) -> Vec<(u32, f32)> {
    let g = golden();
    let v = g["vocab"].as_u64().unwrap() as usize;
    let raw = std::fs::read(common::fixture(GOLDEN).join("logits_image.f32")).unwrap();
    let all: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let row = &all[pos * v..(pos + 1) * v];
    let max = row.iter().cloned().fold(f32::MIN, f32::max);
    let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    let mut lp: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, x)| (i as u32, x - lse)).collect();
    lp.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    lp.truncate(5);
    lp
}

fn assert_close(got: &[(u32, f32)], want: &[(u32, f32)], what: &str) {
    for ((gi, gl), (wi, wl)) in got.iter().zip(want) {
        assert_eq!(gi, wi, "{what}: top ids {got:?} vs {want:?}");
        assert!((gl - wl).abs() < 2e-3, "{what}: logprob of {gi}: {gl} vs {wl}");
    }
}

fn hit_tokens(w: &Worker) -> u64 {
    w.stats().blocks.iter().map(|(_, b)| b.prefix_hit_tokens).sum()
}

#[test]
fn images_reach_the_model_and_key_the_prefix_cache() {
    let _l = common::mlx_lock();
    let g = golden();
    let prompt = ids(&g["prompt_image"]);
    let want = golden_top5(prompt.len() - 1);

    // Whole prompt in one chunk.
    let (w, e) = worker(512);
    let got = first_top5(&w, &e, &prompt, media(&prompt, &[0, 1]), 512);
    assert_close(&got, &want, "one chunk");

    // The same prompt and images again: a prefix-cache hit over both images
    // (every full block but the one with the last token), same answer.
    let before = hit_tokens(&w);
    let again = first_top5(&w, &e, &prompt, media(&prompt, &[0, 1]), 512);
    assert_close(&again, &want, "prefix-cache hit");
    assert_eq!(hit_tokens(&w) - before, ((prompt.len() - 1) / 4 * 4) as u64, "the same images share every block");

    // The same text with the images swapped: only the block before the
    // first image is shared (tokens 0..4 = bos, 40, 41, boi).
    let before = hit_tokens(&w);
    let swapped = first_top5(&w, &e, &prompt, media(&prompt, &[1, 0]), 512);
    assert_eq!(hit_tokens(&w) - before, 4, "blocks over or after another image were shared");
    assert!(swapped.iter().zip(&want).any(|(a, b)| a.0 != b.0 || (a.1 - b.1).abs() > 1e-3), "the images changed nothing");

    // Chunks of 3: each image's features split across chunks.
    let (w3, e3) = worker(3);
    let got3 = first_top5(&w3, &e3, &prompt, media(&prompt, &[0, 1]), 3);
    assert_close(&got3, &want, "chunks of 3");
}
