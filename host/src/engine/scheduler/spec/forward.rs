//! The forwards of a speculative step (see spec.rs): each drafter's drafts
//! for its own rows, one drafter after the other (a draft model's catch-up
//! and k_d batched draft steps over its pool of the lane, a drafter head's
//! seed and chained steps, head.rs, or a block drafter's one forward per
//! row, dflash.rs), then the model's one `[B, k_max + 1]` verify forward
//! for every row, which also returns the hidden states the heads condition
//! on (the union of their layers) and the recurrent state, read back for
//! acceptance.
use super::super::super::attend::ForwardRequest;
use super::super::super::kv_pool::KvPool;
use super::super::super::paged::{PagedForward, Row};
use super::super::super::recurrent::{self, RowState};
use super::super::super::sequence::Sequence;
use super::super::super::speculative::serve::{Drafter, HeadSeed, SpecRow};
use super::super::super::LoadedModel;
use super::super::{LaneId, Scheduler};
use super::head;
use super::picker::Picker;
use super::SpecRowPlan;
use anyhow::{Context, Result};
use rmlx_plugin_api::author::Output;
use mlx_rs::{
    ops::{
        broadcast_to, concatenate,
        indexing::{argmax_axis, take_axis},
        select,
    },
    transforms::eval,
    Array, Dtype,
};

