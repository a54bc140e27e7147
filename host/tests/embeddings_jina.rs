//! jina-embeddings-v4's text path (issue 15) against its published
//! definition, on the tiny random model of tests/goldens/jina_v4_golden.py
//! (tests/fixtures/models/jina-v4-tiny: a Qwen2.5-VL checkpoint with
//! `task_names`, `matryoshka_dims` and per-task LoRA adapters in
//! `adapters/`; references in tests/fixtures/embeddings/jina_v4_tiny.json):
//! - through the engine: for each task and prompt name, five texts of
//!   different lengths in one padded batch, the same token ids (prefix
//!   included) and the same embeddings at full size and at Matryoshka 16
//!   (cosine >= 0.99999, max abs diff <= 2e-5); without a task, the base
//!   model differs;
//! - through POST /v1/embeddings: `task`, `prompt_name` (and Jina's
//!   `retrieval.passage` form), float and base64, `dimensions`, and the 400s
//!   (a task the model lacks, a prompt name, dimensions outside
//!   matryoshka_dims, `task` for a model without tasks).
//!
//! Images (the fixture has the tower and a preprocessor_config.json; the
//! references are transformers' Qwen2.5-VL with its own processor and
//! get_rope_index, pooled over vision_start..=vision_end):
//! - through the engine: for each task, both 24 x 16 images' document ids,
//!   grid and M-RoPE positions, and their embeddings at full size and at 16;
//! - through POST /v1/embeddings: `{"text"}` and `{"image": data URL}`
//!   items mixed in one request, each equal to its reference; a bad image
//!   is a 400 naming its item; an item with both or neither field, and
//!   images for a model without a tower, are 400s.
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::{
    catalog::ModelEntry,
    embed::{embed, EmbedTokenizer},
    embed_image::{doc_ids, embed_image_doc, DOC_AFTER, DOC_BEFORE},
    media::{encode_images_with_positions, PromptImage},
    mrope::MropeLayout,
    worker::{ModelCatalog, Worker, WorkerConfig},
    LoadedModel,
};
use rmlx::model::{pooling::Pooling, tokenizer::Tokenizer};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(common::fixture("embeddings/jina_v4_tiny.json")).unwrap()).unwrap())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// (cosine, max abs diff)
fn compare(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    (dot / (na * nb), a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max))
}

fn close(got: &[f32], want: &[f32], what: &str) {
    let (cos, max) = compare(got, want);
    assert!(cos >= 0.99999 && max <= 2e-5, "{what}: cosine {cos}, max abs diff {max}");
}

#[test]
fn every_task_and_prompt_matches_the_published_definition() {
    let _g = common::mlx_lock();
    let dir = common::fixture("models/jina-v4-tiny");
    let e = ModelEntry::open("jina".into(), &dir).unwrap();
    let spec = e.embedding.clone().expect("a multi-task embedder");
    let tasks = spec.tasks.clone().expect("tasks");
    assert_eq!((spec.pooling, spec.normalize), (Pooling::Mean, true));
    assert_eq!((tasks.names.clone(), tasks.dims.clone(), tasks.default), (vec!["retrieval".to_string(), "text-matching".into(), "code".into()], vec![8, 16, 32], 0));
    let tok = EmbedTokenizer::new(&Tokenizer::from_model_dir(&dir).unwrap(), spec.max_tokens).unwrap();
    let reg = common::registry();
    let mut model = LoadedModel::load(&dir, &reg).unwrap();
    let adapters = model.adapters.clone().expect("adapters loaded");
    assert_eq!(adapters.tasks, tasks.names);
    let g = golden();
    let texts: Vec<&str> = g["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let mut worst = (1.0f32, 0.0f32);
    for c in g["cases"].as_array().unwrap() {
        let (task, pn) = (c["task"].as_str().unwrap(), c["prompt_name"].as_str().unwrap());
        let t = tasks.task(task).unwrap();
        let prefix = tasks.prefix(t, pn).unwrap();
        let rows: Vec<Vec<u32>> = texts.iter().map(|s| tok.encode(&format!("{prefix}{s}")).unwrap()).collect();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r, &ids(&c["ids"][i]), "{task}/{pn} text {i}");
        }
        model.select_task(Some(t)).unwrap();
        let full = embed(&mut model, &spec, &rows, None).unwrap();
        let short = embed(&mut model, &spec, &rows, Some(16)).unwrap();
        model.select_task(None).unwrap();
        for i in 0..rows.len() {
            close(&full[i], &floats(&c["full"][i]), &format!("{task}/{pn} text {i}"));
            close(&short[i], &floats(&c["dims16"][i]), &format!("{task}/{pn} text {i} at 16"));
            for (got, want) in [(&full[i], &c["full"][i]), (&short[i], &c["dims16"][i])] {
                let (cos, max) = compare(got, &floats(want));
                worst = (worst.0.min(cos), worst.1.max(max));
            }
        }
    }
    eprintln!("jina-v4-tiny: lowest cosine {}, largest abs diff {}", worst.0, worst.1);
    // The adapters matter: the base model alone is far off.
    let c = &g["cases"][0];
    let rows: Vec<Vec<u32>> = (0..texts.len()).map(|i| ids(&c["ids"][i])).collect();
    let base = embed(&mut model, &spec, &rows, None).unwrap();
    assert!(compare(&base[0], &floats(&c["full"][0])).1 > 1e-2);
    // A model without adapters refuses a task.
    let bert = LoadedModel::load(&common::fixture("models/bert-tiny-f32"), &reg).unwrap();
    assert!(bert.select_task(Some(0)).is_err());
}

