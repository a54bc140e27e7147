//! The harness of the vision-model goldens (arch_gemma3_vision,
//! arch_gemma4_vision): a tiny model made by a scripts/dev/*_vision_golden.py
//! script and what mlx-vlm computed for it (golden.json plus little-endian
//! f32 arrays), the media forward, features merged at the image placeholders
//! through `input_embeddings`, and logits compared row by row.
use super::golden::{rel_err, MARGIN, REL_TOL};
use mlx_rs::{Array, Dtype};
use rmlx::engine::attend::ForwardRequest;
use rmlx::engine::encoder::EncoderStore;
use rmlx::engine::{sampler, LoadedModel};
use rmlx_plugin_api::author::Output;
use serde_json::Value;
use rmlx::engine::media::PromptMedia;
use rmlx::engine::worker::{GenEvent, GenParams, GenRequest, ModelEntry, Worker};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A model fixture and its golden directory.
pub struct VisionGolden {
    pub model: PathBuf,
    pub dir: PathBuf,
    pub meta: Value,
}

impl VisionGolden {
    /// `model` and `gold` relative to tests/fixtures.
    pub fn open(model: &str, gold: &str) -> Self {
        let dir = super::fixture(gold);
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        VisionGolden { model: super::fixture(model), dir, meta }
    }

    /// A little-endian f32 file of the golden.
    pub fn f32s(&self, name: &str) -> Vec<f32> {
        let b = std::fs::read(self.dir.join(name)).unwrap();
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Token ids under `key`.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.meta[key].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    }

    /// A shape under `key`.
    pub fn shape(&self, key: &str) -> Vec<i32> {
        self.meta[key].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
    }

    pub fn int(&self, key: &str) -> u64 {
        self.meta[key].as_u64().unwrap_or_else(|| panic!("golden.json has no {key}"))
    }

    /// The fixture, loaded by arch-gemma with every tensor used.
    pub fn load(&self) -> LoadedModel {
        let m = LoadedModel::load(&self.model, &super::registry()).unwrap();
        assert_eq!(m.architecture_plugin, "arch-gemma");
        assert!(m.unused.is_empty(), "unused tensors {:?}", m.unused);
        m
    }

    /// The image prompt (`prompt_image`, then `continue_image` one step at
    /// a time) with `feats` [N*T, d] merged at the `image` placeholders gives
    /// mlx-vlm's `logits_image.f32`; zero features instead leave them from
    /// the first image token on, and only there.
    pub fn check_image_prompt(&self, m: &mut LoadedModel, feats: &[f32], d: usize, image: u32) {
        let v = self.int("vocab") as usize;
        let prompt = self.ids("prompt_image");
        let steps = self.ids("continue_image");
        let want = self.f32s("logits_image.f32");
        let rows = run_prompt(m, &prompt, Some(merge_inputs(&prompt, image, feats, d)), &steps);
        let (fails, worst) = check_rows("image prompt", &rows, &want, v);
        eprintln!("image prompt: {} positions, worst relative error {worst:.2e}", rows.len());
        assert!(fails.is_empty(), "{}", fails.join("\n"));

        let zeros = vec![0f32; feats.len()];
        let rows = run_prompt(m, &prompt, Some(merge_inputs(&prompt, image, &zeros, d)), &steps);
        let first_image = prompt.iter().position(|&t| t == image).unwrap();
        for (i, (g, w)) in rows.iter().zip(want.chunks(v)).enumerate() {
            let e = rel_err(g, w);
            assert_eq!(e > REL_TOL, i >= first_image, "zero features, position {i}: relative error {e:e}");
        }
    }

    /// The text-only prompt (`prompt_text`, no input embeddings) gives
    /// mlx-vlm's `logits_text.f32`.
    pub fn check_text_prompt(&self, m: &mut LoadedModel) {
        let rows = run_prompt(m, &self.ids("prompt_text"), None, &[]);
        let (fails, worst) = check_rows("text prompt", &rows, &self.f32s("logits_text.f32"), self.int("vocab") as usize);
        eprintln!("text prompt: {} positions, worst relative error {worst:.2e}", rows.len());
        assert!(fails.is_empty(), "{}", fails.join("\n"));
    }

    /// The media forward's features on `pixels` equal mlx-vlm's
    /// `features.f32` (shape `features_shape`); returns them flat.
    pub fn check_features(&self, m: &mut LoadedModel, pixels: Array) -> Vec<f32> {
        let feats = media(m, pixels).unwrap();
        assert_eq!(feats.shape(), self.shape("features_shape"));
        let got = values(&feats);
        let e = rel_err(&got, &self.f32s("features.f32"));
        eprintln!("media features: relative error {e:.2e}");
        assert!(e < REL_TOL, "media features relative error {e:e}");
        got
    }
}

pub fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// The media forward: pixels [N, C, H, W] -> [N, T, D].
pub fn media(m: &mut LoadedModel, pixels: Array) -> anyhow::Result<Array> {
    let n = pixels.dim(0).max(1);
    let tokens = Array::from_slice(&vec![0i32; n as usize], &[n, 1]);
    let mask = Array::from_slice(&vec![true; n as usize], &[n, 1]);
    let mut store = EncoderStore::new(&vec![1; n as usize], 1);
    let req = ForwardRequest { output: Some(Output::Media), inputs: Some((pixels, mask)), ..ForwardRequest::default() };
    Ok(m.run(&tokens, &mut store, req)?.out)
}

/// The media forward with no pixels lent: its error text.
pub fn media_without_pixels(m: &mut LoadedModel) -> String {
    let mut store = EncoderStore::new(&[1], 1);
    let req = ForwardRequest { output: Some(Output::Media), ..ForwardRequest::default() };
    format!("{:#}", m.run(&Array::from_slice(&[0i32], &[1, 1]), &mut store, req).err().expect("a media forward without pixels ran"))
}