impl Scheduler {
    /// The drafts and the verify forward (nothing is emitted here).
    pub(super) fn run_spec(&mut self, lane: &LaneId, model: &mut LoadedModel, drafters: &mut [Drafter], plan: &[SpecRowPlan]) -> Result<Verified> {
        let k_max = plan.iter().map(|p| p.k).max().unwrap_or(0);
        let idx: Vec<usize> = plan.iter().map(|p| self.running.iter().position(|s| s.id == p.id).expect("a planned row runs")).collect();
        let b = plan.len() as i32;
        let lasts: Vec<i32> = idx.iter().map(|&i| *self.running[i].tokens.last().unwrap() as i32).collect();
        // Each drafter drafts for its own rows: `order` lists the drafting
        // rows (plan rows) in the order of `bodies`' rows, [B_g, k_max] each.
        let mut order: Vec<usize> = Vec::new();
        let mut bodies: Vec<Array> = Vec::new();
        let mut qs: Vec<Vec<Vec<f32>>> = vec![Vec::new(); plan.len()];
        let mut draft_states: Vec<Vec<RowState>> = vec![Vec::new(); plan.len()];
        for (d, drafter) in drafters.iter_mut().enumerate() {
            let drafting: Vec<usize> = (0..plan.len()).filter(|&r| plan[r].drafter == Some(d) && plan[r].k > 0).collect();
            if drafting.is_empty() {
                continue;
            }
            let body = self.draft_rows(lane, drafter, plan, &idx, &drafting, &mut qs, &mut draft_states)?; // [B_g, k_d]
            let (bg, kd) = (drafting.len() as i32, body.dim(1));
            // Past its drafter's k_d a row is padded with its last token.
            let body = if (kd as usize) < k_max {
                let own: Vec<i32> = drafting.iter().map(|&r| lasts[r]).collect();
                let pad = broadcast_to(Array::from_slice(&own, &[bg, 1]), &[bg, k_max as i32 - kd])?;
                concatenate(&[body, pad], 1)?
            } else {
                body
            };
            order.extend(&drafting);
            bodies.push(body);
        }
        // The verify input [B, k_max + 1]: each row's last token, then its
        // drafts (padding: a non-drafting row repeats its last token).
        let lasts_all = Array::from_slice(&lasts, &[b, 1]);
        let input = if k_max == 0 {
            lasts_all // [B, 1]: rows only feeding their heads
        } else {
            let pos: Vec<i32> = (0..plan.len()).map(|r| order.iter().position(|&x| x == r).unwrap_or(0) as i32).collect();
            let body = if bodies.len() == 1 { bodies.pop().expect("one") } else { concatenate(&bodies, 0)? }; // [B_d, k_max]
            let body = take_axis(&body, Array::from_slice(&pos, &[b]), 0)?; // [B, k_max]
            let is_d: Vec<bool> = (0..plan.len()).map(|r| plan[r].k > 0).collect();
            let body = select(Array::from_slice(&is_d, &[b, 1]), &body, &lasts_all)?;
            concatenate(&[lasts_all, body], 1)? // [B, k_max + 1]
        };
        let width = k_max + 1;
        // The heads that take this step's hidden states (rows feeding them).
        let feeds: Vec<bool> = (0..drafters.len()).map(|d| drafters[d].is_head() && plan.iter().any(|p| p.drafter == Some(d) && p.head)).collect();
        // The verifier returns the union of those heads' conditioning layers
        // in the same forward, and its recurrent state (kept per row, split below).
        let mut asked: Vec<u32> = drafters.iter().zip(&feeds).filter(|(_, &f)| f).flat_map(|(d, _)| d.conditioning.iter().copied()).collect();
        asked.sort_unstable();
        asked.dedup();
        let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
        let (out, new_states) = {
            let rows: Vec<Row> = idx.iter().map(|&i| Row { table: &self.running[i].table, offset: self.running[i].kv_len }).collect();
            let mut paged = PagedForward::new(pool, &rows, width)?;
            if model.has_state() {
                paged = paged.with_states(idx.iter().map(|&i| &self.running[i].state).collect());
            }
            let req = ForwardRequest { output: Some(Output::AllLogits), hidden_layers: asked, ..ForwardRequest::default() };
            let out = model.run(&input, &mut paged, req)?; // logits [B, k_max + 1, V]
            (out, paged.take_states())
        };
        // Each head's conditioning, its layers in its own order: [B, k_max + 1, C_d].
        let mut cond: Vec<Option<Array>> = Vec::with_capacity(drafters.len());
        for (drafter, &f) in drafters.iter().zip(&feeds) {
            if !f {
                cond.push(None);
                continue;
            }
            let parts = drafter
                .conditioning
                .iter()
                .map(|l| out.hidden.iter().find(|(h, _)| h == l).map(|(_, a)| a.clone()))
                .collect::<Option<Vec<_>>>()
                .context("the verifier did not return the hidden states the drafter head conditions on")?;
            cond.push(Some(if parts.len() == 1 { parts[0].clone() } else { concatenate(&parts, -1)? }));
        }
        let logits = out.out;
        let best = argmax_axis(&logits, -1, None)?.as_dtype(Dtype::Int32)?; // [B, k_max + 1]
        // Rows that read logits on the host: sampling drafters, and the
        // non-drafting rows that do not take the device's argmax as it is.
        let host_rows: Vec<usize> = (0..plan.len())
            .filter(|&r| {
                let s = &self.running[idx[r]];
                if plan[r].k > 0 {
                    plan[r].host
                } else {
                    !(s.takes_device_token() && s.device_bias().is_empty())
                }
            })
            .collect();
        let sub = if host_rows.is_empty() {
            None
        } else {
            let ix: Vec<i32> = host_rows.iter().map(|&r| r as i32).collect();
            Some(take_axis(&logits, Array::from_slice(&ix, &[ix.len() as i32]), 0)?.as_dtype(Dtype::Float32)?)
        };
        match &sub {
            Some(s) => eval([&input, &best, s])?,
            None => eval([&input, &best])?,
        }
        let inp = input.try_as_slice::<i32>()?;
        let bst = best.try_as_slice::<i32>()?;
        let mut logits_of: Vec<Option<Vec<Vec<f32>>>> = vec![None; plan.len()];
        if let Some(s) = &sub {
            let v = s.dim(-1) as usize;
            let all = s.try_as_slice::<f32>()?;
            for (j, &r) in host_rows.iter().enumerate() {
                let rows = all[j * width * v..(j + 1) * width * v].chunks(v).map(|c| c.to_vec()).collect();
                logits_of[r] = Some(rows);
            }
        }
        let mut out = Verified { rows: Vec::with_capacity(plan.len()), width, cond };
        for r in 0..plan.len() {
            let drafts: Vec<u32> = inp[r * width + 1..r * width + 1 + plan[r].k].iter().map(|&t| t as u32).collect();
            let best: Vec<u32> = bst[r * width..r * width + plan[r].k + 1].iter().map(|&t| t as u32).collect();
            // A row drafting fewer than its drafter's k_d keeps the distributions of its own drafts.
            let mut q = std::mem::take(&mut qs[r]);
            q.truncate(plan[r].k);
            let state = new_states
                .iter()
                .map(|(&layer, st)| Ok((layer, recurrent::row(st, r, plan.len())?)))
                .collect::<Result<RowState, rmlx_plugin_api::PluginError>>()
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let draft_states = std::mem::take(&mut draft_states[r]);
            out.rows.push(VerifiedRow { drafts, best, q, logits: logits_of[r].take(), state, draft_states });
        }
        Ok(out)
    }

