//! model_type `gemma4` (plugins/arch-gemma/src/{gemma4,gemma4_vision}.rs):
//! the tiny random Gemma 4 with images that
//! scripts/dev/gemma4_vision_golden.py built with mlx-vlm's own classes
//! (tests/fixtures/models/gemma4-vision-tiny: clipped linears, standardize,
//! GQA in the tower; per-layer inputs, K/V-shared layers and a proportional
//! RoPE in the language model), against what mlx-vlm computed in float32
//! (tests/fixtures/goldens/gemma4-vision-tiny):
//! - the media forward (`Output::Media`) on the golden's pixels [2, 3, 16, 24]
//!   gives mlx-vlm's `embed_vision(vision_tower(pixels))` [2, 6, 64];
//! - a prompt with both images (features merged at the placeholder
//!   positions through `input_embeddings`) prefilled past the sliding window,
//!   then three cached steps, gives mlx-vlm's logits; zero features instead
//!   do not (so the merge is what moves them);
//! - a text-only prompt (no input embeddings) gives mlx-vlm's text logits;
//! - wrong pixel shapes and a missing pixel array are clear errors; other
//!   image sizes (multiples of 8 pixels) give their own number of tokens.
mod common;

use common::golden::{rel_err, MARGIN, REL_TOL};
use mlx_rs::{Array, Dtype};
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::encoder::EncoderStore;
use rmlx::engine::{sampler, LoadedModel};
use rmlx_plugin_api::author::Output;
use serde_json::Value;
use std::path::PathBuf;

const MODEL: &str = "models/gemma4-vision-tiny";
const GOLD: &str = "goldens/gemma4-vision-tiny";

fn gold_dir() -> PathBuf {
    common::fixture(GOLD)
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(gold_dir().join("golden.json")).unwrap()).unwrap()
}

/// A little-endian f32 file of the golden.
fn f32s(name: &str) -> Vec<f32> {
    let b = std::fs::read(gold_dir().join(name)).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn shape(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn load() -> LoadedModel {
    let m = LoadedModel::load(&common::fixture(MODEL), &common::registry()).unwrap();
    assert_eq!(m.architecture_plugin, "arch-gemma");
    assert!(m.unused.is_empty(), "unused tensors {:?}", m.unused);
    m
}

/// The media forward: pixels [N, C, H, W] -> [N, T, D].
fn media(m: &mut LoadedModel, pixels: Array) -> anyhow::Result<Array> {
    let n = pixels.dim(0).max(1);
    let tokens = Array::from_slice(&vec![0i32; n as usize], &[n, 1]);
    let mask = Array::from_slice(&vec![true; n as usize], &[n, 1]);
    let mut store = EncoderStore::new(&vec![1; n as usize], 1);
    let req = ForwardRequest { output: Some(Output::Media), inputs: Some((pixels, mask)), ..ForwardRequest::default() };
    Ok(m.run(&tokens, &mut store, req)?.out)
}

/// Features [1, L, D] and mask [1, L] putting `feats` (T*N rows of D, in
/// order) at the `image` token positions of `prompt`.
fn merge_inputs(prompt: &[u32], image: u32, feats: &[f32], d: usize) -> (Array, Array) {
    let mut f = vec![0f32; prompt.len() * d];
    let mut rows = feats.chunks(d);
    let mask: Vec<bool> = prompt.iter().map(|&t| t == image).collect();
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        f[i * d..(i + 1) * d].copy_from_slice(rows.next().expect("more placeholders than features"));
    }
    assert!(rows.next().is_none(), "more features than placeholders");
    let l = prompt.len() as i32;
    (Array::from_slice(&f, &[1, l, d as i32]), Array::from_slice(&mask, &[1, l]))
}

/// Logits of each prompt position (one prefill over the model's cache with
/// `inputs`), then of each of `steps` fed one at a time: [L + S][V].
fn run_prompt(m: &mut LoadedModel, prompt: &[u32], inputs: Option<(Array, Array)>, steps: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.kv_cache();
    let toks: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let req = ForwardRequest { output: Some(Output::AllLogits), inputs, ..ForwardRequest::default() };
    let out = m.run(&Array::from_slice(&toks, &[1, toks.len() as i32]), &mut cache, req).unwrap().out;
    cache.advance(toks.len() as i32);
    let v = out.dim(2) as usize;
    let mut rows: Vec<Vec<f32>> = values(&out).chunks(v).map(<[f32]>::to_vec).collect();
    for &t in steps {
        let out = m.logits(&Array::from_slice(&[t as i32], &[1, 1]), &mut cache, true).unwrap();
        cache.advance(1);
        rows.push(values(&out));
    }
    rows
}

/// Failures of `got` against mlx-vlm's rows `want` (flat, V wide): each row
/// within REL_TOL, the greedy token equal where mlx-vlm's top-1/top-2 margin
/// exceeds MARGIN. Returns (failures, worst relative error).
fn check_rows(label: &str, got: &[Vec<f32>], want: &[f32], v: usize) -> (Vec<String>, f32) {
    assert_eq!(got.len() * v, want.len(), "{label}: rows");
    let mut fails = Vec::new();
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want.chunks(v)).enumerate() {
        let e = rel_err(g, w);
        worst = worst.max(e);
        if e > REL_TOL {
            fails.push(format!("{label} position {i}: relative error {e:e}"));
        }
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > MARGIN && sampler::argmax(g) != sampler::argmax(w) {
            fails.push(format!("{label} position {i}: greedy {} != mlx-vlm {}", sampler::argmax(g), sampler::argmax(w)));
        }
    }
    (fails, worst)
}

