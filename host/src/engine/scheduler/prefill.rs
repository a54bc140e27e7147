//! Prefill in one lane's step (issue 16): the chunks chosen this step run
//! as ONE forward [B, L] with ragged rows (`PagedForward::ragged`: each row
//! left-padded to the longest, padding neither stored nor seen, each row's
//! logits from its own last token), instead of one forward per sequence.
//! Prompts that arrive together thus prefill together.
//!
//! The budget: while streams of the lane decode, at most
//! `SchedulerConfig::prefill_step_tokens` prompt tokens per step in all
//! (at least one `--prefill-chunk`; the backend's default: one chunk on a
//! CPU, 8,192 tokens on a GPU, where prompts that join a decoding batch
//! then prefill together instead of one a step); every prefilling
//! sequence's chunk when none decodes.
//!
//! Rows stay on the one-sequence path where batching is not exact (and
//! all do with `RMLX_BATCHED_PREFILL=0`): a chunk that holds image
//! features (engine/media.rs `chunk_inputs`).
//!
//! Models with recurrent STATE layers (gated DeltaNet, issue 13) batch
//! too: each row lends its own state and gets its own back
//! (`decode::forward_rows`), and the model masks the padding (its
//! positions are negative: the conv input is zero there and the state
//! steps with decay 1 and beta 0, plugins/arch-qwen3/src/hybrid_delta.rs). That
//! is exact only for a row whose state starts fresh (zero conv state
//! before its first token), so a row that resumes a state (a later chunk,
//! a prefix-cache hit) is never padded: it shares a forward only with rows
//! no longer than itself ([`groups`]' `fixed`).
//!
//! Rows are grouped so padding stays a small share of each forward
//! ([`groups`]). A batched forward that fails is retried row by row, so
//! the error lands on the row that causes it and the others go on (nothing
//! of the failed forward is kept: `kv_len` only advances after the logits
//! were evaluated, and the pool's layers are only replaced by complete
//! writes).
use super::super::decode::forward_rows_hidden;
use super::super::kv_pool::KvPool;
use super::super::sequence::Sequence;
use super::super::worker::WorkerError;
use super::super::LoadedModel;
use super::{cache_blocks, Ended, LaneId, Reserved, Scheduler};
use anyhow::Result;
use mlx_rs::Array;

/// Padding may take at most this share of a batched prefill forward's
/// B x L tokens. Padding costs what real tokens cost (every matmul, and
/// attention rows), so 1/4 bounds the waste at a third of the real work,
/// while prompts of similar length (the common case: one client's burst,
/// a benchmark) still share one forward.
const MAX_PAD_SHARE: f64 = 0.25;
/// At most this many rows per prefill forward: activations (and, where the
/// fused attention is not used, the B x H x L x ctx scores) grow with B.
const MAX_ROWS: usize = 16;
/// At most this many tokens (B x L, padding included) per prefill forward,
/// beside the first row (which may be a whole `--prefill-chunk` alone).
const MAX_TOKENS: usize = 8192;

/// Groups rows of `lens` tokens for batched forwards: longest first, a row
/// joins the current group while the group's padding stays within
/// [`MAX_PAD_SHARE`] of its B x L and within [`MAX_ROWS`] / [`MAX_TOKENS`].
/// A `fixed` row (one that resumes a recurrent state) takes no padding: it
/// joins only a group as long as itself. Returns indices into `lens`, each
/// group longest first.
pub(crate) fn groups(lens: &[usize], fixed: &[bool]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    // Longest first; among equals fixed rows first (a group they start
    // pads none of them), then arrival order (the sort is stable).
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i]), !fixed.get(i).copied().unwrap_or(false)));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut real = 0usize;
    for i in order {
        let fits = out.last().is_some_and(|g| {
            let (b, l) = (g.len() + 1, lens[g[0]]);
            let pad = b * l - (real + lens[i]);
            let unpadded = !fixed.get(i).copied().unwrap_or(false) || lens[i] == l;
            unpadded && b <= MAX_ROWS && b * l <= MAX_TOKENS && pad as f64 <= MAX_PAD_SHARE * (b * l) as f64
        });
        if fits {
            out.last_mut().expect("checked").push(i);
            real += lens[i];
        } else {
            out.push(vec![i]);
            real = lens[i];
        }
    }
    out
}

