//! model_type `gemma4_text` (plugins/arch-gemma/src/gemma4_text.rs): the tiny
//! models tests/goldens/gemma4_goldens.py built with mlx-lm's own classes
//! (sliding and full layers with different head sizes, k_eq_v, proportional
//! partial RoPE, KV sharing, per-layer inputs, experts, logit soft-cap),
//! against the logits and greedy tokens mlx-lm recorded, in float32, affine
//! q4 and mxfp4 experts; the layer caches it declares; the paged pool and
//! the server serving the shared-KV model (one and three streams, the prefix
//! cache) and the uniform one batched as one at a time; configs refused by name.
mod common;

use common::golden::{compare, Golden, Tally};
use rmlx::engine::scheduler::SchedulerConfig;
use rmlx::engine::worker::{
    FinishReason, GenEvent, GenParams, GenRequest, ModelCatalog, ModelEntry, Worker, WorkerConfig, WorkerError,
};
use rmlx::engine::LoadedModel;
use rmlx::model::policy::LoadPolicy;
use rmlx_plugin_api::cache_kind;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(common::fixture(&format!("goldens/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(path: &std::path::Path, reg: &rmlx::plugins::Registry) -> LoadedModel {
    LoadedModel::load_with(path, reg, LoadPolicy::default()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// (mode, bits, group size) of a module as loaded.
fn format(model: &LoadedModel, path: &str) -> (String, i32, i32) {
    let q = model.layers.get(path).unwrap_or_else(|| panic!("no layer {path}"));
    (q.mode.clone(), q.bits, q.group_size)
}

/// Prefill then 8 decode steps (teacher-forced on mlx-lm's tokens) of the
/// four prompts (1, 7, 23 and 40 tokens) within REL_TOL of mlx-lm's logits,
/// the greedy token equal wherever mlx-lm's margin allows; each layer built
/// in the format mlx-lm quantized it to.
#[test]
fn gemma4_text_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    // (name, layers, experts, router, attention, per-layer embedding)
    let none = ("none", 0, 0);
    let cases = [
        ("gemma4_text-f32", 6, Some(none), Some(none), none, Some(none)),
        ("gemma4_text-q4-g64", 6, Some(("affine", 4, 64)), Some(("affine", 8, 64)), ("affine", 4, 64), Some(("affine", 4, 64))),
        ("gemma4_text-mxfp4-q8", 6, Some(("mxfp4", 4, 32)), Some(("affine", 8, 64)), ("affine", 8, 64), Some(("affine", 8, 64))),
        ("gemma4_text-dense-f32", 4, None, None, none, None),
    ];
    for (name, layers, experts, router, attn, ple) in cases {
        let mut model = load(&common::fixture(&format!("models/{name}")), &reg);
        assert!(model.unused.is_empty(), "{name}: unused tensors {:?}", model.unused);
        assert_eq!(model.architecture_plugin, "arch-gemma");
        let mut tally = Tally::default();
        compare(&mut model, &golden(name), &mut tally);
        eprintln!("{name}: {} steps, worst relative error {:e}", tally.compared, tally.worst);
        assert!(tally.failures.is_empty(), "{name}:\n{}", tally.failures.join("\n"));
        let expect = |path: &str, want: (&str, i32, i32)| {
            let got = format(&model, path);
            assert_eq!(got.0, want.0, "{name} {path}");
            if want.0 != "none" {
                assert_eq!((got.1, got.2), (want.1, want.2), "{name} {path}");
            }
        };
        for i in 0..layers {
            expect(&format!("model.layers.{i}.self_attn.q_proj"), attn);
            if let (Some(e), Some(r)) = (experts, router) {
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    expect(&format!("model.layers.{i}.experts.switch_glu.{p}"), e);
                }
                expect(&format!("model.layers.{i}.router.proj"), r);
            }
        }
        if let Some(p) = ple {
            expect("model.embed_tokens_per_layer", p);
        }
    }
}

/// bfloat16 as `mlx_lm.convert --dtype bfloat16` writes it (gemma4_text's
/// config without experts: MLX's CPU gather_mm is float32 only), against
/// mlx-lm's bfloat16 run, as loaded by default and under the process's load
/// policy (what goldens.rs uses).
#[test]
fn gemma4_text_bf16_matches_mlx_lm() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let name = "gemma4_text-nomoe-bf16";
    let path = common::fixture(&format!("models/{name}"));
    for (how, mut model) in [("default", load(&path, &reg)), ("process policy", LoadedModel::load(&path, &reg).unwrap())] {
        let mut tally = Tally::default();
        compare(&mut model, &golden(name), &mut tally);
        eprintln!("{name} ({how}): {} steps, worst relative error {:e}", tally.compared, tally.worst);
        assert!(tally.failures.is_empty(), "{name} ({how}):\n{}", tally.failures.join("\n"));
    }
}

/// The layer caches gemma4_text-f32 declares: sliding layers windowed with 2
/// K/V heads of 16, full layers 1 head of 32 (k_eq_v), the last two SHARED
/// with the last earlier layer of their type; the dense model declares
/// uniform layers.
#[test]
fn gemma4_text_declares_its_layer_caches() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let m = load(&common::fixture("models/gemma4_text-f32"), &reg);
    let got: Vec<_> = m.cache_layers.iter().map(|l| (l.kind, l.window, l.kv_heads, l.head_dim, l.shared_with)).collect();
    let (w, f, s) = (cache_kind::WINDOW, cache_kind::FULL, cache_kind::SHARED);
    assert_eq!(got, [(w, 8, 2, 16, 0), (w, 8, 2, 16, 1), (f, 0, 1, 32, 2), (w, 8, 2, 16, 3), (s, 8, 2, 16, 3), (s, 0, 1, 32, 2)]);
    assert_eq!(m.spec.sliding_window.to_vec(), [8, 8, 0, 8, 8, 0]);
    let d = load(&common::fixture("models/gemma4_text-dense-f32"), &reg);
    assert_eq!(d.paged_refusal(), None);
    assert!(d.cache_layers.iter().all(|l| l.kind != s && l.head_dim == 16 && l.kv_heads == 2));
}

