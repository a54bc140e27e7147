//! Images in a request's prompt, engine side (issue 15).
//!
//! A request carries its images ([`PromptMedia`]: pixels, MediaHash and the
//! placeholder span of each). Prefill runs the model's media encoder
//! (`Output::Media`, ABI 3.5) once per image the first time a chunk reaches
//! one (images of one size in one forward), keeps the features [T, hidden]
//! on the sequence, and lends each prefill chunk the rows that fall into it
//! ([`chunk_inputs`]: features [1, L, hidden], mask bool [1, L]).
//!
//! The prefix cache keys blocks by the media they stand for: the tokens it
//! hashes ([`PromptMedia::cache_tokens`]) have each placeholder replaced by
//! an id derived from the image's MediaHash, its index in the image and a
//! per-process salt (ids >= 2^31, never a vocabulary id). A block over an
//! image thus differs per image, and, hashes being chained, so does every
//! later block. The salt keeps the ids unguessable, so no client can craft
//! an image whose ids collide with another's; the price is that image
//! blocks on the SSD tier are not found again after a restart.
use super::attend::{ForwardRequest, KvStore};
use super::mrope::{Layouts, MropeLayout, Rel};
use super::sequence::Sequence;
use super::LoadedModel;
use crate::media::{MediaHash, Pixels};
use anyhow::{bail, Result};
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    ops::{concatenate, indexing::IndexOp, zeros_dtype},
    Array,
};
use rmlx_plugin_api::{
    author::{kv::dense_attend, AttendOpts, Output},
    PluginError, MEDIA_POSITIONS,
};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

/// One image of a prompt.
pub struct PromptImage {
    /// Preprocessed pixels, channels first: [C, H, W].
    pub pixels: Pixels,
    pub hash: MediaHash,
    /// Its placeholder tokens' positions in the prompt.
    pub span: Range<usize>,
    /// The ids the prefix cache hashes in place of the placeholders.
    key_ids: Vec<u32>,
}

/// The images of one request, in prompt order.
pub struct PromptMedia {
    pub images: Vec<PromptImage>,
}

impl std::fmt::Debug for PromptMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spans: Vec<_> = self.images.iter().map(|i| (&i.span, i.hash)).collect();
        f.debug_struct("PromptMedia").field("images", &spans).finish()
    }
}

fn salt() -> &'static [u8; 16] {
    static SALT: OnceLock<[u8; 16]> = OnceLock::new();
    SALT.get_or_init(rand::random)
}

/// The prefix-cache ids of an image's `n` placeholders: 2^31 | 31 bits of
/// sha256(salt, MediaHash, index).
fn key_ids(hash: &MediaHash, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|j| {
            let mut h = Sha256::new();
            h.update(salt());
            h.update(hash.0);
            h.update(j.to_le_bytes());
            let d = h.finalize();
            0x8000_0000 | u32::from_le_bytes([d[0], d[1], d[2], d[3]])
        })
        .collect()
}

impl PromptImage {
    pub fn new(pixels: Pixels, hash: MediaHash, span: Range<usize>) -> Self {
        let key_ids = key_ids(&hash, span.len());
        Self { pixels, hash, span, key_ids }
    }
}

impl PromptMedia {
    /// `tokens` as the prefix cache hashes them: each image's placeholders
    /// replaced by its key ids (generated tokens past the prompt as they are).
    pub fn cache_tokens<'a>(&self, tokens: &'a [u32]) -> Cow<'a, [u32]> {
        let mut out: Option<Vec<u32>> = None;
        for img in &self.images {
            let end = img.span.end.min(tokens.len());
            if img.span.start >= end {
                continue;
            }
            let v = out.get_or_insert_with(|| tokens.to_vec());
            v[img.span.start..end].copy_from_slice(&img.key_ids[..end - img.span.start]);
        }
        match out {
            Some(v) => Cow::Owned(v),
            None => Cow::Borrowed(tokens),
        }
    }
}