/// Features [1, L, D] and mask [1, L] putting `feats` (T*N rows of D, in
/// order) at the `image` token positions of `prompt`.
pub fn merge_inputs(prompt: &[u32], image: u32, feats: &[f32], d: usize) -> (Array, Array) {
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
pub fn run_prompt(m: &mut LoadedModel, prompt: &[u32], inputs: Option<(Array, Array)>, steps: &[u32]) -> Vec<Vec<f32>> {
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
pub fn check_rows(label: &str, got: &[Vec<f32>], want: &[f32], v: usize) -> (Vec<String>, f32) {
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

/// Through the engine: greedy tokens of a prompt with images, with each
/// step's top-5 (id, logprob).
pub fn generate_with_media(w: &Worker, e: &Arc<ModelEntry>, prompt: &[u32], media: Arc<PromptMedia>, chunk: usize, steps: usize) -> Vec<(u32, Vec<(u32, f32)>)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens: steps, ignore_eos: true, prefill_chunk: chunk, logprobs: Some(5), media: Some(media), ..GenParams::default() };
    let cancel = Arc::new(AtomicBool::new(false));
    w.submit(GenRequest { model: e.clone(), prompt: prompt.to_vec(), params, hook: None, cancel, keep_alive: None, events: tx }).unwrap();
    let mut out = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenEvent::Token { id, logprob, .. } => out.push((id, logprob.unwrap().top.iter().map(|(id, _, lp)| (*id, *lp)).collect())),
            GenEvent::Done(_) => break,
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
    out
}

/// `got` (from [`generate_with_media`]) equals a golden case's greedy
/// tokens and top-5 logprobs (within 1e-4).
pub fn assert_as_mlx_vlm(got: &[(u32, Vec<(u32, f32)>)], case: &Value, what: &str) {
    let tokens: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), tokens, "{what}: greedy tokens");
    for (step, ((_, top), want)) in got.iter().zip(case["top5"].as_array().unwrap()).enumerate() {
        for ((gi, gl), w) in top.iter().zip(want.as_array().unwrap()) {
            let (wi, wl) = (w[0].as_u64().unwrap() as u32, w[1].as_f64().unwrap() as f32);
            assert_eq!(*gi, wi, "{what} step {step}: top-5 {top:?} vs mlx-vlm {want}");
            assert!((gl - wl).abs() < 1e-4, "{what} step {step}: logprob of {gi}: {gl} vs mlx-vlm {wl}");
        }
    }
}

/// A chat case's prompt ids and images as the API builds them (the model
/// directory's VisionSpec: processor, placeholder expansion, spans), the
/// ids checked against mlx-vlm's (`prompt_ids`), the counts against
/// `image_tokens`, each image's pixels against `shape` [C, H, W]. `model`
/// relative to tests/fixtures, the images from tests/fixtures/images.
pub fn prompt_and_media(model: &str, case: &Value, shape: [usize; 3]) -> (Vec<u32>, Arc<PromptMedia>) {
    use rmlx::engine::media::PromptImage;
    use rmlx::media::vision::VisionSpec;
    use rmlx::media::{decode_image, MediaHash, MediaOptions};
    use rmlx::model::tokenizer::Tokenizer;
    let dir = super::fixture(model);
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let spec = VisionSpec::from_model_dir(&dir, Some(&tok)).unwrap().expect("the fixture takes images");
    let mut images = Vec::new();
    let mut counts = Vec::new();
    for part in case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).filter(|p| p.ends_with(".png")) {
        let bytes = std::fs::read(super::fixture("images").join(part)).unwrap();
        let img = decode_image(part, &bytes, &MediaOptions::default()).unwrap();
        let pixels = spec.processor.preprocess(part, &img).unwrap();
        assert_eq!(pixels.shape, shape, "{part}: preprocessed shape");
        counts.push(spec.tokens_for(&pixels).unwrap());
        images.push((pixels, MediaHash::of_rgb(&img)));
    }
    let want_counts: Vec<usize> = case["image_tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    assert_eq!(counts, want_counts, "image token counts");
    let expanded = spec.expand(case["prompt"].as_str().unwrap(), &counts).unwrap();
    let ids = tok.encode(&expanded, false).unwrap();
    let want: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want, "the host's prompt ids differ from mlx-vlm's");
    let spans = spec.placeholder_spans(&ids, &counts).unwrap();
    let images = images.into_iter().zip(spans).map(|((p, h), s)| PromptImage::new(p, h, s)).collect();
    (ids, Arc::new(PromptMedia { images }))
}

/// A one-sequence cache with explicit multimodal-RoPE positions [3, 1, L]
/// (ABI 3.7 `positions()`).
pub struct Positioned<'a> {
    pub cache: &'a mut rmlx::engine::cache::KvCache,
    pub pos: Array,
}

impl rmlx::engine::attend::KvStore for Positioned<'_> {
    fn batch(&self) -> u32 {
        self.cache.batch()
    }
    fn offset(&self) -> i32 {
        self.cache.offset()
    }
    fn offsets(&self) -> Array {
        self.cache.offsets()
    }
    fn attend(
        &mut self,
        layer: u32,
        q: Array,
        k: Array,
        v: Array,
        opts: &rmlx_plugin_api::author::AttendOpts<'_>,
    ) -> Result<Array, rmlx_plugin_api::PluginError> {
        self.cache.attend(layer, q, k, v, opts)
    }
    fn positions(&self) -> Option<Array> {
        Some(self.pos.clone())
    }
}