/// One ragged prefill forward: row b feeds `seqs[b]`'s next `lens[b]`
/// prompt tokens (from its `kv_len`), left-padded to the longest with its
/// own first token (any id: padding is masked and never stored). The rows'
/// tables must cover the new tokens. Evaluates the forward, then advances
/// each row's `kv_len` (and sets its recurrent state); on an error no row
/// changes. Returns the hidden states of `hidden` ([B, L, D] each, rows
/// left-padded: a drafter's conditioning, spec/prompt.rs).
pub(crate) fn ragged_forward(model: &mut LoadedModel, pool: &mut KvPool, seqs: &mut [&mut Sequence], lens: &[usize], hidden: Vec<u32>) -> Result<Vec<(u32, Array)>> {
    let len = lens.iter().copied().max().unwrap_or(0);
    let b = seqs.len();
    let mut ids: Vec<i32> = Vec::with_capacity(b * len);
    for (s, &n) in seqs.iter().zip(lens) {
        let real = &s.tokens[s.kv_len..s.kv_len + n];
        ids.extend(std::iter::repeat_n(real[0] as i32, len - n));
        ids.extend(real.iter().map(|&t| t as i32));
    }
    let input = Array::from_slice(&ids, &[b as i32, len as i32]); // [B, L]
    // Logits [B, 1, V] of each row's last real token, evaluated before any row changes.
    Ok(forward_rows_hidden(model, pool, seqs, input, lens, None, true, hidden)?.1)
}

/// Whether `s` resumes a recurrent state (a later chunk, a prefix-cache
/// hit): such a row must not be padded (module doc).
fn resumes_state(s: &Sequence) -> bool {
    s.cached() > 0 || !s.state.is_empty()
}

impl Scheduler {
    /// Prefill: chunks of prompts in arrival order, at most
    /// `prefill_step_tokens` (at least one `--prefill-chunk`) of tokens per
    /// step in all (so running streams wait at most that long; short
    /// prompts share a step). The budget
    /// protects decoding streams; while none is decoding, every prefilling
    /// sequence takes its chunk this step (prompts that arrive together
    /// start decoding together). The chosen chunks run as batched forwards
    /// (module doc).
    pub(super) fn prefill(&mut self, lane: &LaneId, model: &mut LoadedModel, ended: &mut Vec<Ended>, preempted: &mut Vec<Sequence>) {
        let decoding = self.running.iter().any(|s| s.lane == *lane && s.to_prefill() == 0);
        let mut budget: Option<usize> = (!decoding).then_some(usize::MAX);
        let mut chosen: Vec<(u64, usize)> = Vec::new();
        while let Some(i) = self
            .running
            .iter()
            .position(|s| s.lane == *lane && s.to_prefill() > 0 && !chosen.iter().any(|(id, _)| *id == s.id))
        {
            let per = self.running[i].params.prefill_chunk.max(1);
            let left = *budget.get_or_insert(per.max(self.cfg.prefill_step_tokens));
            if left == 0 {
                break;
            }
            let mut chunk = per.min(left).min(self.running[i].to_prefill());
            // Recurrent state: a chunk that crosses a block boundary ends at
            // the last one it crosses, so the state there can be snapshotted
            // for the prefix cache (the rest is the next step's chunk).
            let m = self.mgr(lane);
            if m.recurrent {
                let (start, bs) = (self.running[i].cached(), m.block_size);
                let boundary = (start + chunk) / bs * bs;
                if boundary > start {
                    chunk = boundary - start;
                }
            }
            // Bidirectional images: no image split across chunks (media.rs).
            if model.bidirectional_media() {
                let s = &self.running[i];
                chunk = s.params.media.as_ref().map_or(chunk, |m| m.align_chunk(s.cached(), chunk)).min(s.to_prefill());
            }
            budget = Some(left.saturating_sub(chunk));
            chosen.push((self.running[i].id, chunk));
            let (ok, i) = self.reserve(lane, i, chunk, preempted);
            if ok == Reserved::Wait {
                let s = self.running.remove(i);
                preempted.push(self.retire(s));
            } else if ok == Reserved::Never {
                let s = self.running.remove(i);
                let err = WorkerError::BadRequest("the prompt does not fit in --kv-budget".into());
                ended.push((self.retire(s), Err(err)));
            }
        }
        // A later reservation may have preempted an earlier chosen row: only
        // those still running go on. Rows with image features in their chunk
        // go alone.
        let alone_all = !batching();
        let state = model.has_state();
        let mut batch: Vec<(u64, usize, bool)> = Vec::new();
        for (id, chunk) in chosen {
            let Some(i) = self.running.iter().position(|s| s.id == id) else { continue };
            let s = &mut self.running[i];
            let start = s.cached();
            match super::super::media::chunk_inputs(model, s, start, chunk) {
                Err(e) => {
                    let s = self.running.remove(i);
                    ended.push((self.retire(s), Err(WorkerError::Internal(format!("{e:#}")))));
                }
                Ok(Some(inputs)) => self.prefill_one(lane, model, id, chunk, Some(inputs), ended),
                Ok(None) if alone_all => self.prefill_one(lane, model, id, chunk, None, ended),
                Ok(None) => batch.push((id, chunk, state && resumes_state(s))),
            }
        }
        let lens: Vec<usize> = batch.iter().map(|&(_, n, _)| n).collect();
        let fixed: Vec<bool> = batch.iter().map(|&(_, _, f)| f).collect();
        let batch: Vec<(u64, usize)> = batch.into_iter().map(|(id, n, _)| (id, n)).collect();
        for g in groups(&lens, &fixed) {
            let rows: Vec<(u64, usize)> = g.iter().map(|&k| batch[k]).collect();
            self.prefill_rows(lane, model, &rows, ended);
        }
    }