/// A sequence's tokens as the prefix cache hashes them.
pub fn cache_tokens(s: &Sequence) -> Cow<'_, [u32]> {
    match &s.params.media {
        Some(m) => m.cache_tokens(&s.tokens),
        None => Cow::Borrowed(&s.tokens),
    }
}

/// Cacheless attention over whole rows of one length (a vision tower's
/// patches): every query sees every key, nothing is stored.
struct MediaStore {
    rows: u32,
}

impl KvStore for MediaStore {
    fn batch(&self) -> u32 {
        self.rows
    }
    fn offset(&self) -> i32 {
        0
    }
    fn offsets(&self) -> Array {
        Array::from_slice(&vec![0i32; self.rows as usize], &[self.rows as i32])
    }
    /// q: [N, H, P, hd], k/v: [N, K, P, hd] -> [N, H, P, hd]
    fn attend(&mut self, _layer: u32, q: Array, k: Array, v: Array, opts: &AttendOpts<'_>) -> Result<Array, PluginError> {
        if opts.causal || opts.window != 0 {
            return Err(PluginError::unsupported("a media encoder's attention is bidirectional and unwindowed"));
        }
        if opts.softcap == 0.0 && opts.sinks.is_none() {
            Ok(scaled_dot_product_attention(&q, &k, &v, opts.scale, None::<ScaledDotProductAttentionMask>, None)?)
        } else {
            dense_attend(&q, &k, &v, None, opts)
        }
    }
}

/// Runs the media encoder over `images` (one forward per size): per image,
/// its features [T, hidden].
pub fn encode_images(model: &mut LoadedModel, images: &[&PromptImage]) -> Result<Vec<Array>> {
    Ok(encode_images_with_positions(model, images)?.0)
}

/// [`encode_images`], also asking a 3.7 plugin for each feature's relative
/// (t, h, w) (`MEDIA_POSITIONS`, engine/mrope.rs): Some per image when the
/// model hands them (every forward must), None when it does not.
pub fn encode_images_with_positions(model: &mut LoadedModel, images: &[&PromptImage]) -> Result<(Vec<Array>, Option<Vec<Rel>>)> {
    if model.plugin_abi < (3, 5) {
        bail!(
            "the architecture plugin `{}` is built for ABI {}.{}: images need 3.5 or later (output::MEDIA)",
            model.architecture_plugin,
            model.plugin_abi.0,
            model.plugin_abi.1
        );
    }
    let mut out: Vec<Option<Array>> = vec![None; images.len()];
    let mut rels: Vec<Option<Rel>> = vec![None; images.len()];
    let ask = if model.plugin_abi >= (3, 7) { vec![MEDIA_POSITIONS] } else { Vec::new() };
    let mut done = vec![false; images.len()];
    for i in 0..images.len() {
        if done[i] {
            continue;
        }
        let shape = &images[i].pixels.shape;
        if shape.len() != 3 {
            bail!("image pixels of shape {shape:?}: the media forward takes [C, H, W] per image");
        }
        let group: Vec<usize> = (i..images.len()).filter(|&j| !done[j] && images[j].pixels.shape == *shape).collect();
        let mut data = Vec::with_capacity(group.len() * images[i].pixels.data.len());
        for &j in &group {
            data.extend_from_slice(&images[j].pixels.data);
            done[j] = true;
        }
        let n = group.len() as i32;
        let dims = [n, shape[0] as i32, shape[1] as i32, shape[2] as i32];
        let pixels = Array::from_slice(&data, &dims); // [N, C, H, W]
        let mask = Array::from_slice(&vec![true; group.len()], &[n, 1]);
        let tokens = Array::from_slice(&vec![0i32; group.len()], &[n, 1]);
        let req = ForwardRequest { output: Some(Output::Media), inputs: Some((pixels, mask)), hidden_layers: ask.clone(), ..ForwardRequest::default() };
        let run = model.run(&tokens, &mut MediaStore { rows: n as u32 }, req)?;
        let feats = run.out; // [N, T, hidden]
        if let Some((_, p)) = run.hidden.iter().find(|(l, _)| *l == MEDIA_POSITIONS) {
            let per = super::mrope::rels_of(p)?; // [N, T, 3]
            if per.len() != group.len() || per.iter().any(|r| r.len() as i32 != feats.dim(1)) {
                bail!("the media forward's feature positions {:?} do not match its features {:?}", p.shape(), feats.shape());
            }
            for (&j, r) in group.iter().zip(per) {
                rels[j] = Some(r);
            }
        }
        if feats.ndim() != 3 || feats.dim(0) != n {
            bail!("the media forward returned {:?} for {n} images (want [N, T, hidden])", feats.shape());
        }
        for (r, &j) in group.iter().enumerate() {
            let t = images[j].span.len() as i32;
            if feats.dim(1) != t {
                bail!("the media forward gave {} features per image; the prompt has {t} placeholders", feats.dim(1));
            }
            out[j] = Some(feats.index(r as i32)); // [T, hidden]
        }
    }
    let feats = out.into_iter().map(|a| a.expect("every image encoded")).collect();
    let rels = match rels.iter().filter(|r| r.is_some()).count() {
        0 => None,
        k if k == rels.len() => Some(rels.into_iter().map(|r| r.expect("counted")).collect()),
        _ => bail!("the media forward handed feature positions for some images only"),
    };
    Ok((feats, rels))
}

