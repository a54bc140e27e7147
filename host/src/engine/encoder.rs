//! Cacheless attention for encoders (BERT-style embedders; later the audio
//! and vision towers): every row's queries see its valid keys, all of them
//! (`causal: false`) or the earlier ones (decoder embedders, `causal: true`),
//! and nothing is stored. Rows are padded at the end to the longest.
use super::attend::{ForwardOut, ForwardRequest, KvStore};
use super::LoadedModel;
use anyhow::{bail, Result};
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::zeros,
    Array,
};
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts, Output},
    PluginError,
};

pub struct EncoderStore {
    /// Each row's valid tokens.
    lengths: Vec<i32>,
    /// The padded row length L.
    len: i32,
    /// bool [B, 1, L, L] per (causal, window), built on first use.
    masks: Vec<((bool, u32), Array)>,
    /// int32 [3, B, L] multimodal-RoPE positions (ABI 3.7), when given.
    positions: Option<Array>,
}

impl EncoderStore {
    pub fn new(lengths: &[i32], len: i32) -> Self {
        Self { lengths: lengths.to_vec(), len, masks: Vec::new(), positions: None }
    }

    /// bool [B, 1, L, L]: query i of row b sees key j < lengths[b] (and
    /// j <= i when causal, j > i - window when windowed).
    fn mask(&mut self, causal: bool, window: u32) -> Array {
        if let Some((_, m)) = self.masks.iter().find(|(k, _)| *k == (causal, window)) {
            return m.clone();
        }
        let l = self.len as usize;
        let mut m = Vec::with_capacity(self.lengths.len() * l * l);
        for &n in &self.lengths {
            for i in 0..l {
                m.extend((0..l).map(|j| {
                    // A padded query row sees key 0 so its softmax stays finite.
                    let valid = (j as i32) < n || j == 0;
                    valid && (!causal || j <= i) && (window == 0 || j + window as usize > i)
                }));
            }
        }
        let m = Array::from_slice(&m, &[self.lengths.len() as i32, 1, self.len, self.len]);
        self.masks.push(((causal, window), m.clone()));
        m
    }
}

impl KvStore for EncoderStore {
    fn batch(&self) -> u32 {
        self.lengths.len() as u32
    }
    fn offset(&self) -> i32 {
        0
    }
    fn offsets(&self) -> Array {
        zeros::<i32>(&[self.lengths.len() as i32]).unwrap_or_else(|_| Array::from_slice(&[0i32], &[1]))
    }
    /// q: [B, H, L, hd], k/v: [B, K, L, hd] -> [B, H, L, hd]
    fn attend(&mut self, _layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
        if k.dim(0) as usize != self.lengths.len() || k.dim(2) != self.len {
            return Err(PluginError::other(format!(
                "encoder attention got keys [{}, _, {}, _] for {} rows of {}",
                k.dim(0),
                k.dim(2),
                self.lengths.len(),
                self.len
            )));
        }
        let mask = self.mask(opts.causal, opts.window);
        if opts.softcap == 0.0 && opts.sinks.is_none() {
            let mask = ScaledDotProductAttentionMask::Array(&mask);
            Ok(scaled_dot_product_attention(&q, &k, &v, opts.scale, mask, None)?)
        } else {
            dense_attend(&q, &k, &v, Some(&mask), opts)
        }
    }
    fn positions(&self) -> Option<Array> {
        self.positions.clone()
    }
}

/// The final hidden states [B, L, hidden] of `rows` (token ids, any
/// lengths), padded at the end with `pad`: one forward, no cache.
pub fn encode(model: &mut LoadedModel, rows: &[Vec<u32>], pad: u32) -> Result<Array> {
    encode_with(model, rows, pad, None, None)
}

/// [`encode`] with input embeddings (features [B, L, hidden] used where the
/// bool [B, L] mask is set: an image's placeholders) and int32 [3, B, L]
/// multimodal-RoPE positions (engine/mrope.rs).
pub fn encode_with(
    model: &mut LoadedModel,
    rows: &[Vec<u32>],
    pad: u32,
    inputs: Option<(Array, Array)>,
    positions: Option<Array>,
) -> Result<Array> {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    if len == 0 || len > i32::MAX as usize {
        bail!("nothing to encode");
    }
    let mut ids = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend(r.iter().map(|&t| t as i32));
        ids.extend(std::iter::repeat(pad as i32).take(len - r.len()));
    }
    let lengths: Vec<i32> = rows.iter().map(|r| r.len() as i32).collect();
    let tokens = Array::from_slice(&ids, &[rows.len() as i32, len as i32]);
    let mut store = EncoderStore::new(&lengths, len as i32);
    store.positions = positions;
    let req = ForwardRequest {
        output: Some(Output::Hidden),
        inputs,
        lengths: Some(Array::from_slice(&lengths, &[lengths.len() as i32])),
        ..ForwardRequest::default()
    };
    let ForwardOut { out, .. } = model.run(&tokens, &mut store, req)?;
    Ok(out)
}