    /// One batched forward of `rows` (id, chunk); row by row if it fails.
    fn prefill_rows(&mut self, lane: &LaneId, model: &mut LoadedModel, rows: &[(u64, usize)], ended: &mut Vec<Ended>) {
        if let [(id, chunk)] = rows {
            return self.prefill_one(lane, model, *id, *chunk, None, ended);
        }
        let rows: Vec<(u64, usize)> = rows.iter().copied().filter(|(id, _)| self.running.iter().any(|s| s.id == *id)).collect();
        if rows.len() < 2 {
            return rows.iter().for_each(|&(id, chunk)| self.prefill_one(lane, model, id, chunk, None, ended));
        }
        let idx: Vec<usize> = rows.iter().map(|(id, _)| self.running.iter().position(|s| s.id == *id).expect("checked above")).collect();
        let lens: Vec<usize> = rows.iter().map(|&(_, n)| n).collect();
        let starts: Vec<usize> = idx.iter().map(|&i| self.running[i].cached()).collect();
        let hidden = self.prompt_conditioning(model, &idx);
        let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
        let r = {
            // Borrow the rows mutably, in group order.
            let mut refs: Vec<Option<&mut Sequence>> = self.running.iter_mut().map(Some).collect();
            let mut seqs: Vec<&mut Sequence> = idx.iter().map(|&i| refs[i].take().expect("distinct rows")).collect();
            ragged_forward(model, pool, &mut seqs, &lens, hidden)
        };
        match r {
            Ok(hidden) => {
                self.stats.prefill_forwards += 1;
                self.stats.prefill_chunks += rows.len() as u64;
                let fed: Vec<(u64, usize, usize)> = rows.iter().zip(&starts).map(|(&(id, n), &a)| (id, a, n)).collect();
                self.feed_prompt(lane, model, &fed, &hidden);
                for &(id, _) in &rows {
                    self.prefilled(lane, id);
                }
            }
            Err(e) => {
                tracing::warn!("a batched prefill forward of {} rows failed ({e:#}); retrying row by row", rows.len());
                for &(id, chunk) in &rows {
                    self.prefill_one(lane, model, id, chunk, None, ended);
                }
            }
        }
    }