/// Lays out `s`'s multimodal-RoPE positions (engine/mrope.rs) before its
/// prefill chunk from `start`, once: from every prompt image's relative
/// positions, kept per image ([`Layouts`]) or asked of a media forward
/// (whose features are kept for the images still to prefill). A model whose
/// media forward hands none is remembered, and its sequences get none.
fn ensure_layout(model: &mut LoadedModel, s: &mut Sequence, start: usize) -> Result<()> {
    if s.mrope_done {
        return Ok(());
    }
    let dir = model.dir.path.clone();
    let media = match s.params.media.clone() {
        Some(m) if !m.images.is_empty() && model.plugin_abi >= (3, 7) && !Layouts::global().without(&dir) => m,
        _ => {
            s.mrope_done = true;
            return Ok(());
        }
    };
    let n = media.images.len();
    let mut rels: Vec<Option<Rel>> = media.images.iter().map(|i| Layouts::global().get(&dir, &i.hash)).collect();
    let missing: Vec<usize> = (0..n).filter(|&i| rels[i].is_none()).collect();
    if !missing.is_empty() {
        let imgs: Vec<&PromptImage> = missing.iter().map(|&i| &media.images[i]).collect();
        let (feats, got) = encode_images_with_positions(model, &imgs)?;
        if s.media_features.len() != n {
            s.media_features = vec![None; n];
        }
        for (&i, f) in missing.iter().zip(feats) {
            if media.images[i].span.end > start {
                s.media_features[i] = Some(f);
            }
        }
        let Some(got) = got else {
            Layouts::global().mark_without(&dir);
            s.mrope_done = true;
            return Ok(());
        };
        for (&i, r) in missing.iter().zip(got) {
            Layouts::global().put(&dir, &media.images[i].hash, r.clone());
            rels[i] = Some(r);
        }
    }
    let spans: Vec<Range<usize>> = media.images.iter().map(|i| i.span.clone()).collect();
    let rels: Vec<Rel> = rels.into_iter().map(|r| r.expect("laid out")).collect();
    s.mrope = Some(std::sync::Arc::new(MropeLayout::build(s.prompt_len, &spans, &rels)?));
    s.mrope_done = true;
    Ok(())
}

