//! Qwen3-VL against mlx-vlm 0.7.10 at the plugin level
//! (scripts/dev/qwen3_vl_golden.py, fixture tests/fixtures/models/
//! qwen3_vl-tiny: 3 decoder layers, deepstack after layers 0 and 1, a 24x16
//! image as 24 placeholders). A fake host (`Host`, dense attention over a
//! concatenated KV cache) runs the media forward on the processor's
//! normalised pixels, lends the prompt's rows their stacked features and
//! mlx-vlm's M-RoPE positions, and decodes with its rope delta, as the
//! engine does. Weights reach the model through an in-memory WeightSource.
use super::*;
use crate::test_weights::Mem;
use abi_stable::sabi_trait::TD_Opaque;
use mlx_rs::ops::indexing::IndexOp;
use rmlx_plugin_api::{
    arch::WeightSource_TO,
    author::{kv::dense_attend, AttendOpts},
    MEDIA_POSITIONS,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

const IMG: i32 = 292;
/// f32 through a different op order than mlx-vlm's (its fused kernels).
const TOL: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn gold() -> Value {
    let p = root().join("goldens/qwen3_vl-serve/golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f32s(name: &str) -> Vec<f32> {
    let b = std::fs::read(root().join("goldens/qwen3_vl-serve").join(name)).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn config_json() -> String {
    std::fs::read_to_string(root().join("models/qwen3_vl-tiny/config.json")).unwrap()
}

/// The fixture model, its tensor names passed through `rename`; every
/// tensor must be used.
fn load(rename: impl Fn(&str, Array) -> (String, Array)) -> Qwen3Vl {
    let raw = Array::load_safetensors(root().join("models/qwen3_vl-tiny/model.safetensors")).unwrap();
    let mut mem = Mem(raw.into_iter().map(|(k, v)| rename(&k, v)).collect::<HashMap<_, _>>());
    let model = {
        let mut src = WeightSource_TO::from_ptr(&mut mem, TD_Opaque);
        let mut w = Weights::new(&mut src);
        Qwen3Vl::load(&config_json(), &mut w).unwrap()
    };
    assert!(mem.0.is_empty(), "unused tensors {:?}", mem.0.keys());
    model
}

/// A host for one row: a KV cache per layer (dense attention over it, causal
/// over the new positions), the forward's inputs and what it handed back.
#[derive(Default)]
struct Host {
    kv: HashMap<u32, (Array, Array)>,
    offset: i32,
    media: bool,
    inputs: Option<(Array, Array)>,
    positions: Option<Array>,
    rel: Option<Array>,
}

impl Attend for Host {
    fn batch(&self) -> u32 {
        1
    }
    fn offset(&self) -> i32 {
        self.offset
    }
    fn offsets(&self) -> Array {
        Array::from_slice(&[self.offset], &[1])
    }
    fn attend(&mut self, layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array> {
        let (k, v) = match self.kv.remove(&layer) {
            Some((pk, pv)) => (ops::concatenate(&[pk, k], 2)?, ops::concatenate(&[pv, v], 2)?),
            None => (k, v),
        };
        let o = dense_attend(&q, &k, &v, None, opts)?;
        self.kv.insert(layer, (k, v));
        Ok(o)
    }
    fn output(&self) -> Output {
        if self.media {
            Output::Media
        } else {
            Output::AllLogits
        }
    }
    fn wants_hidden(&self, layer: u32) -> bool {
        self.media && layer == MEDIA_POSITIONS
    }
    fn put_hidden(&mut self, _: u32, hidden: &Array) -> Result<()> {
        self.rel = Some(hidden.clone());
        Ok(())
    }
    fn input_embeddings(&self) -> Option<(Array, Array)> {
        self.inputs.clone()
    }
    fn positions(&self) -> Option<Array> {
        self.positions.clone()
    }
}

/// The case's image features [T, (1+S)*D] from the media forward (and its
/// relative positions checked).
fn encode(model: &mut Qwen3Vl, case: &Value) -> Array {
    let shape = ints(&case["pixels_shape"]);
    let pixels = Array::from_slice(&f32s("image_a.pixels.f32"), &[1, shape[0], shape[1], shape[2]]);
    let mut h = Host { media: true, inputs: Some((pixels, Array::from_slice(&[true], &[1, 1]))), ..Host::default() };
    let feats = model.forward(&Array::from_slice(&[0i32], &[1, 1]), &mut h).unwrap(); // [1, T, 3D]
    assert_eq!(feats.shape(), [1, 24, 3 * 32]);
    let rel = values(&h.rel.expect("MEDIA_POSITIONS handed").as_dtype(Dtype::Float32).unwrap());
    let want: Vec<f32> = (0..4).flat_map(|r| (0..6).flat_map(move |c| [0.0, r as f32, c as f32])).collect();
    assert_eq!(rel, want, "(t, row, column) of the 4 x 6 merged grid");
    feats.index(0)
}

/// Prefills the prompt in chunks ending at `cuts`, each with its own rows'
/// features and positions, and decodes `steps` greedy tokens with the rope
/// delta: (every prompt position's logits, the greedy tokens).
fn run(model: &mut Qwen3Vl, case: &Value, cuts: &[usize], steps: usize) -> (Vec<f32>, Vec<i32>) {
    run_with(model, case, cuts, steps, true)
}

/// `run`, the deepstack columns zeroed when `deep` is false.
fn run_with(model: &mut Qwen3Vl, case: &Value, cuts: &[usize], steps: usize, deep: bool) -> (Vec<f32>, Vec<i32>) {
    let ids = ints(&case["prompt_ids"]);
    let pos: Vec<Vec<i32>> = case["positions"].as_array().unwrap().iter().map(ints).collect();
    let mut feats = encode(model, case); // [T, 3D]
    if !deep {
        let main = feats.index((.., ..32));
        feats = ops::concatenate(&[main, ops::zeros::<f32>(&[24, 64]).unwrap()], 1).unwrap();
    }
    let width = feats.dim(1);
    let mut h = Host::default();
    let (mut logits, mut start, mut seen) = (Vec::new(), 0, 0);
    for &end in cuts.iter().chain([ids.len()].iter()) {
        let l = (end - start) as i32;
        let mask: Vec<bool> = ids[start..end].iter().map(|&t| t == IMG).collect();
        let rows: Vec<Array> = mask
            .iter()
            .map(|&m| {
                if m {
                    seen += 1;
                    feats.index(seen - 1)
                } else {
                    ops::zeros::<f32>(&[width]).unwrap()
                }
            })
            .collect();
        let f = ops::stack(&rows, 0).unwrap().reshape(&[1, l, width]).unwrap(); // [1, L, 3D]
        h.inputs = mask.contains(&true).then(|| (f, Array::from_slice(&mask, &[1, l])));
        let p: Vec<i32> = pos.iter().flat_map(|a| a[start..end].to_vec()).collect();
        h.positions = Some(Array::from_slice(&p, &[3, 1, l]));
        let out = model.forward(&Array::from_slice(&ids[start..end], &[1, l]), &mut h).unwrap(); // [1, L, V]
        logits.extend(values(&out));
        (h.offset, start) = (end as i32, end);
    }
    assert_eq!(seen, 24, "every feature lent once");
    let delta = case["rope_delta"].as_i64().unwrap() as i32;
    let v = 300;
    let argmax = |x: &[f32]| x.iter().enumerate().fold((0, f32::MIN), |a, (i, &y)| if y > a.1 { (i, y) } else { a }).0 as i32;
    let mut tokens = vec![argmax(&logits[logits.len() - v..])];
    h.inputs = None;
    while tokens.len() < steps {
        let p = h.offset + delta;
        h.positions = Some(Array::from_slice(&[p, p, p], &[3, 1, 1]));
        let out = model.forward(&Array::from_slice(&[*tokens.last().unwrap()], &[1, 1]), &mut h).unwrap();
        tokens.push(argmax(&values(&out)));
        h.offset += 1;
    }
    (logits, tokens)
}

fn max_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn qwen3_vl_matches_mlx_vlm_in_one_forward_and_across_chunks() {
    let g = gold();
    let case = &g["cases"]["image_a"];
    let want = f32s("image_a.logits.f32");
    let steps = g["steps"].as_u64().unwrap() as usize;
    let golden: Vec<i32> = ints(&case["tokens"]);
    let mut model = load(|k, v| (k.to_string(), v));
    // One forward; then the image (placeholders 8..32) split over two chunks
    // and a chunk of text before it, so deepstack must land per row.
    for cuts in [&[][..], &[20], &[5, 14, 27]] {
        let (logits, tokens) = run(&mut model, case, cuts, steps);
        let e = max_err(&logits, &want);
        eprintln!("chunks ending at {cuts:?}: logits max abs error {e:.2e}, tokens {tokens:?}");
        assert!(e < TOL, "chunks ending at {cuts:?}: logits max abs error {e:e}");
        assert_eq!(tokens, golden, "chunks ending at {cuts:?}: greedy tokens");
    }
}

#[test]
fn qwen3_vl_deepstack_and_positions_matter() {
    // Without the deepstack columns, or with text positions in place of
    // M-RoPE's, the logits leave mlx-vlm's: the test above sees both.
    let g = gold();
    let case = &g["cases"]["image_a"];
    let want = f32s("image_a.logits.f32");
    let mut model = load(|k, v| (k.to_string(), v));
    let good = run(&mut model, case, &[], 1).0;
    assert!(max_err(&good, &want) < TOL);
    let mut flat = case.clone();
    flat["positions"] = serde_json::json!(vec![(0..39).collect::<Vec<i32>>(); 3]);
    assert!(max_err(&run(&mut model, &flat, &[], 1).0, &want) > 1e-2, "positions ignored");
    let flat_deep = run_with(&mut model, case, &[], 1, false).0;
    assert!(max_err(&flat_deep, &want) > 1e-2, "deepstack features ignored");
    let e = ImageInputs::of(&Host { inputs: Some((ops::zeros::<f32>(&[1, 2, 96]).unwrap(), Array::from_slice(&[true, false], &[1, 2]))), ..Host::default() }, 32, 0)
        .err()
        .expect("stacked features taken as plain ones")
        .to_string();
    assert!(e.contains("must be [B, L, 32]"), "{e}");
    let d = ImageInputs::of(&Host { inputs: Some((ops::ones::<f32>(&[1, 2, 96]).unwrap(), Array::from_slice(&[true, false], &[1, 2]))), ..Host::default() }, 32, 2)
        .unwrap()
        .unwrap();
    let h = ops::zeros::<f32>(&[1, 2, 32]).unwrap();
    let after = values(&d.after(1, h.clone()).unwrap());
    assert!(after[..32].iter().all(|&x| x == 1.0) && after[32..].iter().all(|&x| x == 0.0), "added at the mask only");
    assert_eq!(values(&d.after(2, h).unwrap()), vec![0.0; 64], "no deepstack feature past layer S - 1");
}

#[test]
fn qwen3_vl_loads_hugging_face_names() {
    // HF's layout: model.language_model.*, lm_head, model.visual.* with the
    // patch embedding's Conv3d weight [D, C, T, P, P] (mlx-vlm's sanitize
    // turns it into [D, T, P, P, C]).
    let g = gold();
    let case = &g["cases"]["image_a"];
    let mut model = load(|k, v| {
        let name = if let Some(r) = k.strip_prefix("language_model.model.") {
            format!("model.language_model.{r}")
        } else if let Some(r) = k.strip_prefix("language_model.") {
            r.to_string()
        } else {
            format!("model.visual.{}", k.strip_prefix("vision_tower.").unwrap())
        };
        let v = if name.ends_with("patch_embed.proj.weight") { v.transpose_axes(&[0, 4, 1, 2, 3]).unwrap() } else { v };
        (name, v)
    });
    let (logits, tokens) = run(&mut model, case, &[20], 3);
    assert!(max_err(&logits, &f32s("image_a.logits.f32")) < TOL);
    assert_eq!(tokens, ints(&case["tokens"])[..3]);
}

#[test]
fn qwen3_vl_config_refusals() {
    let base: Value = serde_json::from_str(&config_json()).unwrap();
    assert!(check(&base.to_string()).is_ok());
    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut c = base.clone();
        edit(&mut c);
        check(&c.to_string()).err().expect("accepted").to_string()
    };
    assert!(refused(&|c| c["text_config"]["attention_bias"] = true.into()).contains("attention_bias"));
    assert!(refused(&|c| c["text_config"]["hidden_act"] = "gelu".into()).contains("hidden_act `gelu`"));
    assert!(refused(&|c| c["text_config"]["rope_scaling"]["mrope_interleaved"] = false.into()).contains("mrope_interleaved: false"));
    assert!(refused(&|c| c["text_config"]["rope_scaling"]["factor"] = 2.0.into()).contains("key `factor`"));
    assert!(refused(&|c| c["text_config"]["rope_scaling"]["rope_type"] = "yarn".into()).contains("type `yarn`"));
    assert!(refused(&|c| c["text_config"]["rope_scaling"]["mrope_section"] = serde_json::json!([2, 3])).contains("three integers"));
    assert!(refused(&|c| c["vision_config"]["out_hidden_size"] = 48.into()).contains("out_hidden_size 48"));
    assert!(refused(&|c| c["text_config"]["num_key_value_heads"] = 3.into()).contains("multiple of num_key_value_heads"));
    assert!(refused(&|c| c["vision_config"]["model_type"] = "qwen2_5_vl".into()).contains("not a Qwen3-VL"));
    // The interleaved selector: h on 1, 4, 7 (i < 3 * 3), w on 2, 5 and 8.
    let m = MRope::new(&Config::parse(&base.to_string()).unwrap()).unwrap();
    assert_eq!(values(&m.axis.as_dtype(Dtype::Float32).unwrap()), vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0]);
}

#[test]
fn qwen3_vl_without_its_tower_takes_text_only() {
    // A checkpoint without `vision_tower.*`: loads (every text tensor used),
    // refuses a media forward by saying so, and runs text at offsets.
    let raw = Array::load_safetensors(root().join("models/qwen3_vl-tiny/model.safetensors")).unwrap();
    let mut mem = Mem(raw.into_iter().filter(|(k, _)| !k.starts_with("vision_tower.")).collect());
    let mut model = {
        let mut src = WeightSource_TO::from_ptr(&mut mem, TD_Opaque);
        let mut w = Weights::new(&mut src);
        Qwen3Vl::load(&config_json(), &mut w).unwrap()
    };
    assert!(mem.0.is_empty(), "unused tensors {:?}", mem.0.keys());
    let pixels = ops::zeros::<f32>(&[1, 3, 16, 24]).unwrap();
    let mut h = Host { media: true, inputs: Some((pixels, Array::from_slice(&[true], &[1, 1]))), ..Host::default() };
    let e = model.forward(&Array::from_slice(&[0i32], &[1, 1]), &mut h).err().expect("media without a tower").to_string();
    assert!(e.contains("no vision tower"), "{e}");
    let mut h = Host::default();
    let out = model.forward(&Array::from_slice(&[1i32, 4, 7], &[1, 3]), &mut h).unwrap();
    assert_eq!(out.shape(), [1, 3, 300]);
    assert!(values(&out).iter().all(|x| x.is_finite()));
}
