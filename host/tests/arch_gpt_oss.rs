//! model_type `gpt_oss` (plugins/arch-gpt-oss/src/gpt_oss.rs): the tiny
//! models tests/goldens/gpt_oss_goldens.py built with mlx-lm's own classes
//! (attention sinks, sliding and full layers, YaRN, 8 experts top-2 with
//! biases, gpt-oss's clamped SwiGLU), against the logits and greedy tokens
//! mlx-lm recorded, in float32, affine q4 and mxfp4 experts; which plugin
//! builds each layer; batched serving against one at a time; and the configs
//! and checkpoints that are refused by name.
mod common;

use common::golden::{compare, Golden, Tally};
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{
    FinishReason, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig,
};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(name: &str, reg: &rmlx::plugins::Registry) -> LoadedModel {
    let mut model = LoadedModel::load_with(&common::fixture(&format!("models/{name}")), reg, LoadPolicy::default())
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
    assert_eq!(model.architecture_plugin, "arch-gpt-oss");
    let mut tally = Tally::default();
    compare(&mut model, &golden(name), &mut tally);
    eprintln!("{name}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
    assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
    model
}

/// (mode, bits, group size) of a module as loaded.
fn format(model: &LoadedModel, path: &str) -> (String, i32, i32) {
    let q = model.layers.get(path).unwrap_or_else(|| panic!("no layer {path}"));
    (q.mode.clone(), q.bits, q.group_size)
}

#[test]
fn gpt_oss_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // (name, layers, experts' format, router's format, attention's format)
    let cases = [
        ("gpt_oss-f32", 4, ("none", 0, 0), ("none", 0, 0), ("none", 0, 0)),
        ("gpt_oss-q4-g64", 4, ("affine", 4, 64), ("affine", 8, 64), ("affine", 4, 64)),
        ("gpt_oss-mxfp4-q8", 4, ("mxfp4", 4, 32), ("affine", 8, 64), ("affine", 8, 64)),
        ("gpt_oss-default-f32", 2, ("none", 0, 0), ("none", 0, 0), ("none", 0, 0)),
    ];
    for (name, layers, experts, router, attn) in cases {
        let model = check(name, &reg);
        let own = |f: (&str, i32, i32)| (f.0.to_string(), f.1, f.2);
        let expect = |path: &str, want: (&str, i32, i32)| {
            let got = format(&model, path);
            assert_eq!(got.0, want.0, "{name} {path}");
            if want.0 != "none" {
                assert_eq!(got, own(want), "{name} {path}");
            }
        };
        for i in 0..layers {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                expect(&format!("model.layers.{i}.mlp.experts.{p}"), experts);
            }
            expect(&format!("model.layers.{i}.mlp.router"), router);
            for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                expect(&format!("model.layers.{i}.self_attn.{p}"), attn);
            }
        }
    }
    // The cache spec: gpt_oss-f32's layer_types (sliding, full, full,
    // sliding) with an 8-token window; the default alternation otherwise.
    let spec = |name: &str| {
        let m = LoadedModel::load(&common::fixture(&format!("models/{name}")), &reg).unwrap();
        m.spec.sliding_window.to_vec()
    };
    assert_eq!(spec("gpt_oss-f32"), [8, 0, 0, 8]);
    assert_eq!(spec("gpt_oss-default-f32"), [5, 0]);
}

// ---- batched serving ----

const SERVED: [&str; 2] = ["gpt_oss-f32", "gpt_oss-mxfp4-q8"];

fn worker(catalog: &ModelCatalog, prefix_cache: bool) -> Worker {
    Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 64,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        SchedulerConfig { prefix_cache, ..SchedulerConfig::default() },
        catalog,
    )
    .unwrap()
}

fn submit(w: &Worker, entry: &Arc<ModelEntry>, prompt: &[u32], max_tokens: usize, chunk: usize) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = GenParams { max_tokens, ignore_eos: true, prefill_chunk: chunk, ..GenParams::default() };
    w.submit(GenRequest {
        model: entry.clone(),
        prompt: prompt.to_vec(),
        params,
        hook: None,
        cancel: Arc::new(AtomicBool::new(false)),
        keep_alive: None,
        events: tx,
    })
    .unwrap();
    rx
}

fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> Vec<u32> {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(f) => {
                assert_eq!(f.reason, FinishReason::Length);
                return ids;
            }
            GenEvent::Error(e) => panic!("request failed: {e}"),
            _ => {}
        }
    }
}

/// Prompts of 1 to 70 tokens: most run past the 8-token window.
fn prompts() -> Vec<Vec<u32>> {
    [1usize, 5, 17, 40, 3, 70]
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32).collect())
        .collect()
}

/// The paged server engine, one request at a time and six at once (prefill
/// in 8-token chunks interleaved with the others' decode steps), equals
/// `rmlx generate`'s one-sequence cache token for token.
#[test]
fn gpt_oss_batched_equals_one_at_a_time() {
    let _g = common::mlx_lock();
    let list: Vec<_> = SERVED.iter().map(|m| (None, common::fixture(&format!("models/{m}")))).collect();
    let cat = ModelCatalog::discover(&list, &[]).unwrap();
    let w = worker(&cat, false);
    let max_tokens = 20;
    for model in SERVED {
        let entry = cat.get(model).unwrap();
        let ps = prompts();
        let solo: Vec<Vec<u32>> = ps.iter().map(|p| collect(&mut submit(&w, &entry, p, max_tokens, 512))).collect();
        let mut rxs: Vec<_> = ps.iter().map(|p| submit(&w, &entry, p, max_tokens, 8)).collect();
        let batched: Vec<Vec<u32>> = rxs.iter_mut().map(collect).collect();
        for (i, p) in ps.iter().enumerate() {
            let want = common::greedy_reference(model, p, max_tokens);
            assert_eq!(solo[i], want, "{model} prompt {i}: server one-at-a-time differs from rmlx generate");
            assert_eq!(batched[i], want, "{model} prompt {i}: batched differs from one at a time");
        }
        let s = w.stats();
        assert!(s.max_batch >= 4, "requests did not decode together: {s:?}");
    }
}

/// A second turn that shares the first's prompt and reply hits the prefix
/// cache and still equals `rmlx generate` (sinks and windows over cached blocks).
#[test]
fn gpt_oss_prefix_cache_hit_equals_miss() {
    let _g = common::mlx_lock();
    let model = "gpt_oss-f32";
    let list = vec![(None, common::fixture(&format!("models/{model}")))];
    let cat = ModelCatalog::discover(&list, &[]).unwrap();
    let w = worker(&cat, true);
    let entry = cat.get(model).unwrap();
    let first: Vec<u32> = (0..50).map(|i| (i * 13 % 240 + 5) as u32).collect();
    let out = collect(&mut submit(&w, &entry, &first, 12, 512));
    assert_eq!(out, common::greedy_reference(model, &first, 12));
    let hits = w.stats().blocks[0].1.prefix_hit_tokens;
    let mut second = first.clone();
    second.extend(&out);
    second.extend([20, 21, 22]);
    let out2 = collect(&mut submit(&w, &entry, &second, 12, 512));
    let s = w.stats().blocks[0].1.clone();
    assert!(s.prefix_hit_tokens >= hits + 48, "no prefix-cache hit: {s:?}");
    assert_eq!(out2, common::greedy_reference(model, &second, 12));
}

// ---- refusals ----

/// config.json of gpt_oss-f32 with `edit` applied.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let path = common::fixture("models/gpt_oss-f32/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut c);
    c.to_string()
}