/// The input embeddings of the prefill chunk `start..start + len` of `s`:
/// (features [1, len, hidden], mask bool [1, len]), or None when no image
/// falls into it. Encodes the request's images the first time it is needed.
pub fn chunk_inputs(model: &mut LoadedModel, s: &mut Sequence, start: usize, len: usize) -> Result<Option<(Array, Array)>> {
    let Some(media) = s.params.media.clone() else {
        return Ok(None);
    };
    ensure_layout(model, s, start)?;
    let chunk = start..start + len;
    let hit: Vec<usize> =
        (0..media.images.len()).filter(|&i| media.images[i].span.start < chunk.end && chunk.start < media.images[i].span.end).collect();
    if hit.is_empty() {
        return Ok(None);
    }
    if s.media_features.len() != media.images.len() {
        s.media_features = vec![None; media.images.len()];
    }
    // Images before this chunk are in the KV already (or a prefix-cache hit).
    // Every image not encoded yet from here on, so later chunks reuse them.
    let todo: Vec<usize> = (0..media.images.len()).filter(|&i| s.media_features[i].is_none() && media.images[i].span.end > start).collect();
    if !todo.is_empty() {
        let imgs: Vec<&PromptImage> = todo.iter().map(|&i| &media.images[i]).collect();
        for (i, f) in todo.iter().zip(encode_images(model, &imgs)?) {
            s.media_features[*i] = Some(f);
        }
    }
    let first = s.media_features[hit[0]].as_ref().expect("encoded");
    let (hidden, dtype) = (first.dim(1), first.dtype());
    let mut pieces = Vec::new();
    let mut mask = vec![false; len];
    let mut at = start;
    for &i in &hit {
        let span = &media.images[i].span;
        let (a, b) = (span.start.max(start), span.end.min(chunk.end));
        if a > at {
            pieces.push(zeros_dtype(&[(a - at) as i32, hidden], dtype)?);
        }
        let f = s.media_features[i].as_ref().expect("encoded"); // [T, hidden]
        let rows = Array::from_iter((a - span.start) as i32..(b - span.start) as i32, &[(b - a) as i32]);
        pieces.push(f.take_axis(&rows, 0)?);
        mask[a - start..b - start].iter_mut().for_each(|m| *m = true);
        at = b;
    }
    if at < chunk.end {
        pieces.push(zeros_dtype(&[(chunk.end - at) as i32, hidden], dtype)?);
    }
    let features = concatenate(&pieces, 0)?.reshape(&[1, len as i32, hidden])?; // [1, L, hidden]
    // Past the last image: the features are in this chunk's graph; the
    // sequence need not keep them (a preempted one encodes them again).
    if media.images.iter().all(|i| i.span.end <= chunk.end) {
        s.media_features.clear();
    }
    Ok(Some((features, Array::from_slice(&mask, &[1, len as i32]))))
}

