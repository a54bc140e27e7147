//! Qwen2.5-VL images end to end (issue 15, ABI 3.7 multimodal RoPE) on the
//! tiny random fixture of scripts/dev/qwen2_5_vl_golden.py (mlx-vlm
//! 0.7.10's own classes and processor; tests/fixtures/goldens/qwen2_5_vl-serve):
//! - the host's prompt ids (the chat template's
//!   `<|vision_start|><|image_pad|><|vision_end|>` expanded to the merged
//!   grid's 4 x 6 = 24 placeholders) equal mlx-vlm's;
//! - the prompt's last-position logits (f32) equal mlx-vlm's, with the
//!   features merged at the placeholders and the M-RoPE positions the host
//!   lays out from the media forward's `MEDIA_POSITIONS` (engine/mrope.rs);
//! - through the engine, the greedy tokens and every step's top-5 log-probs
//!   equal mlx-vlm's `stream_generate` (the decode steps sit at offset +
//!   rope delta, -18 here), in one chunk and in chunks of 5; a second request
//!   with another image shares only the blocks before the image, and the
//!   first image again hits the prefix cache and still gives mlx-vlm's
//!   answer (its positions re-derived from the kept layout).
mod common;

use common::golden::{rel_err, REL_TOL};
use common::vision::{assert_as_mlx_vlm, generate_with_media, prompt_and_media, values, Positioned};
use mlx_rs::Array;
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::media::{encode_images_with_positions, PromptImage};
use rmlx::engine::mrope::MropeLayout;
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{ModelCatalog, ModelEntry, Worker, WorkerConfig};
use rmlx::engine::LoadedModel;
use rmlx_plugin_api::author::Output;
use serde_json::Value;
use std::sync::Arc;

const MODEL: &str = "models/qwen2_5_vl-tiny";

fn case(name: &str) -> Value {
    let g: Value =
        serde_json::from_slice(&std::fs::read(common::fixture("goldens/qwen2_5_vl-serve/golden.json")).unwrap()).unwrap();
    g["cases"][name].clone()
}

#[test]
fn qwen2_5_vl_prompt_logits_as_mlx_vlm() {
    let _l = common::mlx_lock();
    let case = case("image_a");
    let (prompt, media) = prompt_and_media(MODEL, &case, [3, 16, 24]);
    let mut m = LoadedModel::load(&common::fixture(MODEL), &common::registry()).unwrap();
    assert_eq!(m.architecture_plugin, "arch-qwen3");
    assert!(m.unused.is_empty(), "unused tensors {:?}", m.unused);
    let imgs: Vec<&PromptImage> = media.images.iter().collect();
    let (feats, rels) = encode_images_with_positions(&mut m, &imgs).unwrap();
    let rels = rels.expect("qwen2_5_vl hands MEDIA_POSITIONS");
    // The merged grid 4 x 6, row-major, t = 0.
    let want: Vec<[i32; 3]> = (0..4).flat_map(|r| (0..6).map(move |c| [0, r, c])).collect();
    assert_eq!(*rels[0], want);
    let span = media.images[0].span.clone();
    let layout = MropeLayout::build(prompt.len(), &[span.clone()], &rels).unwrap();
    // 8 text tokens, the image at 8 (rows 8..12, columns 8..14), the text after it from 14.
    assert_eq!(layout.pos[span.start], [8, 8, 8]);
    assert_eq!(layout.pos[span.end], [14; 3]);
    assert_eq!(layout.delta, 14 + (prompt.len() - span.end) as i64 - prompt.len() as i64);

    let (l, d) = (prompt.len(), feats[0].dim(1) as usize);
    let f = values(&feats[0]); // [T, D]
    let mut merged = vec![0f32; l * d];
    merged[span.start * d..span.end * d].copy_from_slice(&f);
    let mask: Vec<bool> = (0..l).map(|i| span.contains(&i)).collect();
    let inputs = (Array::from_slice(&merged, &[1, l as i32, d as i32]), Array::from_slice(&mask, &[1, l as i32]));
    let pos: Vec<i32> = (0..3).flat_map(|a| layout.pos.iter().map(move |p| p[a])).collect();
    let mut cache = m.kv_cache();
    let mut store = Positioned { cache: &mut cache, pos: Array::from_slice(&pos, &[3, 1, l as i32]) };
    let toks: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let req = ForwardRequest { output: Some(Output::LastLogits), inputs: Some(inputs.clone()), ..ForwardRequest::default() };
    let got = values(&m.run(&Array::from_slice(&toks, &[1, l as i32]), &mut store, req).unwrap().out);
    let want: Vec<f32> = case["logits_last"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let e = rel_err(&got, &want);
    eprintln!("last-position logits: relative error {e:.2e}");
    assert!(e < REL_TOL, "last-position logits relative error {e:e}");

    // Text positions on every axis instead (no layout): different logits.
    let mut cache = m.kv_cache();
    let req = ForwardRequest { output: Some(Output::LastLogits), inputs: Some(inputs), ..ForwardRequest::default() };
    let plain = values(&m.run(&Array::from_slice(&toks, &[1, l as i32]), &mut cache, req).unwrap().out);
    assert!(rel_err(&plain, &want) > 1e-3, "M-RoPE positions made no difference");
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
fn qwen2_5_vl_generates_as_mlx_vlm_through_the_engine() {
    let _l = common::mlx_lock();
    let (a, b) = (case("image_a"), case("image_b"));
    let steps = a["tokens"].as_array().unwrap().len();
    let (prompt_a, media_a) = prompt_and_media(MODEL, &a, [3, 16, 24]);
    let (prompt_b, media_b) = prompt_and_media(MODEL, &b, [3, 16, 24]);
    assert_eq!(prompt_a, prompt_b, "the same prompt, another image");

    let (w, e) = worker(512);
    assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt_a, media_a.clone(), 512, steps), &a, "image a");
    // Another image after the same text: only the blocks before it are shared.
    let before = hit_tokens(&w);
    assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt_b, media_b, 512, steps), &b, "image b");
    let first_image = media_a.images[0].span.start;
    assert_eq!(hit_tokens(&w) - before, (first_image / 4 * 4) as u64, "blocks over another image were shared");
    // The first image again: every full block but the last one's is a hit.
    let before = hit_tokens(&w);
    assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt_a, media_a.clone(), 512, steps), &a, "image a, prefix-cache hit");
    assert_eq!(hit_tokens(&w) - before, ((prompt_a.len() - 1) / 4 * 4) as u64);

    // Chunks of 5: the image split across chunks, text-only chunks after it.
    let (w5, e5) = worker(5);
    assert_as_mlx_vlm(&generate_with_media(&w5, &e5, &prompt_a, media_a, 5, steps), &a, "chunks of 5");
}