/// `rmlx generate` (the one-sequence cache, free-running greedy) continues
/// each prompt with mlx-lm's tokens where its margins are clear.
#[test]
fn gemma4_text_generate_continues_like_mlx_lm() {
    let _g = common::mlx_lock();
    for name in ["gemma4_text-f32", "gemma4_text-q4-g64", "gemma4_text-mxfp4-q8"] {
        let g = golden(name);
        for case in &g.prompts {
            // Greedy ties below the margin may part from mlx-lm: compare up to the first.
            let n = case.margins.iter().take_while(|&&m| m > common::golden::MARGIN).count();
            let got = common::greedy_reference(name, &case.prompt, case.tokens.len());
            assert_eq!(got[..n], case.tokens[..n], "{name} prompt {:?}", case.prompt);
        }
    }
}

/// Each feature moves the result: gemma4_text-f32 with its soft-cap
/// dropped, its window widened past every prompt, or plain RoPE on its full
/// layers no longer matches mlx-lm's golden.
#[test]
fn gemma4_text_goldens_catch_a_wrong_model() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let src = common::fixture("models/gemma4_text-f32");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let want = golden("gemma4_text-f32");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let trials: Vec<(&str, Edit)> = vec![
        ("no soft-cap", Box::new(|c| c["final_logit_softcapping"] = serde_json::Value::Null)),
        ("no window", Box::new(|c| c["sliding_window"] = 1000.into())),
        ("full RoPE", Box::new(|c| c["rope_parameters"]["full_attention"]["rope_type"] = "default".into())),
    ];
    for (what, edit) in trials {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let mut model = load(dir.path(), &reg);
        let mut tally = Tally::default();
        compare(&mut model, &want, &mut tally);
        eprintln!("{what}: worst relative error {:e}", tally.worst);
        assert!(tally.worst > 1e-2, "{what}: the golden does not notice (worst relative error {:e})", tally.worst);
    }
}