// ---- the API ----

fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let catalog = ModelCatalog::discover(
            &[(Some("jina".into()), common::fixture("models/jina-v4-tiny")), (Some("bert".into()), common::fixture("models/bert-tiny-f32"))],
            &[],
        )
        .unwrap();
        let worker = Worker::start(
            WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 8, max_loaded_models: 2, idle_timeout: None, prefill_chunk: 512 },
            &catalog,
        )
        .unwrap();
        common::serve(Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() }))
    })
}

async fn post(body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}/v1/embeddings", base())).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn unbase64(s: &str) -> Vec<f32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).expect("valid base64");
    bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn case(task: &str, pn: &str) -> &'static Value {
    golden()["cases"].as_array().unwrap().iter().find(|c| c["task"] == task && c["prompt_name"] == pn).unwrap()
}

async fn refused(body: Value, param: &str, says: &str) {
    let (s, v) = post(body.clone()).await;
    assert_eq!(s, 400, "{body} -> {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"], param, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(says), "{body}: {v}");
}

#[tokio::test]
async fn the_api_serves_tasks_prompts_dimensions_and_refuses_by_name() {
    let texts = golden()["texts"].clone();
    // Defaults: task retrieval, prompt query, full size; float.
    let (s, v) = post(json!({"model": "jina", "input": texts})).await;
    assert_eq!(s, 200, "{v}");
    let c = case("retrieval", "query");
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        close(&floats(&d["embedding"]), &floats(&c["full"][i]), &format!("default, input {i}"));
    }
    let n: usize = (0..5).map(|i| c["ids"][i].as_array().unwrap().len()).sum();
    assert_eq!(v["usage"]["prompt_tokens"], n, "the prefix's tokens count");
    // code / passage at 16 dimensions, base64.
    let (s, v) = post(json!({"model": "jina", "input": [texts[1], texts[2]], "task": "code", "prompt_name": "passage", "dimensions": 16, "encoding_format": "base64"})).await;
    assert_eq!(s, 200, "{v}");
    let c = case("code", "passage");
    for (k, i) in [1, 2].into_iter().enumerate() {
        let got = unbase64(v["data"][k]["embedding"].as_str().unwrap());
        assert_eq!(got.len(), 16);
        close(&got, &floats(&c["dims16"][i]), &format!("code/passage input {i}"));
    }
    // Jina's API form `retrieval.passage`; text-matching embeds passages as queries.
    let (s, v) = post(json!({"model": "jina", "input": texts[0], "task": "retrieval.passage"})).await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["data"][0]["embedding"]), &floats(&case("retrieval", "passage")["full"][0]), "retrieval.passage");
    let (s, v) = post(json!({"model": "jina", "input": texts[3], "task": "text-matching", "prompt_name": "passage"})).await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["data"][0]["embedding"]), &floats(&case("text-matching", "query")["full"][3]), "text-matching passage");
    // Token ids are used as given (no prefix).
    let (s, v) = post(json!({"model": "jina", "input": [case("code", "query")["ids"][4]], "task": "code"})).await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["data"][0]["embedding"]), &floats(&case("code", "query")["full"][4]), "token ids");
    // Refused by name.
    refused(json!({"model": "jina", "input": "x", "task": "summarize"}), "task", "must be one of").await;
    refused(json!({"model": "jina", "input": "x", "prompt_name": "document"}), "prompt_name", "must be one of").await;
    refused(json!({"model": "jina", "input": "x", "task": "retrieval.query", "prompt_name": "passage"}), "prompt_name", "contradicts").await;
    refused(json!({"model": "jina", "input": "x", "dimensions": 12}), "dimensions", "[8, 16, 32]").await;
    refused(json!({"model": "bert", "input": "x", "task": "retrieval"}), "task", "no task adapters").await;
    refused(json!({"model": "bert", "input": "x", "prompt_name": "query"}), "prompt_name", "no task adapters").await;
}

// ---- images ----

fn image_cases() -> &'static [Value] {
    golden()["images"].as_array().unwrap()
}

fn image_case(task: &str, image: &str) -> &'static Value {
    image_cases().iter().find(|c| c["task"] == task && c["image"] == image).unwrap()
}