    /// `drafter`'s drafts for its drafting rows `drafting` (plan rows;
    /// `idx`: every plan row's running index): [B_g, k_d], k_d the most its
    /// rows draft (a row drafting fewer is padded with its own later
    /// drafts). Each row's draft distributions (sampling rows) go to
    /// `qs[r]`, a draft model's state after each draft step to `states[r]`.
    #[allow(clippy::too_many_arguments)]
    fn draft_rows(&mut self, lane: &LaneId, drafter: &mut Drafter, plan: &[SpecRowPlan], idx: &[usize], drafting: &[usize], qs: &mut [Vec<Vec<f32>>], states: &mut [Vec<RowState>]) -> Result<Array> {
        let k_d = drafting.iter().map(|&r| plan[r].k).max().unwrap_or(0);
        let d_idx: Vec<usize> = drafting.iter().map(|&r| idx[r]).collect();
        let mut picker = Picker::new(&self.running, plan, drafting, &d_idx, k_d);
        let mut draft_states: Vec<Vec<RowState>> = vec![Vec::new(); d_idx.len()];
        if let Some(bd) = drafter.block {
            // A block drafter: every draft of a row from one forward over
            // its own context store (dflash.rs), picked position by position.
            let ks: Vec<usize> = drafting.iter().map(|&r| plan[r].k).collect();
            let account = self.account.clone();
            let logits = super::dflash::propose(&mut drafter.model, bd, &mut self.running, &d_idx, &ks, k_d, &account)?; // [B_d, k_d, V]
            for j in 0..k_d as i32 {
                // A gathered copy, not a strided view: host rows read it as a slice.
                picker.pick(&mut self.running, plan, &take_axis(&logits, Array::from_slice(&[j], &[1]), 1)?)?;
            }
        } else if drafter.is_head() {
            let l = self.lanes.get_mut(lane).expect("the lane exists");
            let dpool = &mut l.drafts.get_mut(&drafter.kind).expect("made by plan").pool;
            // A drafter head: the first draft from each row's seed, each next
            // one from a chained head step on the draft before and the
            // head's own state.
            let seeds = |f: fn(&HeadSeed) -> &Array| -> Result<Array> {
                let parts: Vec<Array> = d_idx.iter().map(|&i| f(self.running[i].spec.as_ref().and_then(|sp| sp.seed.as_ref()).expect("a drafting head row has its seed")).clone()).collect();
                Ok(concatenate(&parts, 0)?) // [B_d, 1, X]
            };
            let (mut lg, mut st) = (seeds(|h| &h.logits)?, seeds(|h| &h.state)?);
            for j in 0..k_d {
                if j > 0 {
                    let mut rows = rows_of(&mut self.running, &d_idx);
                    (lg, st) = head::step(&mut drafter.model, dpool, &mut rows, picker.input.clone(), st)?;
                }
                picker.pick(&mut self.running, plan, &lg)?;
            }
        } else {
            let l = self.lanes.get_mut(lane).expect("the lane exists");
            let dpool = &mut l.drafts.get_mut(&drafter.kind).expect("made by plan").pool;
            let chunk = d_idx.iter().map(|&i| self.running[i].params.prefill_chunk).min().unwrap_or(512).max(1);
            catch_up(&mut self.running, &d_idx, &mut drafter.model, dpool, chunk)?;
            // k_d draft steps, [B_d, 1] each, for every drafting row at
            // once; a draft model with state layers keeps each step's state.
            let keep = drafter.model.has_state();
            for _ in 0..k_d {
                let mut rows = rows_of(&mut self.running, &d_idx);
                let logits = draft_forward(&mut drafter.model, dpool, &mut rows, picker.input.clone())?; // [B_d, 1, V]
                if keep {
                    for (j, r) in rows.iter().enumerate() {
                        draft_states[j].push(r.state.clone());
                    }
                }
                picker.pick(&mut self.running, plan, &logits)?;
            }
        }
        for (j, &r) in drafting.iter().enumerate() {
            qs[r] = std::mem::take(&mut picker.qs[j]);
            states[r] = std::mem::take(&mut draft_states[j]);
        }
        picker.body()
    }
}

