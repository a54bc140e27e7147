//! Multimodal RoPE positions (ABI 3.7, issue 15): the host's side of
//! Qwen2-VL's M-RoPE, written once for every model whose media forward hands
//! `arch::MEDIA_POSITIONS`, never naming one.
//!
//! A media forward asked for `MEDIA_POSITIONS` may hand, per image, each
//! feature token's (t, h, w) relative to the image's first ([N, T, 3]). The
//! host keeps them per image ([`Layouts`]: keyed by model directory and
//! MediaHash, since the image and the model fix them) and lays out a
//! prompt's positions as Qwen2-VL's `get_rope_index` does
//! ([`MropeLayout::build`]): text tokens advance all three axes by one; an
//! image's run of T placeholders starting where the next text position
//! would be, `s`, takes `s + rel`; the text after it continues at
//! `s + max(rel) + 1`. The rope delta, (last position + 1) - tokens, places
//! every later token i (decode, generated tokens after a preemption) at
//! `i + delta` on all axes, as mlx-vlm's decode steps do.
//!
//! A sequence's layout is built before its first prefill chunk
//! (media.rs `chunk_inputs`) from every image of its prompt, those behind a
//! prefix-cache hit included (their relative positions come from
//! [`Layouts`], or a media forward when they are not there), so a hit, a
//! chunk without images and a preempted sequence's re-prefill see the same
//! positions. The paged forward lends them (`PagedForward::with_positions`,
//! `ForwardCtx::positions`) only when a row has a layout: text-only batches
//! and models without media positions (Gemma) never get any.
use super::sequence::Sequence;
use crate::media::MediaHash;
use anyhow::{bail, Result};
use mlx_rs::Array;
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// One image's features' positions relative to its first: (t, h, w) each.
pub type Rel = Arc<Vec<[i32; 3]>>;

/// A prompt's M-RoPE positions and its rope delta.
#[derive(Debug, Clone, PartialEq)]
pub struct MropeLayout {
    /// Per prompt token, its (t, h, w).
    pub pos: Vec<[i32; 3]>,
    /// (last position + 1) - prompt tokens: token i >= prompt sits at i + delta.
    pub delta: i64,
}

impl MropeLayout {
    /// `n` prompt tokens with images at `spans` (ascending, disjoint), image
    /// i's features at `rels[i]` (one per placeholder).
    pub fn build(n: usize, spans: &[Range<usize>], rels: &[Rel]) -> Result<Self> {
        if spans.len() != rels.len() {
            bail!("{} image spans for {} image layouts", spans.len(), rels.len());
        }
        let mut pos = Vec::with_capacity(n);
        let mut next: i64 = 0; // the next text position
        for (span, rel) in spans.iter().zip(rels) {
            if span.start < pos.len() || span.end > n {
                bail!("image span {span:?} out of order or past the prompt's {n} tokens");
            }
            if rel.len() != span.len() {
                bail!("an image of {} placeholders has {} feature positions", span.len(), rel.len());
            }
            while pos.len() < span.start {
                pos.push([next as i32; 3]);
                next += 1;
            }
            let s = next;
            let mut top = 0i64;
            for r in rel.iter() {
                pos.push([(s + r[0] as i64) as i32, (s + r[1] as i64) as i32, (s + r[2] as i64) as i32]);
                top = top.max(*r.iter().max().expect("three axes") as i64);
            }
            if !rel.is_empty() {
                next = s + top + 1;
            }
        }
        while pos.len() < n {
            pos.push([next as i32; 3]);
            next += 1;
        }
        Ok(Self { pos, delta: next - n as i64 })
    }

    /// Token `i`'s (t, h, w).
    pub fn at(&self, i: usize) -> [i32; 3] {
        match self.pos.get(i) {
            Some(p) => *p,
            None => [(i as i64 + self.delta) as i32; 3],
        }
    }
}

/// int32 [3, B, L] positions of a ragged forward's rows (row b: `lens[b]`
/// new tokens of `seqs[b]` from its `kv_len`, left-padded to L), or None
/// when no row has a layout. Padding and rows without a layout sit at
/// `offset + l` on all axes, as `offsets()` implies.
pub fn batch_positions(seqs: &[&mut Sequence], lens: &[usize]) -> Option<Array> {
    if seqs.iter().all(|s| s.mrope.is_none()) {
        return None;
    }
    let (b, l) = (seqs.len(), lens.iter().copied().max().unwrap_or(0));
    let mut out = vec![0i32; 3 * b * l]; // [3, B, L]
    for (r, (s, &n)) in seqs.iter().zip(lens).enumerate() {
        let pad = l - n;
        for c in 0..l {
            let p = match (&s.mrope, c >= pad) {
                (Some(m), true) => m.at(s.kv_len + c - pad),
                _ => [(s.kv_len as i64 + c as i64 - pad as i64) as i32; 3],
            };
            for (axis, v) in p.iter().enumerate() {
                out[(axis * b + r) * l + c] = *v;
            }
        }
    }
    Some(Array::from_slice(&out, &[3, b as i32, l as i32]))
}