#[test]
fn gemma4_vision_matches_mlx_vlm() {
    let _g = common::mlx_lock();
    let meta = meta();
    let mut m = load();

    // The media encoder on the golden's pixels.
    let pixels = Array::from_slice(&f32s("pixels.f32"), &shape(&meta["pixels_shape"]));
    let feats = media(&mut m, pixels).unwrap();
    assert_eq!(feats.shape(), shape(&meta["features_shape"]));
    let got = values(&feats);
    let want = f32s("features.f32");
    let e = rel_err(&got, &want);
    eprintln!("media features: relative error {e:.2e}");
    assert!(e < REL_TOL, "media features relative error {e:e}");

    // The prompt with both images, the features merged at the placeholders,
    // past the 8-token window, then three cached steps.
    let (image, d, v) = (meta["image_token_id"].as_u64().unwrap() as u32, feats.dim(2) as usize, meta["vocab"].as_u64().unwrap() as usize);
    let prompt = ids(&meta["prompt_image"]);
    let steps = ids(&meta["continue_image"]);
    let want_logits = f32s("logits_image.f32");
    let rows = run_prompt(&mut m, &prompt, Some(merge_inputs(&prompt, image, &got, d)), &steps);
    let (fails, worst) = check_rows("image prompt", &rows, &want_logits, v);
    eprintln!("image prompt: {} positions, worst relative error {worst:.2e}", rows.len());
    assert!(fails.is_empty(), "{}", fails.join("\n"));

    // Zero features instead: every position from the first image token on
    // leaves mlx-vlm's logits, the ones before it do not.
    let zeros = vec![0f32; got.len()];
    let rows = run_prompt(&mut m, &prompt, Some(merge_inputs(&prompt, image, &zeros, d)), &steps);
    let first_image = prompt.iter().position(|&t| t == image).unwrap();
    for (i, (g, w)) in rows.iter().zip(want_logits.chunks(v)).enumerate() {
        let e = rel_err(g, w);
        assert_eq!(e > REL_TOL, i >= first_image, "zero features, position {i}: relative error {e:e}");
    }
}

#[test]
fn gemma4_without_images_runs_text_only() {
    let _g = common::mlx_lock();
    let meta = meta();
    let mut m = load();
    let prompt = ids(&meta["prompt_text"]);
    let rows = run_prompt(&mut m, &prompt, None, &[]);
    let (fails, worst) = check_rows("text prompt", &rows, &f32s("logits_text.f32"), meta["vocab"].as_u64().unwrap() as usize);
    eprintln!("text prompt: {} positions, worst relative error {worst:.2e}", rows.len());
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

#[test]
fn gemma4_media_forward_refuses_bad_pixels() {
    let _g = common::mlx_lock();
    let mut m = load();
    let msg = |r: anyhow::Result<Array>| format!("{:#}", r.expect_err("a wrong pixel array was accepted"));
    let z = |s: &[i32]| mlx_rs::ops::zeros::<f32>(s).unwrap();
    // H or W not a multiple of patch 4 x pooling 2, one channel, no batch
    // axis, wider than the 16-entry position table allows (64 pixels).
    for bad in [&[1, 3, 16, 20][..], &[1, 3, 12, 24], &[2, 1, 16, 24], &[3, 16, 24], &[1, 3, 16, 72]] {
        let e = msg(media(&mut m, z(bad)));
        assert!(e.contains("pixel values must be [N, 3, H, W]") && e.contains("multiples of 8") && e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
    }
    // No pixels lent at all.
    let mut store = EncoderStore::new(&[1], 1);
    let req = ForwardRequest { output: Some(Output::Media), ..ForwardRequest::default() };
    let e = format!("{:#}", m.run(&Array::from_slice(&[0i32], &[1, 1]), &mut store, req).err().unwrap());
    assert!(e.contains("no pixel values"), "{e}");
    // The model still works after the refusals; each size gives its own
    // (H/8) * (W/8) tokens.
    for (s, t) in [([1, 3, 16, 24], 6), ([2, 3, 8, 8], 1), ([1, 3, 64, 32], 32)] {
        let feats = media(&mut m, z(&s)).unwrap();
        assert_eq!(feats.shape(), [s[0], t, 64], "{s:?}");
        assert!(values(&feats).iter().all(|x| x.is_finite()), "{s:?}");
    }
}
