//! Embeddings: inputs -> token ids (the model's tokenizer.json, its
//! post-processor's special tokens such as [CLS] ... [SEP], truncated to the
//! model's limit) -> one cacheless forward per batch (`encoder::encode`:
//! bidirectional for encoders, causal for decoder embedders, as the
//! architecture asks) -> pooled and optionally normalised vectors, as the
//! model's sentence-transformers files say (model/pooling.rs).
//!
//! Batching: rows are sorted by length (longest first) and cut into batches
//! of at most [`BATCH`] rows and [`BATCH_TOKENS`] padded tokens, none shorter
//! than half its batch's longest row, so that rows of like lengths share a
//! batch and padding at most doubles the work; the vectors come back in the
//! inputs' order.
//!
//! Across requests: the engine thread gathers the embedding jobs that wait
//! when it is free (and those that arrive a few ms after it wakes from idle)
//! and runs those of one model and `dims` as one [`embed`] call, so the rows
//! of concurrent requests share padded batches (engine/worker/embeds.rs).
//!
//! Truncation: text is truncated to the token limit (`EmbedSpec::max_tokens`:
//! sentence_bert_config.json's `max_seq_length` when given, capped by the
//! model's positions) keeping the special tokens, as sentence-transformers
//! does; token-id inputs are used as given and refused when longer.
use super::{encoder::encode, LoadedModel};
use crate::model::{
    pooling::{EmbedSpec, Pooling},
    tokenizer::Tokenizer,
};
use anyhow::{anyhow, bail, Result};
use mlx_rs::{
    ops::{indexing::TryIndexOp, maximum, select},
    transforms::eval,
    Array, Dtype,
};
use tokenizers::{PaddingParams, TruncationDirection, TruncationParams, TruncationStrategy};

/// Rows per forward.
pub const BATCH: usize = 32;
/// Padded tokens per forward (rows x longest row).
pub const BATCH_TOKENS: usize = 16384;

/// The model's tokenizer set up for embeddings: special tokens added by
/// its post-processor, truncated to `limit` tokens, never padded
/// (tokenizer.json's own truncation and padding are replaced).
pub struct EmbedTokenizer {
    inner: tokenizers::Tokenizer,
}

