//! After a speculative step's acceptance (spec.rs), what each row that goes
//! on keeps of the verify forward beyond its K/V length:
//!
//! - **The verifier's recurrent state** (gated DeltaNet layers): the verify
//!   forward ran the state through all k_max + 1 positions. A row that
//!   keeps every one of them takes that state; any other (a draft
//!   rejected, fewer drafts than k_max, padding) keeps the state it had
//!   before the step (the sequence's own, which the forward only lent) and
//!   feeds its kept tokens `[last, d_1 .. d_n]` again: one forward per
//!   number of kept tokens, rows of equal need batched (decode.rs
//!   `forward_with`, which also snapshots the state at a block boundary for
//!   the prefix cache). The K/V those forwards write is what the verify
//!   forward wrote there. Should such a forward fail, the rows keep their
//!   length before the step and the scheduler's prefill feeds the kept
//!   tokens at the next step (`to_prefill`).
//! - **A draft model's recurrent state**: each draft step's state was kept;
//!   the row takes the one of the step its kept length ends at.
//! - **A drafter head**: its chained entries are dropped (its length goes
//!   back to where the step began) and the kept tokens and the verifier's
//!   next one go in with the verify forward's hidden states at their
//!   previous positions (head.rs `feed`); its last output is the next seed.
//!   With several drafters each head takes its own rows, with its own
//!   layers of the verify forward's hidden states.
use super::super::super::decode::forward_with;
use super::super::super::recurrent::{self, RowState};
use super::super::super::sequence::Sequence;
use super::super::super::speculative::serve::{Drafter, HeadSeed, SpecRow};
use super::super::super::LoadedModel;
use super::super::{LaneId, Scheduler};
use super::{forward::rows_of, head, SpecRowPlan};
use mlx_rs::{ops::indexing::TryIndexOp, Array};
use std::collections::BTreeMap;