#[test]
fn gemma4_text_configs_are_refused_by_name() {
    let reg = common::registry();
    let path = common::fixture("models/gemma4_text-f32/config.json");
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(reg.check_config("gemma4_text", &base.to_string()).is_ok());
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c["layer_types"][1] = "chunked_attention".into()), "layer_types[1] `chunked_attention`"),
        (Box::new(|c| c["num_kv_shared_layers"] = 5.into()), "no earlier layer of its type"),
        (Box::new(|c| c["top_k_experts"] = serde_json::Value::Null), "top_k_experts"),
        (Box::new(|c| c["rope_parameters"]["sliding_attention"]["rope_type"] = "mrope_x".into()), "mrope_x"),
        (Box::new(|c| c["num_global_key_value_heads"] = 3.into()), "num_key_value_heads 3"),
    ];
    for (edit, want) in cases {
        let mut c = base.clone();
        edit(&mut c);
        let e = format!("{:#}", reg.check_config("gemma4_text", &c.to_string()).expect_err(want));
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

// ---- serving ----

fn worker(catalog: &ModelCatalog) -> Worker {
    Worker::start_with(
        WorkerConfig {
            plugins_dir: common::plugins_dir(),
            max_queue_depth: 64,
            max_loaded_models: 2,
            idle_timeout: None,
            prefill_chunk: 512,
        },
        SchedulerConfig::default(),
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

fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> Result<Vec<u32>, WorkerError> {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(f) => {
                assert_eq!(f.reason, FinishReason::Length);
                return Ok(ids);
            }
            GenEvent::Error(e) => return Err(e),
            _ => {}
        }
    }
}

/// Greedy tokens of `prompt` through the paged one-sequence pool
/// (`SeqPool`: the server's per-layer layout, SHARED layers reading their
/// source's blocks, one row), feeding the argmax back.
fn greedy_paged(model: &mut LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    use mlx_rs::{ops::indexing::argmax_axis, Array};
    let mut pool = rmlx::engine::seq_pool::SeqPool::new(model);
    let mut input = Array::from_slice(&prompt.iter().map(|&t| t as i32).collect::<Vec<_>>(), &[1, prompt.len() as i32]);
    let mut out = Vec::new();
    while out.len() < n {
        let logits = pool.forward(model, input, true).unwrap(); // [1, 1, V]
        let t = argmax_axis(logits.reshape(&[-1]).unwrap(), 0, None).unwrap().item_exact::<u32>();
        out.push(t);
        input = Array::from_slice(&[t as i32], &[1, 1]);
    }
    out
}

/// The paged pool holds gemma4_text-f32's layers as declared: sliding
/// layers 2 K/V heads of 16, the full layer 1 head of 32, the SHARED layers
/// nothing (their attention reads layers 3 and 2): greedy through it equals
/// the one-sequence cache, and mlx-lm's tokens where their margins are clear.
#[test]
fn gemma4_text_paged_pool_equals_the_one_sequence_cache() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let name = "gemma4_text-f32";
    let mut m = load(&common::fixture(&format!("models/{name}")), &reg);
    assert_eq!(m.paged_refusal(), None);
    assert!(!m.uniform_layers(), "shared layers and two head sizes");
    let g = golden(name);
    for case in &g.prompts {
        let got = greedy_paged(&mut m, &case.prompt, case.tokens.len());
        assert_eq!(got, common::greedy_reference(name, &case.prompt, case.tokens.len()), "prompt {:?}", case.prompt);
        let n = case.margins.iter().take_while(|&&x| x > common::golden::MARGIN).count();
        assert_eq!(got[..n], case.tokens[..n], "mlx-lm, prompt {:?}", case.prompt);
    }
}