    /// One sequence's chunk alone (with its image features, if any); an
    /// error ends that sequence.
    fn prefill_one(&mut self, lane: &LaneId, model: &mut LoadedModel, id: u64, chunk: usize, inputs: Option<(Array, Array)>, ended: &mut Vec<Ended>) {
        let Some(i) = self.running.iter().position(|s| s.id == id) else { return };
        let hidden = if inputs.is_none() { self.prompt_conditioning(model, &[i]) } else { Vec::new() };
        let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
        let s = &mut self.running[i];
        let start = s.cached();
        let ids: Vec<i32> = s.tokens[start..start + chunk].iter().map(|&t| t as i32).collect();
        let input = Array::from_slice(&ids, &[1, chunk as i32]);
        let r = forward_rows_hidden(model, pool, &mut [s], input, &[chunk], inputs, false, hidden).and_then(|(l, h)| {
            l.eval()?;
            Ok(h)
        });
        self.stats.prefill_forwards += 1;
        self.stats.prefill_chunks += 1;
        match r {
            Err(e) => {
                let s = self.running.remove(i);
                ended.push((self.retire(s), Err(WorkerError::Internal(format!("{e:#}")))));
            }
            Ok(hidden) => {
                self.feed_prompt(lane, model, &[(id, start, chunk)], &hidden);
                self.prefilled(lane, id);
            }
        }
    }

    /// After a chunk of sequence `id` is in: once its whole prompt is, its
    /// blocks join the prefix cache (requests that come meanwhile share them).
    fn prefilled(&mut self, lane: &LaneId, id: u64) {
        let Some(i) = self.running.iter().position(|s| s.id == id) else { return };
        if self.cfg.prefix_cache && self.running[i].to_prefill() == 0 {
            let m = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr;
            cache_blocks(m, &mut self.running[i]);
        }
    }
}

/// Batched prefill, on unless `RMLX_BATCHED_PREFILL=0` (then every chunk
/// runs alone, as before issue 16: for comparisons and as an escape hatch).
fn batching() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RMLX_BATCHED_PREFILL").map(|v| v != "0").unwrap_or(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_bound_padding_rows_and_tokens() {
        // Similar lengths share one forward, longest first, arrival order among equals.
        assert_eq!(groups(&[40, 50, 45, 50], &[]), vec![vec![1, 3, 2, 0]]);
        // A short prompt beside long ones would be mostly padding: its own forward.
        assert_eq!(groups(&[512, 3, 500], &[]), vec![vec![0, 2], vec![1]]);
        // Padding within a quarter of B x L.
        for g in groups(&[100, 90, 80, 75, 70, 60, 30, 20, 20, 5], &[]) {
            let l = [100, 90, 80, 75, 70, 60, 30, 20, 20, 5][g[0]];
            let real: usize = g.iter().map(|&i| [100, 90, 80, 75, 70, 60, 30, 20, 20, 5][i]).sum();
            assert!((g.len() * l - real) as f64 <= 0.25 * (g.len() * l) as f64, "{g:?}");
        }
        // At most MAX_ROWS rows and MAX_TOKENS tokens a forward.
        let gs = groups(&[8; 40], &[]);
        assert_eq!(gs.iter().map(Vec::len).collect::<Vec<_>>(), vec![16, 16, 8]);
        let gs = groups(&[2048; 9], &[]);
        assert!(gs.iter().all(|g| g.len() * 2048 <= MAX_TOKENS), "{gs:?}");
        assert_eq!(groups(&[], &[]), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn rows_that_resume_a_state_are_never_padded() {
        // Fixed rows (they resume a recurrent state) share a forward only
        // with rows no longer than themselves; fresh rows may be padded.
        let lens = [16, 14, 16, 15, 13, 16];
        let fixed = [false, true, true, false, false, false];
        let gs = groups(&lens, &fixed);
        for g in &gs {
            let l = lens[g[0]];
            assert!(g.iter().all(|&i| !fixed[i] || lens[i] == l), "{gs:?}");
        }
        // The 16s (the fixed one first) take the fresh 15 and 13; the fixed 14 starts its own.
        assert_eq!(gs, vec![vec![2, 0, 5, 3], vec![1, 4]]);
        // Fixed rows of equal length share one forward with nothing padded.
        assert_eq!(groups(&[8, 8, 8], &[true, true, true]), vec![vec![0, 1, 2]]);
    }
}