impl PromptMedia {
    /// A model with `use_bidirectional_attention: "vision"`
    /// (`LoadedModel::bidirectional_media`) lets each image's placeholder
    /// tokens attend to every placeholder of the same image, both ways, on
    /// top of the causal mask, in every layer (windowed ones too), as
    /// mlx-vlm's Gemma 4 does with the processor's `mm_token_type_ids`:
    /// runs of adjacent placeholders are one block. Prefill therefore keeps
    /// each image's placeholders in one chunk ([`Self::align_chunk`]), and
    /// the paged forward gets the chunk's runs (`PagedForward::with_runs`).
    ///
    /// The runs that reach into the new tokens `start..start + len`:
    /// absolute positions, cut at the chunk's end (a run's part before
    /// `start` is in the cache, computed with the whole image seen).
    pub fn bidirectional_runs(&self, start: usize, len: usize) -> Vec<Range<usize>> {
        let end = start + len;
        let mut runs: Vec<Range<usize>> = Vec::new();
        for span in self.images.iter().map(|i| &i.span) {
            if span.is_empty() || span.start >= end || span.end <= start {
                continue;
            }
            let r = span.start..span.end.min(end);
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end, // adjacent placeholders: one block
                _ => runs.push(r),
            }
        }
        runs
    }

    /// The prefill chunk from `start`, `chunk` tokens asked, moved so no
    /// image's placeholders are split across chunks (bidirectional models):
    /// a chunk ending inside an image ends before it instead, or, when the
    /// image begins at `start` (or before it: a prefix-cache hit inside
    /// it), at the image's end, past `chunk`.
    pub fn align_chunk(&self, start: usize, chunk: usize) -> usize {
        let end = start + chunk;
        match self.bidirectional_runs(0, usize::MAX / 2).into_iter().find(|sp| sp.start < end && end < sp.end) {
            Some(sp) if sp.start > start => sp.start - start,
            Some(sp) => sp.end - start,
            None => chunk,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::block_manager::{block_hash, HashKey};
    use super::*;

    fn image(seed: u8, span: Range<usize>) -> PromptImage {
        let pixels = Pixels { data: vec![0.0; 3], shape: vec![3, 1, 1], grid_thw: None };
        PromptImage::new(pixels, MediaHash([seed; 32]), span)
    }

    /// Chained block hashes of `tokens` in blocks of 4, as the prefix cache
    /// takes them.
    fn chain(tokens: &[u32]) -> Vec<u64> {
        let key = HashKey([3; 16]);
        let mut parent = 0;
        tokens
            .chunks_exact(4)
            .map(|c| {
                parent = block_hash(&key, parent, 1, c);
                parent
            })
            .collect()
    }

    #[test]
    fn cache_key_follows_the_image() {
        // Blocks of 4: [0..4) text, [4..8) text + image, [8..12) image + text, [12..16) text.
        let prompt: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 9, 9, 9, 9, 7, 8, 1, 2, 3, 4];
        let a = PromptMedia { images: vec![image(1, 6..10)] };
        let b = PromptMedia { images: vec![image(2, 6..10)] };
        let a2 = PromptMedia { images: vec![image(1, 6..10)] };
        let (ka, kb, ka2) = (a.cache_tokens(&prompt), b.cache_tokens(&prompt), a2.cache_tokens(&prompt));
        // Only the placeholders change; they leave the vocabulary's range.
        assert_eq!(ka[..6], prompt[..6]);
        assert_eq!(ka[10..], prompt[10..]);
        assert!(ka[6..10].iter().all(|&t| t >= 0x8000_0000));
        let (ca, cb, ca2) = (chain(&ka), chain(&kb), chain(&ka2));
        // Another image: the block before it is shared, none from the image on.
        assert_eq!(ca[0], cb[0]);
        for j in 1..4 {
            assert_ne!(ca[j], cb[j], "block {j} shared across images");
        }
        // The same image again: every block is shared.
        assert_eq!(ca, ca2);
        // No images: the tokens as they are.
        assert!(matches!(PromptMedia { images: vec![] }.cache_tokens(&prompt), Cow::Borrowed(_)));
        // A prompt cut inside the image (a partial lookup) still keys it.
        assert_eq!(a.cache_tokens(&prompt[..8])[..], ka[..8]);
    }

    #[test]
    fn images_stay_in_one_chunk_and_form_runs() {
        let m = PromptMedia { images: vec![image(1, 5..9), image(2, 9..12), image(3, 20..30)] };
        // A chunk ending inside an image ends before it...
        assert_eq!(m.align_chunk(0, 7), 5);
        assert_eq!(m.align_chunk(12, 10), 8);
        // ...or, starting at (or inside) it, at its end, past the chunk.
        assert_eq!(m.align_chunk(5, 2), 7);
        assert_eq!(m.align_chunk(20, 3), 10);
        assert_eq!(m.align_chunk(22, 3), 8);
        // Adjacent images are one run; ends between runs or past them stay.
        assert_eq!(m.align_chunk(0, 9), 5);
        assert_eq!(m.align_chunk(0, 12), 12);
        assert_eq!(m.align_chunk(0, 40), 40);
        // Adjacent placeholders are one run; runs are cut at the chunk's end.
        assert_eq!(m.bidirectional_runs(0, 40), vec![5..12, 20..30]);
        assert_eq!(m.bidirectional_runs(12, 13), vec![20..25]);
        assert_eq!(m.bidirectional_runs(7, 3), vec![5..10]);
        assert_eq!(m.bidirectional_runs(12, 8), Vec::<Range<usize>>::new());
    }

    #[test]
    fn each_placeholder_gets_its_own_id() {
        let ids = key_ids(&MediaHash([5; 32]), 256);
        let mut d = ids.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 256);
        assert_ne!(ids, key_ids(&MediaHash([6; 32]), 256));
    }
}