/// `rmlx serve` serves gemma4_text-f32 (SHARED layers, per-layer head
/// sizes, sliding windows): mlx-lm's prompts one at a time equal `rmlx
/// generate` and mlx-lm's tokens; three streams at once (prefill in 8-token
/// chunks, the window's size) equal one at a time; a repeated prompt and a
/// next turn hit the prefix cache and answer the same. A block holds the
/// four storing layers only (the shared two allocate nothing). The uniform
/// gemma4_text-dense-f32 still batches six prompts as one at a time.
#[test]
fn gemma4_text_server_serves_shared_kv_batched_and_cached() {
    let _g = common::mlx_lock();
    let names = ["gemma4_text-f32", "gemma4_text-dense-f32"];
    let list: Vec<_> = names.iter().map(|m| (None, common::fixture(&format!("models/{m}")))).collect();
    let cat = ModelCatalog::discover(&list, &[]).unwrap();
    let w = worker(&cat);
    let (model, entry) = (names[0], cat.get(names[0]).unwrap());
    let g = golden(model);
    let solo: Vec<Vec<u32>> = g.prompts.iter().map(|c| collect(&mut submit(&w, &entry, &c.prompt, c.tokens.len(), 512)).unwrap()).collect();
    for (c, got) in g.prompts.iter().zip(&solo) {
        assert_eq!(*got, common::greedy_reference(model, &c.prompt, c.tokens.len()), "{model} prompt {:?}: server vs rmlx generate", c.prompt);
        let n = c.margins.iter().take_while(|&&x| x > common::golden::MARGIN).count();
        assert_eq!(got[..n], c.tokens[..n], "{model} prompt {:?}: server vs mlx-lm", c.prompt);
    }
    let stats = |w: &Worker| w.stats().blocks.iter().find(|(id, _)| id == model).map(|(_, s)| s.clone()).unwrap();
    let s = stats(&w);
    // Per token: 3 sliding layers x (k, v) x 2 x 16 + 1 full layer x (k, v) x 1 x 32, float32.
    assert_eq!(s.block_bytes, (3 * 2 * 2 * 16 + 2 * 32) * 4 * s.block_size as u64, "{s:?}");
    // Three streams at once, longer than the window, prefilled in chunks.
    let three: Vec<Vec<u32>> = (0..3).map(|k| (0..[30usize, 45, 19][k]).map(|i| ((i * 11 + k * 37 + 5) % 250 + 3) as u32).collect()).collect();
    let one: Vec<Vec<u32>> = three.iter().map(|p| collect(&mut submit(&w, &entry, p, 12, 512)).unwrap()).collect();
    let mut rxs: Vec<_> = three.iter().map(|p| submit(&w, &entry, p, 12, 8)).collect();
    let together: Vec<Vec<u32>> = rxs.iter_mut().map(|r| collect(r).unwrap()).collect();
    for (i, p) in three.iter().enumerate() {
        assert_eq!(one[i], common::greedy_reference(model, p, 12), "{model} stream {i}: server vs rmlx generate");
        assert_eq!(together[i], one[i], "{model} stream {i}: three at once vs one at a time");
    }
    assert!(w.stats().max_batch >= 3, "streams did not decode together: {:?}", w.stats());
    // The 45-token prompt again: its full blocks come from the prefix cache.
    let before = stats(&w);
    let again = collect(&mut submit(&w, &entry, &three[1], 12, 512)).unwrap();
    let after = stats(&w);
    assert!(after.prefix_hit_tokens >= before.prefix_hit_tokens + 32, "no prefix-cache hit: {after:?}");
    assert_eq!(again, one[1], "a prefix-cache hit answers differently");
    // A next turn: prompt + reply + more, cached through the reply.
    let mut turn = three[1].clone();
    turn.extend(&again);
    turn.extend([9, 10, 11]);
    let hit0 = after.prefix_hit_tokens;
    let next = collect(&mut submit(&w, &entry, &turn, 8, 512)).unwrap();
    assert!(stats(&w).prefix_hit_tokens >= hit0 + 48, "{:?}", stats(&w));
    assert_eq!(next, common::greedy_reference(model, &turn, 8), "{model}: next turn over cached blocks");

    let model = names[1];
    let entry = cat.get(model).unwrap();
    let max_tokens = 12;
    let prompts: Vec<Vec<u32>> = [1usize, 5, 17, 40, 3, 30]
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| ((i * 7 + k * 31 + 3) % 250 + 3) as u32).collect())
        .collect();
    let solo: Vec<Vec<u32>> = prompts.iter().map(|p| collect(&mut submit(&w, &entry, p, max_tokens, 512)).unwrap()).collect();
    let mut rxs: Vec<_> = prompts.iter().map(|p| submit(&w, &entry, p, max_tokens, 8)).collect();
    let batched: Vec<Vec<u32>> = rxs.iter_mut().map(|r| collect(r).unwrap()).collect();
    for (i, p) in prompts.iter().enumerate() {
        let want = common::greedy_reference(model, p, max_tokens);
        assert_eq!(solo[i], want, "{model} prompt {i}: server one-at-a-time differs from rmlx generate");
        assert_eq!(batched[i], want, "{model} prompt {i}: batched differs from one at a time");
    }
    assert!(w.stats().max_batch >= 4, "requests did not decode together: {:?}", w.stats());
}