/// The draft model catches up with each drafting row's context: the tokens
/// its draft KV lacks (all but the last token), rows of equal need together.
fn catch_up(running: &mut [Sequence], d_idx: &[usize], draft: &mut LoadedModel, dpool: &mut KvPool, chunk: usize) -> Result<()> {
    let behind_by = |s: &Sequence| (s.tokens.len() - 1).saturating_sub(s.spec.as_ref().expect("drafting").kv_len);
    loop {
        let behind: Vec<usize> = d_idx.iter().copied().filter(|&i| behind_by(&running[i]) > 0).collect();
        let Some(n) = behind.iter().map(|&i| behind_by(&running[i])).min() else {
            return Ok(());
        };
        let n = n.min(chunk);
        let mut ids = Vec::with_capacity(behind.len() * n);
        for &i in &behind {
            let s = &running[i];
            let at = s.spec.as_ref().expect("drafting").kv_len;
            ids.extend(s.tokens[at..at + n].iter().map(|&t| t as i32));
        }
        let input = Array::from_slice(&ids, &[behind.len() as i32, n as i32]);
        let mut rows: Vec<&mut SpecRow> = rows_of(running, &behind);
        draft_forward(draft, dpool, &mut rows, input)?.eval()?;
    }
}

/// What the verify forward gave each row.
pub(super) struct VerifiedRow {
    /// Its k drafts, and the verifier's argmax at positions 0..=k.
    pub(super) drafts: Vec<u32>,
    pub(super) best: Vec<u32>,
    /// The drafter's distributions (sampling rows).
    pub(super) q: Vec<Vec<f32>>,
    /// Host logits of positions 0..=k_max (rows that read them: sampling,
    /// a hook or logprobs when drafting, else not taking the device token).
    pub(super) logits: Option<Vec<Vec<f32>>>,
    /// The verifier's recurrent state after all k_max + 1 positions (empty
    /// without state layers): the row's own when it keeps every position.
    pub(super) state: RowState,
    /// A draft model with state layers: its state after each draft step.
    pub(super) draft_states: Vec<RowState>,
}

pub(super) struct Verified {
    pub(super) rows: Vec<VerifiedRow>,
    /// Positions verified per row (k_max + 1).
    pub(super) width: usize,
    /// Per drafter (the model's order): a head's conditioning at every
    /// verified position, [B, width, C_d], when some row feeds it.
    pub(super) cond: Vec<Option<Array>>,
}

/// The draft states of `running[i]` for each i in `idx` (distinct), in order.
pub(super) fn rows_of<'a>(running: &'a mut [Sequence], idx: &[usize]) -> Vec<&'a mut SpecRow> {
    let mut refs: Vec<Option<&mut Sequence>> = running.iter_mut().map(Some).collect();
    idx.iter()
        .map(|&i| &mut **refs[i].take().expect("distinct rows").spec.as_mut().expect("a drafting row has its state"))
        .collect()
}

/// One forward of the draft model: `input` [B, L] after each row's draft
/// KV; logits [B, 1, V] of the last position, lazily. The rows' draft
/// lengths advance by L.
pub(super) fn draft_forward(draft: &mut LoadedModel, pool: &mut KvPool, rows: &mut [&mut SpecRow], input: Array) -> Result<Array> {
    let len = input.dim(1) as usize;
    let (logits, states) = {
        let r: Vec<Row> = rows.iter().map(|d| Row { table: &d.table, offset: d.kv_len }).collect();
        let mut paged = PagedForward::new(pool, &r, len)?;
        if draft.has_state() {
            paged = paged.with_states(rows.iter().map(|d| &d.state).collect());
        }
        let logits = draft.logits(&input, &mut paged, true)?;
        (logits, paged.take_states())
    };
    // Its recurrent state, per row, once the forward succeeded.
    let b = rows.len();
    let per_row = (0..b)
        .map(|r| states.iter().map(|(&layer, st)| Ok((layer, recurrent::row(st, r, b)?))).collect::<Result<Vec<_>, rmlx_plugin_api::PluginError>>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    for (d, st) in rows.iter_mut().zip(per_row) {
        d.kv_len += len;
        d.state.extend(st);
    }
    Ok(logits)
}