/// Images' relative positions already seen, per (model directory, image).
/// Bounded: past [`Layouts::MAX`] entries it starts over (a miss only
/// costs a media forward).
pub struct Layouts {
    map: Mutex<HashMap<(PathBuf, MediaHash), Rel>>,
    /// Model directories whose media forward hands no positions.
    without: Mutex<Vec<PathBuf>>,
}

impl Layouts {
    const MAX: usize = 4096;

    pub fn global() -> &'static Layouts {
        static L: std::sync::OnceLock<Layouts> = std::sync::OnceLock::new();
        L.get_or_init(|| Layouts { map: Mutex::new(HashMap::new()), without: Mutex::new(Vec::new()) })
    }

    /// Whether the model in `dir` is known to hand no media positions.
    pub fn without(&self, dir: &PathBuf) -> bool {
        self.without.lock().unwrap_or_else(|p| p.into_inner()).contains(dir)
    }

    pub fn mark_without(&self, dir: &PathBuf) {
        let mut w = self.without.lock().unwrap_or_else(|p| p.into_inner());
        if !w.contains(dir) {
            w.push(dir.clone());
        }
    }

    pub fn get(&self, dir: &PathBuf, hash: &MediaHash) -> Option<Rel> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&(dir.clone(), *hash)).cloned()
    }

    pub fn put(&self, dir: &PathBuf, hash: &MediaHash, rel: Rel) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= Self::MAX {
            m.clear();
        }
        m.insert((dir.clone(), *hash), rel);
    }
}

/// [N, T, 3] int32 (a media forward's `MEDIA_POSITIONS`) -> per image its
/// T (t, h, w).
pub fn rels_of(a: &Array) -> Result<Vec<Rel>> {
    let s = a.shape();
    if s.len() != 3 || s[2] != 3 {
        bail!("the media forward's feature positions are {s:?}, want [N, T, 3]");
    }
    let a = a.as_dtype(mlx_rs::Dtype::Int32)?;
    a.eval()?;
    let v = a.try_as_slice::<i32>()?;
    let t = s[1] as usize;
    Ok(v.chunks(t * 3).map(|img| Arc::new(img.chunks(3).map(|p| [p[0], p[1], p[2]]).collect())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(h: i32, w: i32) -> Rel {
        Arc::new((0..h).flat_map(|r| (0..w).map(move |c| [0, r, c])).collect())
    }

    #[test]
    fn lays_out_as_get_rope_index() {
        // 3 text, a 2x3 image (6 tokens), 2 text, a 1x2 image right after, 1 text.
        let l = MropeLayout::build(14, &[3..9, 11..13], &[grid(2, 3), grid(1, 2)]).unwrap();
        let want: Vec<[i32; 3]> = vec![
            [0, 0, 0], [1, 1, 1], [2, 2, 2],
            [3, 3, 3], [3, 3, 4], [3, 3, 5], [3, 4, 3], [3, 4, 4], [3, 4, 5],
            [6, 6, 6], [7, 7, 7],
            [8, 8, 8], [8, 8, 9],
            [10, 10, 10],
        ];
        assert_eq!(l.pos, want);
        // Last position 10, 14 tokens: decode token 14 sits at 11.
        assert_eq!(l.delta, -3);
        assert_eq!(l.at(14), [11; 3]);
        // Two images back to back: the second starts after the first's max.
        let l = MropeLayout::build(4, &[0..2, 2..4], &[grid(1, 2), grid(2, 1)]).unwrap();
        assert_eq!(l.pos, vec![[0, 0, 0], [0, 0, 1], [2, 2, 2], [2, 3, 2]]);
        assert_eq!(l.delta, 0);
        // No images: plain positions.
        let l = MropeLayout::build(3, &[], &[]).unwrap();
        assert_eq!((l.pos.clone(), l.delta), (vec![[0; 3], [1; 3], [2; 3]], 0));
        assert!(MropeLayout::build(3, &[1..3], &[grid(1, 1)]).is_err());
    }
}