#[test]
fn image_documents_match_the_published_definition() {
    use rmlx::media::{decode_image, vision::VisionSpec, MediaHash, MediaOptions};
    let _g = common::mlx_lock();
    let dir = common::fixture("models/jina-v4-tiny");
    let e = ModelEntry::open("jina".into(), &dir).unwrap();
    let spec = e.embedding.clone().unwrap();
    let tasks = spec.tasks.clone().unwrap();
    assert_eq!(tasks.vision, Some((250, 251)));
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let vision = VisionSpec::from_model_dir(&dir, Some(&tokenizer)).unwrap().expect("the fixture takes images");
    let tok = EmbedTokenizer::new(&tokenizer, spec.max_tokens).unwrap();
    let (before, after) = (tok.encode(DOC_BEFORE).unwrap(), tok.encode(DOC_AFTER).unwrap());
    let reg = common::registry();
    let mut model = LoadedModel::load(&dir, &reg).unwrap();
    // Every vision-tower tensor is used (the multi-vector projector is not: single vectors only).
    assert!(model.unused.iter().all(|t| t.starts_with("multi_vector_projector.")), "unused tensors {:?}", model.unused);
    let mut worst = (1.0f32, 0.0f32);
    for c in image_cases() {
        let (task, name) = (c["task"].as_str().unwrap(), c["image"].as_str().unwrap());
        let bytes = std::fs::read(common::fixture("images").join(name)).unwrap();
        let img = decode_image(name, &bytes, &MediaOptions::default()).unwrap();
        let pixels = vision.processor.preprocess(name, &img).unwrap();
        let count = vision.tokens_for(&pixels).unwrap();
        let grid: Vec<usize> = c["grid"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(count, grid.iter().product::<usize>() / 4, "{name}: placeholders");
        let (doc, span) = doc_ids(&before, &after, tasks.vision.unwrap(), vision.image_token, count);
        assert_eq!(doc, ids(&c["ids"]), "{task}/{name}: document ids");
        let image = PromptImage::new(pixels, MediaHash::of_rgb(&img), span.clone());
        // The positions the engine lays out are get_rope_index's.
        let (_, rels) = encode_images_with_positions(&mut model, &[&image]).unwrap();
        let layout = MropeLayout::build(doc.len(), &[span], &rels.expect("MEDIA_POSITIONS")).unwrap();
        for a in 0..3 {
            let want: Vec<i32> = c["positions"][a].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
            let got: Vec<i32> = layout.pos.iter().map(|p| p[a]).collect();
            assert_eq!(got, want, "{task}/{name}: positions of axis {a}");
        }
        model.select_task(tasks.task(task)).unwrap();
        let full = embed_image_doc(&mut model, &spec, &doc, &image, None).unwrap();
        let short = embed_image_doc(&mut model, &spec, &doc, &image, Some(16)).unwrap();
        model.select_task(None).unwrap();
        close(&full, &floats(&c["full"]), &format!("{task}/{name}"));
        close(&short, &floats(&c["dims16"]), &format!("{task}/{name} at 16"));
        for (got, want) in [(&full, &c["full"]), (&short, &c["dims16"])] {
            let (cos, max) = compare(got, &floats(want));
            worst = (worst.0.min(cos), worst.1.max(max));
        }
    }
    eprintln!("jina-v4-tiny images: lowest cosine {}, largest abs diff {}", worst.0, worst.1);
}

fn data_url(name: &str) -> String {
    use base64::Engine;
    let bytes = std::fs::read(common::fixture("images").join(name)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[tokio::test]
async fn the_api_embeds_text_and_image_items_together() {
    let texts = golden()["texts"].clone();
    let (a, b) = (data_url("qwa24x16.png"), data_url("qwb24x16.png"));
    let input = json!([{"text": texts[0]}, {"image": a}, {"text": texts[2]}, {"image": b}]);
    for (task, dims) in [("retrieval", None), ("code", Some(16))] {
        let mut body = json!({"model": "jina", "input": input, "task": task, "prompt_name": "passage"});
        if let Some(d) = dims {
            body["dimensions"] = json!(d);
        }
        let (s, v) = post(body).await;
        assert_eq!(s, 200, "{v}");
        let key = if dims.is_some() { "dims16" } else { "full" };
        let d = v["data"].as_array().unwrap();
        assert_eq!(d.len(), 4);
        let c = case(task, "passage");
        close(&floats(&d[0]["embedding"]), &floats(&c[key][0]), &format!("{task}: text 0"));
        close(&floats(&d[2]["embedding"]), &floats(&c[key][2]), &format!("{task}: text 2"));
        // Images get no prefix: the same under any prompt name.
        close(&floats(&d[1]["embedding"]), &floats(&image_case(task, "qwa24x16.png")[key]), &format!("{task}: image a"));
        close(&floats(&d[3]["embedding"]), &floats(&image_case(task, "qwb24x16.png")[key]), &format!("{task}: image b"));
        assert_eq!(d[3]["index"], 3);
    }
    // Refused by name.
    refused(json!({"model": "jina", "input": [{"text": "x"}, {"image": "data:image/png;base64,AAAA"}]}), "input[1]", "input[1]").await;
    refused(json!({"model": "jina", "input": [{"text": "x", "image": a}]}), "input[0]", "exactly one").await;
    refused(json!({"model": "jina", "input": [{}]}), "input[0]", "exactly one").await;
    refused(json!({"model": "jina", "input": [{"image": "file:///etc/passwd"}]}), "input[0]", "file://").await;
    refused(json!({"model": "bert", "input": [{"image": a}]}), "input", "takes no images").await;
}
