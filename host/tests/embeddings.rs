//! Embeddings through the engine (engine/embed.rs, arch-bert) against
//! references made by tests/goldens/embeddings_ref.py
//! (tests/fixtures/embeddings/tiny.json):
//! - a tiny random transformers `BertModel` with a tiny WordPiece tokenizer
//!   and sentence-transformers files (mean + Normalize, max_seq_length 24):
//!   the same token ids ([CLS] .. [SEP], truncated), the same hidden states,
//!   the same pooled embeddings in a padded batch;
//! - a tiny `RobertaForMaskedLM` (`roberta.` names, positions from
//!   pad_token_id + 1, no sentence-transformers files: mean, not normalised);
//! - the tiny qwen3 decoder with a modules.json (last-token pooling +
//!   Normalize) against mlx-lm's final normed hidden state.
mod common;

use mlx_rs::{ops::indexing::TryIndexOp, Array, Dtype};
use rmlx::engine::{
    catalog::ModelEntry,
    embed::{embed, EmbedTokenizer},
    encoder::encode,
    LoadedModel,
};
use rmlx::model::{pooling::Pooling, tokenizer::Tokenizer};
use serde_json::Value;
use std::path::Path;

fn golden() -> Value {
    let p = common::fixture("embeddings/tiny.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers: {v}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn values(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.as_slice::<f32>().to_vec()
}

fn entry(dir: &Path) -> ModelEntry {
    ModelEntry::open("m".into(), dir).unwrap()
}

#[test]
fn bert_tiny_matches_transformers_tokens_hidden_states_and_pooled_embeddings() {
    let _g = common::mlx_lock();
    let g = &golden()["bert"];
    let dir = common::fixture("models/bert-tiny-f32");
    let e = entry(&dir);
    let spec = e.embedding.clone().expect("an embedder");
    assert_eq!((spec.pooling, spec.normalize, spec.max_tokens), (Pooling::Mean, true, 24));
    // Tokens: [CLS] .. [SEP] from the post-processor, truncated to max_seq_length.
    let tok = EmbedTokenizer::new(&Tokenizer::from_model_dir(&dir).unwrap(), spec.max_tokens).unwrap();
    let texts: Vec<&str> = g["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let rows: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r, &ids(&g["ids"][i]), "text {i}: {:?}", texts[i]);
    }
    let reg = common::registry();
    let mut model = LoadedModel::load(&dir, &reg).unwrap();
    assert_eq!(model.architecture_plugin, "arch-bert");
    // The first text's last hidden states, alone.
    let h = encode(&mut model, &rows[..1], 0).unwrap(); // [1, L, D]
    let d = max_diff(&values(&h), &floats(&g["hidden0"]));
    assert!(d < 1e-4, "hidden states differ by {d}");
    // Pooled and normalised, all texts in one padded batch.
    let got = embed(&mut model, &spec, &rows, None).unwrap();
    let want = &g["embeddings"];
    for (i, v) in got.iter().enumerate() {
        let d = max_diff(v, &floats(&want[i]));
        assert!(d < 1e-5, "text {i}: embedding differs by {d}");
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "text {i}: norm {norm}");
    }
    // `dimensions`: the first n values, normalised again.
    let cut = embed(&mut model, &spec, &rows[..2], Some(8)).unwrap();
    for (i, v) in cut.iter().enumerate() {
        assert_eq!(v.len(), 8);
        let n: f32 = got[i][..8].iter().map(|x| x * x).sum::<f32>().sqrt();
        let want: Vec<f32> = got[i][..8].iter().map(|x| x / n).collect();
        assert!(max_diff(v, &want) < 1e-5);
    }
    // CLS pooling, not normalised, cut to 8 values: token 0's first 8 states
    // (a strided view read back row-major).
    let mut cls = spec.clone();
    cls.pooling = Pooling::Cls;
    cls.normalize = false;
    let v = embed(&mut model, &cls, &rows[..1], Some(8)).unwrap();
    assert!(max_diff(&v[0], &floats(&g["hidden0"])[..8]) < 1e-4);
}