#[test]
fn gpt_oss_configs_are_refused_by_name() {
    let reg = common::registry();
    assert!(reg.check_config("gpt_oss", &config_with(|_| ())).is_ok());
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c["layer_types"][1] = "chunked_attention".into()), "layer_types[1] `chunked_attention`"),
        (Box::new(|c| c["layer_types"] = serde_json::json!(["sliding_attention"])), "layer_types has 1 entries"),
        (Box::new(|c| c["swiglu_limit"] = 10.0.into()), "swiglu_limit 10"),
        (Box::new(|c| c["attention_bias"] = false.into()), "attention_bias"),
        (Box::new(|c| c["tie_word_embeddings"] = true.into()), "tie_word_embeddings"),
        (Box::new(|c| c["experts_per_token"] = 3.into()), "experts_per_token 3"),
        (Box::new(|c| c["num_experts_per_tok"] = 9.into()), "num_experts_per_tok 9"),
        (Box::new(|c| c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})), "rope_scaling type `dynamic`"),
        (Box::new(|c| c["rope_parameters"] = serde_json::json!({"rope_type": "default"})), "rope_parameters.rope_type `default`"),
    ];
    for (edit, want) in cases {
        let e = format!("{:#}", reg.check_config("gpt_oss", &config_with(edit)).expect_err(want));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

fn load_err(path: &Path, reg: &rmlx::plugins::Registry) -> String {
    match LoadedModel::load_with(path, reg, LoadPolicy::default()) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// gpt_oss-f32's weights, renamed by `rename` (an empty list drops a tensor),
/// with its config edited by `edit`, in a temporary directory.
fn edited_copy(
    rename: impl Fn(&str, &mlx_rs::Array) -> Vec<(String, mlx_rs::Array)>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("models/gpt_oss-f32/model.safetensors");
    let tensors = mlx_rs::Array::load_safetensors(&src).unwrap();
    let out: Vec<(String, mlx_rs::Array)> = tensors.iter().flat_map(|(k, v)| rename(k, v)).collect();
    mlx_rs::Array::save_safetensors(out, None, dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), config_with(edit)).unwrap();
    dir
}

#[test]
fn gpt_oss_checkpoints_must_fit_the_config() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let same = |k: &str, v: &mlx_rs::Array| vec![(k.to_string(), v.clone())];
    let drop = |suffix: &'static str| move |k: &str, v: &mlx_rs::Array| if k.ends_with(suffix) { vec![] } else { same(k, v) };
    // The original checkpoint's fused, interleaved gate_up_proj is refused with the way out.
    let fused = |k: &str, v: &mlx_rs::Array| {
        if let Some(layer) = k.strip_suffix(".experts.gate_proj.weight") {
            let up = v.clone(); // the values do not matter: refused before use
            vec![(format!("{layer}.experts.gate_up_proj"), mlx_rs::ops::concatenate(&[v, &up], 1).unwrap())]
        } else if k.contains(".experts.gate_proj.") || k.contains(".experts.up_proj.") {
            vec![]
        } else {
            same(k, v)
        }
    };
    let dir = edited_copy(fused, |_| ());
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("model.layers.0.mlp.experts.gate_up_proj") && e.contains("mlx_lm.convert"), "{e}");
    // What mlx-lm's modules declare must be there: sinks, biases, lm_head.
    for (suffix, name) in [
        ("layers.1.self_attn.sinks", "model.layers.1.self_attn.sinks"),
        ("layers.2.self_attn.k_proj.bias", "model.layers.2.self_attn.k_proj.bias"),
        ("layers.3.mlp.experts.down_proj.bias", "model.layers.3.mlp.experts.down_proj.bias"),
        ("layers.0.mlp.router.bias", "model.layers.0.mlp.router.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ] {
        let dir = edited_copy(drop(suffix), |_| ());
        let e = load_err(dir.path(), &reg);
        assert!(e.contains(name), "dropping {suffix}: {e}");
    }
    // num_local_experts must be what the router and the experts hold.
    let dir = edited_copy(same, |c| {
        c["num_local_experts"] = 4.into();
        c["experts_per_token"] = 2.into();
    });
    let e = load_err(dir.path(), &reg);
    assert!(e.contains("num_local_experts is 4 but the router has 8 outputs and the experts 8"), "{e}");
}