impl EmbedTokenizer {
    pub fn new(tok: &Tokenizer, limit: usize) -> Result<Self> {
        let mut inner = tok.inner().clone();
        inner.with_padding(None::<PaddingParams>);
        let t = TruncationParams {
            max_length: limit,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        };
        inner.with_truncation(Some(t)).map_err(|e| anyhow!("tokenizer truncation: {e}"))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, special tokens included, at most the limit.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, true).map_err(|e| anyhow!("encode: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// Why `rows` cannot be embedded by a model of vocabulary `vocab` taking at
/// most `limit` tokens a row (None: they can). Checked per request before
/// requests share a forward, so that one bad input fails only its request.
pub fn check_rows(rows: &[Vec<u32>], vocab: u32, limit: usize) -> Option<String> {
    if rows.is_empty() {
        return Some("`input` is empty".into());
    }
    for (i, r) in rows.iter().enumerate() {
        if r.is_empty() {
            return Some(format!("input {i} has no tokens"));
        }
        if r.len() > limit {
            return Some(format!("input {i} holds {} tokens; this model takes at most {limit}", r.len()));
        }
        if let Some(bad) = r.iter().find(|&&t| t >= vocab) {
            return Some(format!("input {i}: token id {bad} is out of range for a vocabulary of {vocab}"));
        }
    }
    None
}

/// One embedding per row of token ids, in the rows' order: `dims` keeps the
/// first `dims` values (then normalises when the model does).
pub fn embed(model: &mut LoadedModel, spec: &EmbedSpec, rows: &[Vec<u32>], dims: Option<usize>) -> Result<Vec<Vec<f32>>> {
    embed_observed(model, spec, rows, dims, &mut |_| {})
}

/// [`embed`], calling `on_forward(rows)` with each forward's row count.
pub fn embed_observed(
    model: &mut LoadedModel,
    spec: &EmbedSpec,
    rows: &[Vec<u32>],
    dims: Option<usize>,
    on_forward: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let vocab = model.spec.vocab_size;
    for (i, r) in rows.iter().enumerate() {
        if r.is_empty() {
            bail!("input {i} has no tokens");
        }
        if let Some(bad) = r.iter().find(|&&t| t >= vocab) {
            bail!("input {i}: token id {bad} is out of range for a vocabulary of {vocab}");
        }
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); rows.len()];
    let mut start = 0;
    while start < order.len() {
        // Longest first: the first row of a batch sets its padded length.
        let longest = rows[order[start]].len();
        let fit = (BATCH_TOKENS / longest.max(1)).clamp(1, BATCH);
        let mut end = (start + fit).min(order.len());
        // Rows under half the first's length start the next batch, so that
        // padding at most doubles a batch's work.
        end = start + 1 + order[start + 1..end].iter().take_while(|&&i| rows[i].len() * 2 >= longest).count();
        let batch: Vec<Vec<u32>> = order[start..end].iter().map(|&i| rows[i].clone()).collect();
        let vecs = embed_batch(model, spec, &batch, dims)?;
        on_forward(batch.len());
        for (k, v) in vecs.into_iter().enumerate() {
            out[order[start + k]] = v;
        }
        start = end;
    }
    Ok(out)
}

/// One forward over `rows` (padded at the end), pooled: B vectors.
fn embed_batch(model: &mut LoadedModel, spec: &EmbedSpec, rows: &[Vec<u32>], dims: Option<usize>) -> Result<Vec<Vec<f32>>> {
    let h = encode(model, rows, 0)?.as_dtype(Dtype::Float32)?; // [B, L, D]
    let lengths: Vec<i32> = rows.iter().map(|r| r.len() as i32).collect();
    let mut v = pool(&h, &lengths, spec.pooling)?; // [B, D]
    let d = v.dim(1) as usize;
    if let Some(n) = dims.filter(|&n| n < d) {
        v = v.try_index((.., 0..n as i32))?; // [B, n]
    }
    if spec.normalize {
        v = l2_normalize(&v)?;
    }
    // A slice (cls pooling, `dims`) is a strided view: copy it row-major.
    let v = v.contiguous()?;
    eval([&v])?;
    let (b, d) = (v.dim(0) as usize, v.dim(1) as usize);
    let flat: &[f32] = v.try_as_slice().map_err(|e| anyhow!("reading embeddings: {e:?}"))?;
    if flat.len() != b * d {
        bail!("pooled embeddings have {} values for {b} x {d}", flat.len());
    }
    Ok(flat.chunks(d).map(<[f32]>::to_vec).collect())
}

/// h: [B, L, D] (rows valid up to `lengths`) -> [B, D], as
/// sentence-transformers' Pooling module computes it.
pub fn pool(h: &Array, lengths: &[i32], pooling: Pooling) -> Result<Array> {
    let (b, l, d) = (h.dim(0), h.dim(1), h.dim(2));
    let mask: Vec<f32> = lengths.iter().flat_map(|&n| (0..l).map(move |j| if j < n { 1.0 } else { 0.0 })).collect();
    let mask = Array::from_slice(&mask, &[b, l, 1]); // [B, L, 1]
    let count: Vec<f32> = lengths.iter().map(|&n| n.max(1) as f32).collect();
    let count = Array::from_slice(&count, &[b, 1]); // [B, 1]
    Ok(match pooling {
        Pooling::Mean => h.multiply(&mask)?.sum_axis(1, false)?.divide(&count)?, // [B, D]
        Pooling::MeanSqrtLen => h.multiply(&mask)?.sum_axis(1, false)?.divide(&count.sqrt()?)?,
        Pooling::Max => {
            // Padded positions are -1e9, as sentence-transformers sets them.
            let neg = Array::from_f32(-1e9);
            select(&mask.gt(&Array::from_f32(0.0))?, h, &neg)?.max_axis(1, false)? // [B, D]
        }
        Pooling::Cls => h.try_index((.., 0))?, // [B, D]
        Pooling::LastToken => {
            let idx: Vec<i32> = lengths.iter().enumerate().map(|(i, &n)| i as i32 * l + (n - 1).max(0)).collect();
            let flat = h.reshape(&[b * l, d])?; // [B*L, D]
            flat.take_axis(Array::from_slice(&idx, &[b]), 0)? // [B, D]
        }
    })
}

/// x: [B, D] -> x / max(|x|, 1e-12) (torch's F.normalize).
pub fn l2_normalize(x: &Array) -> Result<Array> {
    let norm = x.square()?.sum_axis(-1, true)?.sqrt()?; // [B, 1]
    Ok(x.divide(maximum(&norm, Array::from_f32(1e-12))?)?)
}

/// Little-endian f32 bytes in base64 (OpenAI's `encoding_format: base64`,
/// which its SDKs decode with `np.frombuffer(..., dtype="float32")`).
pub fn base64_f32(v: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The error when a model is not an embedder.
pub fn not_an_embedder(id: &str) -> anyhow::Error {
    anyhow!("model `{id}` is not an embedding model (no sentence-transformers modules.json with a Pooling module, and not a BERT-family encoder)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_f32(&[]), "");
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.5]), "AACAPwAAIMA=");
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]), "AAAAAAAAAAAAAAAA");
    }

    #[test]
    fn pooling_modes_on_a_padded_batch() {
        // Row 0: 3 valid of 3; row 1: 2 valid, then padding (99).
        // [2, 3, 2]
        let h = Array::from_slice(&[1.0f32, 2., 3., 4., 5., 6., 7., 8., 9., 10., 99., 99.], &[2, 3, 2]);
        let get = |p| {
            let a = pool(&h, &[3, 2], p).unwrap().contiguous().unwrap();
            a.as_slice::<f32>().to_vec()
        };
        assert_eq!(get(Pooling::Mean), vec![3., 4., 8., 9.]);
        assert_eq!(get(Pooling::Cls), vec![1., 2., 7., 8.]);
        assert_eq!(get(Pooling::Max), vec![5., 6., 9., 10.]);
        assert_eq!(get(Pooling::LastToken), vec![5., 6., 9., 10.]);
        let n = l2_normalize(&Array::from_slice(&[3.0f32, 4., 0., 0.], &[2, 2])).unwrap();
        assert_eq!(n.as_slice::<f32>(), &[0.6, 0.8, 0., 0.]);
    }
}