/// A KV family other than the dense default runs `rmlx generate` through
/// the paged one-sequence pool, which now holds the shared-KV layers: f16
/// keys and values continue mlx-lm's prompts with its tokens where the
/// margins are wide.
#[test]
fn gemma4_text_generate_runs_other_kv_families_through_the_pool() {
    use rmlx::engine::kv_family::{self, KvChoice};
    let _g = common::mlx_lock();
    let reg = common::registry();
    let name = "gemma4_text-f32";
    let mut m = load(&common::fixture(&format!("models/{name}")), &reg);
    let choice = KvChoice { k: Some("f16".into()), v: Some("f16".into()) };
    m.kv = kv_family::resolve(&reg, &m.spec, m.kv.0.dims.dtype, &choice, None).unwrap();
    assert_eq!(m.paged_refusal(), None);
    let g = golden(name);
    for case in &g.prompts {
        let opts = rmlx::engine::GenerateOptions {
            max_tokens: case.tokens.len(),
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop_ids: vec![],
            prefill_chunk: 512,
        };
        let got = rmlx::engine::generate::generate(&mut m, &case.prompt, &opts, |_| {}).unwrap().tokens;
        let n = case.margins.iter().take_while(|&&x| x > 0.03).count();
        assert_eq!(got[..n], case.tokens[..n], "f16 KV, prompt {:?}", case.prompt);
    }
}

/// The SSD tier round-trips gemma4_text-f32's blocks (four storing layers
/// of two shapes, the shared layers none): with memory for 9 blocks of 8
/// tokens, prompt B evicts prompt A's cached blocks to disk; A again reads
/// them back and answers as `rmlx generate` does.
#[test]
fn gemma4_text_blocks_round_trip_through_the_ssd_tier() {
    use rmlx::engine::scheduler::KvBudget;
    use rmlx::engine::ssd::SsdConfig;
    let _g = common::mlx_lock();
    let model = "gemma4_text-f32";
    let cat = ModelCatalog::discover(&[(None, common::fixture(&format!("models/{model}")))], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let block_bytes = (3 * 2 * 2 * 16 + 2 * 32) * 4 * 8;
    let sched = SchedulerConfig {
        kv_budget: KvBudget::Bytes(block_bytes * 9),
        block_size: 8,
        ssd: Some(SsdConfig { dir: dir.path().to_path_buf(), max_bytes: 1 << 24 }),
        ..SchedulerConfig::default()
    };
    let cfg = WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 8, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 };
    let w = Worker::start_with(cfg, sched, &cat).unwrap();
    let entry = cat.get(model).unwrap();
    let p = |seed: usize| -> Vec<u32> { (0..50).map(|i| ((i * 13 + seed * 37) % 240 + 5) as u32).collect() };
    let (a, b) = (p(1), p(2));
    let out_a = collect(&mut submit(&w, &entry, &a, 8, 512)).unwrap();
    let out_b = collect(&mut submit(&w, &entry, &b, 8, 512)).unwrap();
    let again = collect(&mut submit(&w, &entry, &a, 8, 512)).unwrap();
    let s = w.stats().blocks.iter().find(|(id, _)| id == model).map(|(_, s)| s.clone()).unwrap();
    assert_eq!(s.block_bytes, block_bytes, "{s:?}");
    assert!(s.ssd_writes > 0 && s.ssd_reads > 0, "no SSD round trip: {s:?}");
    assert_eq!(s.ssd_corrupt, 0, "{s:?}");
    let want_a = common::greedy_reference(model, &a, 8);
    assert_eq!(out_a, want_a);
    assert_eq!(out_b, common::greedy_reference(model, &b, 8));
    assert_eq!(again, want_a, "blocks read back from the SSD tier answer differently");
}