/// The goldens see each of gpt-oss's features: gpt_oss-f32 with its sinks
/// silenced, its window widened past every prompt, its YaRN scaling dropped
/// or its experts' top-2 cut to top-1 no longer matches mlx-lm.
#[test]
fn gpt_oss_goldens_catch_a_wrong_model() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let same = |k: &str, v: &mlx_rs::Array| vec![(k.to_string(), v.clone())];
    let no_sinks = |k: &str, v: &mlx_rs::Array| {
        if k.ends_with(".sinks") {
            vec![(k.to_string(), mlx_rs::ops::full::<f32>(v.shape(), mlx_rs::Array::from_f32(-1e9)).unwrap())]
        } else {
            same(k, v)
        }
    };
    let trials: Vec<(&str, tempfile::TempDir)> = vec![
        ("no sinks", edited_copy(no_sinks, |_| ())),
        ("no window", edited_copy(same, |c| c["sliding_window"] = 1000.into())),
        ("no yarn", edited_copy(same, |c| c["rope_scaling"] = serde_json::Value::Null)),
        ("top-1", edited_copy(same, |c| {
            c["num_experts_per_tok"] = 1.into();
            c["experts_per_token"] = 1.into();
        })),
    ];
    let want = golden("gpt_oss-f32");
    for (what, dir) in trials {
        let mut model = LoadedModel::load_with(dir.path(), &reg, LoadPolicy::default()).unwrap();
        let mut tally = Tally::default();
        compare(&mut model, &want, &mut tally);
        eprintln!("{what}: worst relative error {:e}", tally.worst);
        assert!(tally.worst > 1e-2, "{what}: the golden does not notice (worst relative error {:e})", tally.worst);
    }
}

/// The sinks reach the other KV families' attention: `gpt_oss-f32` served
/// (six prompts batched, prefill in 8-token chunks) with float16 KV and with
/// float16 keys + float32 values (mixed sides: the composed path of
/// `author::kv`) gives the float32 lane's tokens; bf16 and fp8 + turbo4
/// (lossy) run and are reported. Without the sinks the tokens would part at
/// once (the goldens' no-sinks trial: relative error 0.97).
#[test]
fn gpt_oss_sinks_under_other_kv_families() {
    use rmlx::engine::kv_family::KvChoice;
    let _g = common::mlx_lock();
    let model = "gpt_oss-f32";
    let list = vec![(None, common::fixture(&format!("models/{model}")))];
    let cat = ModelCatalog::discover(&list, &[]).unwrap();
    let w = worker(&cat, false);
    let entry = cat.get(model).unwrap();
    let max_tokens = 20;
    let run = |kv: Option<KvChoice>| -> Vec<Vec<u32>> {
        let mut rxs: Vec<_> = prompts()
            .iter()
            .map(|p| {
                let (tx, rx) = mpsc::unbounded_channel();
                let params =
                    GenParams { max_tokens, ignore_eos: true, prefill_chunk: 8, kv: kv.clone(), ..GenParams::default() };
                w.submit(GenRequest {
                    model: entry.clone(),
                    prompt: p.clone(),
                    params,
                    hook: None,
                    cancel: Arc::new(AtomicBool::new(false)),
                    keep_alive: None,
                    events: tx,
                })
                .unwrap();
                rx
            })
            .collect();
        rxs.iter_mut().map(collect).collect()
    };
    let base = run(None);
    for (k, v, exact) in [("f16", "f16", true), ("f16", "f32", true), ("bf16", "bf16", false), ("fp8", "turbo4", false)] {
        let got = run(Some(KvChoice { k: Some(k.into()), v: Some(v.into()) }));
        let same: usize = got.iter().zip(&base).map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count()).sum();
        eprintln!("kv {k}/{v}: {same} of {} leading tokens equal the f32 lane", base.len() * max_tokens);
        assert!(got.iter().all(|t| t.len() == max_tokens), "kv {k}/{v}");
        if exact {
            assert_eq!(got, base, "kv {k}/{v} differs from the float32 lane");
        }
    }
}
