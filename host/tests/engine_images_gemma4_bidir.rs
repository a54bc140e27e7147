//! Gemma 4 with `use_bidirectional_attention: "vision"` (issue 15): each
//! image's soft tokens attend to every soft token of their own image, both
//! ways, on top of the causal (windowed) mask, in every layer. The model is
//! the tiny random Gemma 4 vision fixture with only that key added to its
//! text_config (a temporary copy); the golden is mlx-vlm 0.7.10's with the
//! processor's `mm_token_type_ids` (tests/goldens/gemma4_bidir_golden.py,
//! tests/fixtures/goldens/gemma4-vision-bidir).
//! - the paged forward with the images' runs (`PagedForward::with_runs`)
//!   gives mlx-vlm's float32 logits at every text position after the last
//!   image; without the runs (causal) it does not; keys and values of two
//!   families (the composed path of the quantized families) match too;
//! - the engine (reading the config key) gives mlx-vlm's greedy tokens and
//!   per-step top-5 log-probs with the prompt in one chunk, in chunks of 3
//!   (each image kept in one chunk) and through a prefix-cache hit.
mod common;

use common::vision::{assert_as_mlx_vlm, generate_with_media};

use common::golden::rel_err;
use common::vision::values;
use mlx_rs::{
    ops::{concatenate, indexing::IndexOp, zeros_dtype},
    Array,
};
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::kv_family::{self, KvChoice};
use rmlx::engine::kv_pool::KvPool;
use rmlx::engine::media::{encode_images, PromptImage, PromptMedia};
use rmlx::engine::paged::{PagedForward, Row};
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{ModelCatalog, ModelEntry, Worker, WorkerConfig};
use rmlx::engine::LoadedModel;
use rmlx::media::vision::VisionSpec;
use rmlx::media::{decode_image, MediaHash, MediaOptions};
use rmlx::model::tokenizer::Tokenizer;
use rmlx_plugin_api::author::Output;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

const MODEL: &str = "models/gemma4-vision-tiny";
const GOLD: &str = "goldens/gemma4-vision-bidir";

/// A copy of the tiny Gemma 4 vision model with `text_config.use_bidirectional_attention = "vision"`.
fn bidir_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(common::fixture(MODEL)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["text_config"]["use_bidirectional_attention"] = "vision".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    dir
}

fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(common::fixture(GOLD).join("golden.json")).unwrap()).unwrap()
}

fn f32s(name: &str) -> Vec<f32> {
    let b = std::fs::read(common::fixture(GOLD).join(name)).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The case's prompt ids and images, as the API builds them (checked against mlx-vlm's ids).