#[test]
fn bert_refuses_logits_and_long_rows_and_bad_ids() {
    let _g = common::mlx_lock();
    let reg = common::registry();
    let dir = common::fixture("models/bert-tiny-f32");
    let mut model = LoadedModel::load(&dir, &reg).unwrap();
    let mut cache = rmlx::engine::cache::KvCache::new(model.spec.num_layers as usize);
    let e = model.logits(&Array::from_slice(&[2i32, 7, 3], &[1, 3]), &mut cache, true).unwrap_err();
    assert!(format!("{e:#}").contains("no LM head"), "{e:#}");
    // 33 tokens > 32 positions: a clear error, no panic.
    let e = encode(&mut model, &[vec![5u32; 33]], 0).unwrap_err();
    assert!(format!("{e:#}").contains("exceed this encoder's 32 positions"), "{e:#}");
    let spec = entry(&dir).embedding.unwrap();
    let e = embed(&mut model, &spec, &[vec![2, 9999, 3]], None).unwrap_err();
    assert!(format!("{e:#}").contains("token id 9999 is out of range"), "{e:#}");
}

#[test]
fn roberta_tiny_positions_prefix_and_default_mean_pooling() {
    let _g = common::mlx_lock();
    let g = golden();
    let dir = common::fixture("models/roberta-tiny-f32");
    let e = entry(&dir);
    let spec = e.embedding.clone().expect("a bare encoder embeds");
    // No sentence-transformers files: mean, not normalised; 20 positions - (pad 1 + 1).
    assert_eq!((spec.pooling, spec.normalize, spec.from_files, spec.max_tokens), (Pooling::Mean, false, false, 18));
    let reg = common::registry();
    let mut model = LoadedModel::load(&dir, &reg).unwrap();
    let cases = g["roberta"].as_array().unwrap();
    let rows: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let together = encode(&mut model, &rows, 1).unwrap(); // [3, 18, D]
    for (b, c) in cases.iter().enumerate() {
        let n = rows[b].len() as i32;
        let part = together.try_index((b as i32, 0..n)).unwrap();
        let d = max_diff(&values(&part), &floats(&c["hidden"]));
        assert!(d < 1e-4, "row {b}: hidden states differ by {d}");
    }
    let got = embed(&mut model, &spec, &rows, None).unwrap();
    for (b, c) in cases.iter().enumerate() {
        let d = max_diff(&got[b], &floats(&c["mean"]));
        assert!(d < 1e-4, "row {b}: mean differs by {d}");
    }
}

/// Copies the tiny qwen3 fixture and adds sentence-transformers files:
/// last-token pooling, then Normalize.
pub fn qwen3_embedder() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let src = common::fixture("models/qwen3-f32");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
        }
    }
    std::fs::write(
        d.path().join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    std::fs::create_dir(d.path().join("1_Pooling")).unwrap();
    std::fs::write(d.path().join("1_Pooling/config.json"), r#"{"pooling_mode_lasttoken": true}"#).unwrap();
    d
}

#[test]
fn qwen3_decoder_embedder_pools_the_last_token_as_mlx_lm() {
    let _g = common::mlx_lock();
    let g = golden();
    let d = qwen3_embedder();
    let spec = entry(d.path()).embedding.expect("modules.json makes it an embedder");
    assert_eq!((spec.pooling, spec.normalize), (Pooling::LastToken, true));
    // The same directory without modules.json is a generator.
    assert!(entry(&common::fixture("models/qwen3-f32")).embedding.is_none());
    let reg = common::registry();
    let mut model = LoadedModel::load(d.path(), &reg).unwrap();
    let cases = g["qwen3"].as_array().unwrap();
    let rows: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    // One padded, causal batch.
    let got = embed(&mut model, &spec, &rows, None).unwrap();
    for (b, c) in cases.iter().enumerate() {
        let d = max_diff(&got[b], &floats(&c["embedding"]));
        assert!(d < 1e-4, "row {b}: embedding differs by {d}");
    }
}
