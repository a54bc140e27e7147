//! Image documents of a multi-task embedder (jina-embeddings-v4, issue 15),
//! as its published `process_images` / `get_single_vector_embeddings` make
//! them: the document `<|im_start|>user\n<|vision_start|><|image_pad|>
//! <|vision_end|>Describe the image.<|im_end|>\n` (no task prefix) with the
//! placeholder expanded to the image's count; one forward with the vision
//! tower's features at the placeholders and the multimodal-RoPE positions
//! of the media forward's `MEDIA_POSITIONS` (engine/mrope.rs, as
//! get_rope_index lays them out); the last hidden states averaged over the
//! span from the vision_start token to the vision_end token, inclusive,
//! then truncated to `dims` and L2-normalised. The task's adapters apply
//! as for text (they leave the vision tower alone: model/adapters.rs).
//! One document per forward.
use super::embed::l2_normalize;
use super::encoder::encode_with;
use super::media::{encode_images_with_positions, PromptImage};
use super::mrope::MropeLayout;
use super::LoadedModel;
use crate::model::pooling::EmbedSpec;
use anyhow::{anyhow, bail, Result};
use mlx_rs::{
    ops::{concatenate, indexing::TryIndexOp, zeros_dtype},
    transforms::eval,
    Array, Dtype,
};
use std::ops::Range;

/// The document's text before the image, as the published definition writes it.
pub const DOC_BEFORE: &str = "<|im_start|>user\n";
/// The document's text after the image.
pub const DOC_AFTER: &str = "Describe the image.<|im_end|>\n";

/// The ids of an image document of `count` placeholders (`image` each)
/// between `before` and `after` (the tokenized [`DOC_BEFORE`] and
/// [`DOC_AFTER`]: the real tokenizer splits the whole document at these
/// special tokens, so the pieces tokenize as the whole does), and the
/// placeholders' range.
pub fn doc_ids(before: &[u32], after: &[u32], vision: (u32, u32), image: u32, count: usize) -> (Vec<u32>, Range<usize>) {
    let mut ids = Vec::with_capacity(before.len() + after.len() + count + 2);
    ids.extend_from_slice(before);
    ids.push(vision.0);
    let start = ids.len();
    ids.extend(std::iter::repeat(image).take(count));
    let span = start..ids.len();
    ids.push(vision.1);
    ids.extend_from_slice(after);
    (ids, span)
}

/// The embedding of the image document `ids` (`dims` values when given),
/// whose image's `span` is its placeholders' range in `ids`.
pub fn embed_image_doc(model: &mut LoadedModel, spec: &EmbedSpec, ids: &[u32], image: &PromptImage, dims: Option<usize>) -> Result<Vec<f32>> {
    let (vs, ve) = spec.tasks.as_ref().and_then(|t| t.vision).ok_or_else(|| anyhow!("this embedder takes no images"))?;
    let span = image.span.clone();
    let first = ids.iter().position(|&t| t == vs).ok_or_else(|| anyhow!("the image document has no vision_start token {vs}"))?;
    let last = ids[first..].iter().position(|&t| t == ve).map(|k| first + k);
    let last = last.ok_or_else(|| anyhow!("the image document has no vision_end token {ve} after its vision_start"))?;
    if span.start <= first || span.end > last {
        bail!("the image's placeholders {span:?} are not inside the vision span {first}..={last}");
    }
    let (feats, rels) = encode_images_with_positions(model, &[image])?;
    let f = &feats[0]; // [T, hidden]
    let (l, hidden, dtype) = (ids.len(), f.dim(1), f.dtype());
    let mut pieces = Vec::with_capacity(3);
    if span.start > 0 {
        pieces.push(zeros_dtype(&[span.start as i32, hidden], dtype)?);
    }
    pieces.push(f.clone());
    if span.end < l {
        pieces.push(zeros_dtype(&[(l - span.end) as i32, hidden], dtype)?);
    }
    let features = concatenate(&pieces, 0)?.reshape(&[1, l as i32, hidden])?; // [1, L, hidden]
    let mask: Vec<bool> = (0..l).map(|i| span.contains(&i)).collect();
    let mask = Array::from_slice(&mask, &[1, l as i32]); // [1, L]
    // A model whose media forward hands no positions runs text positions.
    let positions = match rels {
        Some(rels) => {
            let layout = MropeLayout::build(l, &[span.clone()], &rels)?;
            let pos: Vec<i32> = (0..3).flat_map(|a| layout.pos.iter().map(move |p| p[a])).collect();
            Some(Array::from_slice(&pos, &[3, 1, l as i32])) // [3, B, L]
        }
        None => None,
    };
    let h = encode_with(model, &[ids.to_vec()], 0, Some((features, mask)), positions)?.as_dtype(Dtype::Float32)?; // [1, L, D]
    let pooled = h.try_index((0, first as i32..last as i32 + 1))?.mean_axis(0, true)?; // [1, D]
    let d = pooled.dim(1) as usize;
    let mut v = pooled;
    if let Some(n) = dims.filter(|&n| n < d) {
        v = v.try_index((.., 0..n as i32))?; // [1, n]
    }
    if spec.normalize {
        v = l2_normalize(&v)?;
    }
    let v = v.contiguous()?;
    eval([&v])?;
    let out: &[f32] = v.try_as_slice().map_err(|e| anyhow!("reading the image embedding: {e:?}"))?;
    Ok(out.to_vec())
}