fn prompt_and_media(dir: &Path, case: &Value) -> (Vec<u32>, Arc<PromptMedia>) {
    let tok = Tokenizer::from_model_dir(dir).unwrap();
    let spec = VisionSpec::from_model_dir(dir, Some(&tok)).unwrap().expect("the fixture takes images");
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

/// All-position logits [L, V] of the prompt in one paged forward, the
/// images' features at their placeholders; with `bidir`, each image's
/// placeholders one bidirectional run.
fn prompt_logits(m: &mut LoadedModel, ids: &[u32], media: &PromptMedia, bidir: bool) -> Vec<f32> {
    let imgs: Vec<&PromptImage> = media.images.iter().collect();
    let feats = encode_images(m, &imgs).unwrap(); // per image [T, D]
    let (d, dtype) = (feats[0].dim(1), feats[0].dtype());
    let mut pieces = Vec::new();
    let mut at = 0;
    for (img, f) in media.images.iter().zip(&feats) {
        if img.span.start > at {
            pieces.push(zeros_dtype(&[(img.span.start - at) as i32, d], dtype).unwrap());
        }
        pieces.push(f.clone());
        at = img.span.end;
    }
    pieces.push(zeros_dtype(&[(ids.len() - at) as i32, d], dtype).unwrap());
    let l = ids.len() as i32;
    let features = concatenate(&pieces, 0).unwrap().reshape(&[1, l, d]).unwrap(); // [1, L, D]
    let mask: Vec<bool> = (0..ids.len()).map(|p| media.images.iter().any(|i| i.span.contains(&p))).collect();
    let mask = Array::from_slice(&mask, &[1, l]);

    let bs = 4;
    let mut pool = KvPool::for_model(m, m.kv.0.clone(), m.kv.1.clone(), bs, 64).unwrap();
    let table: Vec<u32> = (0..ids.len().div_ceil(bs) as u32).collect();
    let mut paged = PagedForward::new(&mut pool, &[Row { table: &table, offset: 0 }], ids.len()).unwrap();
    if bidir {
        paged = paged.with_runs(vec![media.images.iter().map(|i| i.span.clone()).collect()]).unwrap();
    }
    let tokens: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let req = ForwardRequest { output: Some(Output::AllLogits), inputs: Some((features, mask)), ..ForwardRequest::default() };
    let out = m.run(&Array::from_slice(&tokens, &[1, l]), &mut paged, req).unwrap().out; // [1, L, V]
    values(&out.index(0))
}

#[test]
fn bidirectional_image_runs_give_mlx_vlm_logits_after_the_image() {
    let _l = common::mlx_lock();
    let g = golden();
    let v = g["vocab"].as_u64().unwrap() as usize;
    let dir = bidir_model();
    let reg = common::registry();
    let mut m = LoadedModel::load(dir.path(), &reg).unwrap();
    assert!(m.bidirectional_media());
    assert!(!LoadedModel::load(&common::fixture(MODEL), &reg).unwrap().bidirectional_media());
    for name in ["one_image", "two_images"] {
        let case = &g["cases"][name];
        let (ids, media) = prompt_and_media(dir.path(), case);
        let from = case["logits_from"].as_u64().unwrap() as usize;
        let want = f32s(&format!("{name}.logits.f32"));
        assert_eq!(want.len(), (ids.len() - from) * v);

        let got = prompt_logits(&mut m, &ids, &media, true);
        let e = rel_err(&got[from * v..], &want);
        eprintln!("{name}: bidirectional runs, {} positions after the image, relative error {e:.2e}", ids.len() - from);
        assert!(e < 1e-4, "{name}: relative error {e:e} against mlx-vlm");

        // Causal (the runs left out): not mlx-vlm's answer.
        let causal = prompt_logits(&mut m, &ids, &media, false);
        let e = rel_err(&causal[from * v..], &want);
        assert!(e > 1e-2, "{name}: the causal logits are as close as {e:e}: the golden does not tell the overlay");

        // Keys and values of two families attend through the composed path
        // (`composed_attend`, what the quantized families use too): the same
        // mask, mlx-vlm's logits. fp8 (too coarse to compare on this random
        // model) still moves with the runs.
        let dense = m.kv.clone();
        let mixed = KvChoice { k: Some("f32".into()), v: Some("f16".into()) };
        m.kv = kv_family::resolve(&reg, &m.spec, m.kv.0.dims.dtype, &mixed, None).unwrap();
        let got = prompt_logits(&mut m, &ids, &media, true);
        let em = rel_err(&got[from * v..], &want);
        eprintln!("{name}: f32 keys, f16 values (composed), relative error {em:.2e}");
        assert!(em < 1e-3, "{name}: composed path relative error {em:e}");
        let fp8 = KvChoice { k: Some("fp8".into()), v: Some("fp8".into()) };
        m.kv = kv_family::resolve(&reg, &m.spec, m.kv.0.dims.dtype, &fp8, None).unwrap();
        let (b8, c8) = (prompt_logits(&mut m, &ids, &media, true), prompt_logits(&mut m, &ids, &media, false));
        m.kv = dense;
        let moved = rel_err(&b8[from * v..], &c8[from * v..]);
        eprintln!("{name}: fp8 KV, bidirectional vs causal {moved:.2e}, vs mlx-vlm {:.2e}", rel_err(&b8[from * v..], &want));
        assert!(moved > 1e-2, "{name}: fp8 KV ignores the runs ({moved:e})");
    }
}

fn worker(dir: &Path, chunk: usize) -> (Worker, Arc<ModelEntry>) {
    let catalog = ModelCatalog::discover(&[(None, dir.to_path_buf())], &[]).unwrap();
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
fn bidirectional_gemma4_images_generate_as_mlx_vlm() {
    let _l = common::mlx_lock();
    let g = golden();
    let dir = bidir_model();
    let (w, e) = worker(dir.path(), 512);
    let (w3, e3) = worker(dir.path(), 3);
    for name in ["one_image", "two_images"] {
        let case = &g["cases"][name];
        let steps = case["tokens"].as_array().unwrap().len();
        let (prompt, media) = prompt_and_media(dir.path(), case);
        assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt, media.clone(), 512, steps), case, &format!("{name}, one chunk"));
        // Again: the prefix cache serves every full block but the last one's.
        let before = hit_tokens(&w);
        assert_as_mlx_vlm(&generate_with_media(&w, &e, &prompt, media.clone(), 512, steps), case, &format!("{name}, prefix-cache hit"));
        assert_eq!(hit_tokens(&w) - before, ((prompt.len() - 1) / 4 * 4) as u64);
        // Chunks of 3: each image (3 to 6 soft tokens) still prefills in one chunk.
        assert_as_mlx_vlm(&generate_with_media(&w3, &e3, &prompt, media, 3, steps), case, &format!("{name}, chunks of 3"));
    }
}