impl Scheduler {
    /// See the module doc. `states[r]`: plan row r's state after the verify
    /// forward; `cond[d]` [B, width, C_d]: drafter d's conditioning, when a
    /// head of its rows takes it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(&mut self, lane: &LaneId, model: &mut LoadedModel, drafters: &mut [Drafter], plan: &[SpecRowPlan], states: Vec<(RowState, Vec<RowState>)>, cond: Vec<Option<Array>>, width: usize) {
        // Rows that go on: (plan row, running index, tokens kept this step).
        let going: Vec<(usize, usize, usize)> = plan
            .iter()
            .enumerate()
            .filter_map(|(r, p)| {
                let i = self.running.iter().position(|s| s.id == p.id)?;
                Some((r, i, self.running[i].tokens.len() - 1 - p.kv))
            })
            .collect();
        // A draft model's state: the one its step at the kept length left
        // (its length went back to at most the context but its last token).
        for &(r, i, _) in &going {
            let Some(sp) = self.running[i].spec.as_mut() else { continue };
            let steps = &states[r].1;
            if plan[r].k > 0 && !steps.is_empty() {
                match (sp.kv_len).checked_sub(plan[r].kv).and_then(|j| j.checked_sub(1)).and_then(|j| steps.get(j)) {
                    Some(st) => sp.state = st.clone(),
                    None => {
                        sp.kv_len = 0; // not where a step ended: it starts over
                        sp.state.clear();
                    }
                }
            }
        }
        if model.has_state() {
            let bs = self.mgr(lane).block_size;
            // Feeds again, by number of kept tokens: (kept, running ids).
            let mut again: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
            for &(r, i, kept) in &going {
                let s = &mut self.running[i];
                if kept == width {
                    s.state.extend(states[r].0.clone());
                    s.state_tag = None;
                    if s.kv_len % bs == 0 {
                        if let Ok(snap) = recurrent::snapshot(&s.state) {
                            s.snapshot = Some((s.kv_len / bs, snap));
                        }
                    }
                } else {
                    s.kv_len = plan[r].kv;
                    again.entry(kept).or_default().push(s.id);
                }
            }
            for (n, ids) in again {
                self.feed_again(lane, model, &ids, n);
            }
        }
        for (d, cond) in cond.into_iter().enumerate() {
            let Some(cond) = cond else { continue };
            let heads: Vec<(usize, usize, usize)> = going.iter().copied().filter(|&(r, ..)| plan[r].head && plan[r].drafter == Some(d)).collect();
            if heads.is_empty() {
                continue;
            }
            if drafters[d].block.is_some() {
                self.settle_blocks(plan, &heads, &cond);
            } else {
                self.settle_head(lane, &mut drafters[d], plan, &heads, &cond);
            }
        }
    }

    /// A chained head's rows `heads` (plan row, running index, tokens kept):
    /// its chained entries go, the kept tokens and the verifier's next one
    /// go in with their hidden states from `cond` [B, width, C], and its last
    /// output is each row's next seed.
    fn settle_head(&mut self, lane: &LaneId, drafter: &mut Drafter, plan: &[SpecRowPlan], heads: &[(usize, usize, usize)], cond: &Array) {
        let mut tokens = Vec::with_capacity(heads.len());
        let mut conds = Vec::with_capacity(heads.len());
        for &(r, i, kept) in heads {
            let s = &mut self.running[i];
            tokens.push(s.tokens[plan[r].kv + 1..].to_vec());
            let (r32, n) = (r as i32, kept as i32);
            match cond.try_index((r32..r32 + 1, 0..n, ..)) {
                Ok(c) => conds.push(c), // [1, kept, C]
                Err(e) => {
                    tracing::warn!("a drafter head's conditioning could not be read ({e}); its heads start over");
                    return self.drop_heads(heads);
                }
            }
            // The chained entries go.
            s.spec.as_mut().expect("a head row has its state").kv_len = plan[r].draft_kv;
        }
        let idx: Vec<usize> = heads.iter().map(|&(_, i, _)| i).collect();
        let dpool = &mut self.lanes.get_mut(lane).and_then(|l| l.drafts.get_mut(&drafter.kind)).expect("made by plan").pool;
        let fed = {
            let mut rows: Vec<&mut SpecRow> = rows_of(&mut self.running, &idx);
            head::feed(&mut drafter.model, dpool, &mut rows, &tokens, &conds)
        };
        match fed {
            Ok(seeds) => {
                for (&i, (logits, state)) in idx.iter().zip(seeds) {
                    let s = &mut self.running[i];
                    let at = s.tokens.len() - 1;
                    let sp = s.spec.as_mut().expect("a head row has its state");
                    sp.seed = Some(HeadSeed { logits, state, at });
                    sp.ctx_at = at;
                }
            }
            Err(e) => {
                tracing::warn!("a drafter head's forward failed ({e:#}); its rows' heads start over");
                self.drop_heads(heads);
            }
        }
    }

    /// A block drafter's rows: the kept positions `[last, kept drafts]` and
    /// their hidden states (`cond` [B, width, C]) wait in each row's
    /// context for its next drafter forward (dflash.rs).
    fn settle_blocks(&mut self, plan: &[SpecRowPlan], heads: &[(usize, usize, usize)], cond: &Array) {
        for &(r, i, kept) in heads {
            let s = &mut self.running[i];
            let kv = plan[r].kv;
            let tokens = s.tokens[kv..kv + kept].to_vec();
            let (r32, n) = (r as i32, kept as i32);
            let Some(sp) = s.spec.as_mut() else { continue };
            let Some(ctx) = sp.block.as_mut() else { continue };
            if sp.ctx_at != kv {
                continue; // not where its context ends: it starts over
            }
            let rows = cond.try_index((r32..r32 + 1, 0..n, ..)).map_err(anyhow::Error::from).and_then(|c| super::prompt::pending_with(ctx, &tokens, &c));
            match rows {
                Ok((toks, rows)) => {
                    ctx.tokens = toks;
                    ctx.pending = Some(rows);
                    sp.ctx_at = kv + kept;
                }
                Err(e) => {
                    tracing::warn!("a DFlash drafter's context could not be read ({e:#}); it starts over");
                    super::prompt::drop_block(sp, &self.account);
                }
            }
        }
    }

    /// The rows' heads start over at their next step (no seed, no KV).
    fn drop_heads(&mut self, heads: &[(usize, usize, usize)]) {
        for &(_, i, _) in heads {
            if let Some(sp) = self.running[i].spec.as_mut() {
                sp.seed = None;
                sp.kv_len = 0;
                sp.ctx_at = usize::MAX;
            }
        }
    }

    /// Feeds rows `ids` their last `n` context tokens but the last (the
    /// tokens kept this step) in one forward, which advances their length
    /// and recurrent state. On an error they stay where they were and the
    /// prefill feeds those tokens at the next step.
    fn feed_again(&mut self, lane: &LaneId, model: &mut LoadedModel, ids: &[u64], n: usize) {
        let idx: Vec<usize> = ids.iter().filter_map(|id| self.running.iter().position(|s| s.id == *id)).collect();
        let mut toks = Vec::with_capacity(idx.len() * n);
        for &i in &idx {
            let s = &self.running[i];
            toks.extend(s.tokens[s.kv_len..s.kv_len + n].iter().map(|&t| t as i32));
        }
        let input = Array::from_slice(&toks, &[idx.len() as i32, n as i32]);
        let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
        let r = {
            let mut refs: Vec<Option<&mut Sequence>> = self.running.iter_mut().map(Some).collect();
            let mut seqs: Vec<&mut Sequence> = idx.iter().map(|&i| refs[i].take().expect("distinct rows")).collect();
            forward_with(model, pool, &mut seqs, input, None).and_then(|l| Ok(l.eval()?))
        };
        if let Err(e) = r {
            tracing::warn!("feeding {} rows' kept tokens again failed ({e:#}); the prefill feeds them", idx.len());
        }
    }
}
