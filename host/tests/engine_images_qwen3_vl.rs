//! Qwen3-VL images end to end (issue 15: interleaved multimodal RoPE and
//! deepstack) on the tiny random fixture of scripts/dev/qwen3_vl_golden.py
//! (mlx-vlm 0.7.10's own classes and processor;
//! tests/fixtures/goldens/qwen3_vl-serve):
//! - the host's preprocessing (from preprocessor_config.json's keys: patch 2,
//!   merge 2, `size.{shortest,longest}_edge`, mean/std 0.5) gives mlx-vlm's
//!   pixels, and its prompt ids (24 placeholders) equal mlx-vlm's;
//! - the media forward hands the stacked features [T, 3 x 32] (main +
//!   2 deepstack) and MEDIA_POSITIONS, from which the host lays out exactly
//!   mlx-vlm's M-RoPE positions and rope delta;
//! - every prompt position's logits (f32) equal mlx-vlm's;
//! - through the engine, the greedy tokens and each step's top-5 log-probs
//!   equal mlx-vlm's `stream_generate`, in one chunk, with the image split
//!   over two prefill chunks (chunk 20: placeholders 8..32) and in chunks of 5.
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

const MODEL: &str = "models/qwen3_vl-tiny";
const GOLD: &str = "goldens/qwen3_vl-serve";

fn case(name: &str) -> Value {
    let g: Value = serde_json::from_slice(&std::fs::read(common::fixture(GOLD).join("golden.json")).unwrap()).unwrap();
    g["cases"][name].clone()
}

fn f32s(name: &str) -> Vec<f32> {
    let b = std::fs::read(common::fixture(GOLD).join(name)).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn qwen3_vl_prompt_logits_as_mlx_vlm() {
    let _l = common::mlx_lock();
    let case = case("image_a");
    let (prompt, media) = prompt_and_media(MODEL, &case, [3, 16, 24]);
    let px = &media.images[0].pixels.data;
    let e = px.iter().zip(f32s("image_a.pixels.f32")).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(e < 1e-5, "the host's pixels differ from mlx-vlm's processor's by {e}");
    let mut m = LoadedModel::load(&common::fixture(MODEL), &common::registry()).unwrap();
    assert_eq!(m.architecture_plugin, "arch-qwen3");
    assert!(m.unused.is_empty(), "unused tensors {:?}", m.unused);
    let imgs: Vec<&PromptImage> = media.images.iter().collect();
    let (feats, rels) = encode_images_with_positions(&mut m, &imgs).unwrap();
    assert_eq!(feats[0].shape(), [24, 3 * 32], "main + 2 deepstack features side by side");
    let rels = rels.expect("qwen3_vl hands MEDIA_POSITIONS");
    let span = media.images[0].span.clone();
    let layout = MropeLayout::build(prompt.len(), &[span.clone()], &rels).unwrap();
    let want_pos: Vec<Vec<i32>> = case["positions"].as_array().unwrap().iter().map(|a| a.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()).collect();
    for (i, p) in layout.pos.iter().enumerate() {
        assert_eq!(*p, [want_pos[0][i], want_pos[1][i], want_pos[2][i]], "position {i}");
    }
    assert_eq!(layout.delta, case["rope_delta"].as_i64().unwrap());

    let (l, d) = (prompt.len(), feats[0].dim(1) as usize);
    let mut merged = vec![0f32; l * d];
    merged[span.start * d..span.end * d].copy_from_slice(&values(&feats[0]));
    let mask: Vec<bool> = (0..l).map(|i| span.contains(&i)).collect();
    let inputs = (Array::from_slice(&merged, &[1, l as i32, d as i32]), Array::from_slice(&mask, &[1, l as i32]));
    let pos: Vec<i32> = (0..3).flat_map(|a| layout.pos.iter().map(move |p| p[a])).collect();
    let mut cache = m.kv_cache();
    let mut store = Positioned { cache: &mut cache, pos: Array::from_slice(&pos, &[3, 1, l as i32]) };
    let toks: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let req = ForwardRequest { output: Some(Output::AllLogits), inputs: Some(inputs.clone()), ..ForwardRequest::default() };
    let got = values(&m.run(&Array::from_slice(&toks, &[1, l as i32]), &mut store, req).unwrap().out);
    let want = f32s("image_a.logits.f32");
    let e = rel_err(&got, &want);
    eprintln!("every position's logits: relative error {e:.2e}");
    assert!(e < REL_TOL, "logits relative error {e:e}");

    // Without the deepstack columns the logits leave mlx-vlm's.
    let flat: Vec<f32> = merged.chunks(d).flat_map(|r| r[..32].iter().copied().chain(std::iter::repeat(0.0).take(64))).collect();
    let mut cache = m.kv_cache();
    let mut store = Positioned { cache: &mut cache, pos: Array::from_slice(&pos, &[3, 1, l as i32]) };
    let req = ForwardRequest { output: Some(Output::AllLogits), inputs: Some((Array::from_slice(&flat, &[1, l as i32, d as i32]), inputs.1)), ..ForwardRequest::default() };
    let plain = values(&m.run(&Array::from_slice(&toks, &[1, l as i32]), &mut store, req).unwrap().out);
    assert!(rel_err(&plain, &want) > 1e-3, "deepstack made no difference");
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

#[test]
fn qwen3_vl_generates_as_mlx_vlm_through_the_engine() {
    let _l = common::mlx_lock();
    let a = case("image_a");
    let steps = a["tokens"].as_array().unwrap().len();
    let (prompt, media) = prompt_and_media(MODEL, &a, [3, 16, 24]);
    assert_eq!(media.images[0].span, 8..32);
    let (w, e) = worker(512);
    assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt, media.clone(), 512, steps), &a, "one chunk");
    // Chunk 20 ends inside the image: its first 12 rows (and their deepstack
    // features) in one forward, the other 12 in the next.
    let (w20, e20) = worker(20);
    assert_as_mlx_vlm(&generate_with_media(&w20, &e20, &prompt, media.clone(), 20, steps), &a, "image over two chunks");
    let (w5, e5) = worker(5);
    assert_as_mlx_vlm(&generate_with_media(&w5, &e5, &prompt, media, 5, steps), &a, "chunks of 5");
}
