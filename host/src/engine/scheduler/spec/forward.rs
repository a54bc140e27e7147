//! The forwards of a speculative step (see spec.rs): the draft model's
//! catch-up and k_max batched draft steps over the lane's draft pool, then
//! the model's one `[B, k_max + 1]` verify forward, read back for acceptance.
use super::super::super::kv_pool::KvPool;
use super::super::super::paged::{PagedForward, Row};
use super::super::super::sampler::{argmax, Sampler};
use super::super::super::sequence::Sequence;
use super::super::super::speculative::{accept::draw, serve::SpecRow};
use super::super::super::worker::LogitsHook;
use super::super::super::LoadedModel;
use super::super::{LaneId, Scheduler};
use super::targets::caught;
use super::SpecRowPlan;
use anyhow::Result;
use mlx_rs::{
    ops::{
        concatenate,
        indexing::{argmax_axis, take_axis},
        select,
    },
    transforms::{async_eval, eval},
    Array, Dtype,
};

impl Scheduler {
    /// The drafts and the verify forward (nothing is emitted here).
    pub(super) fn run_spec(&mut self, lane: &LaneId, model: &mut LoadedModel, draft: &mut LoadedModel, plan: &[SpecRowPlan]) -> Result<Verified> {
        let k_max = plan.iter().map(|p| p.k).max().unwrap_or(0);
        let idx: Vec<usize> = plan.iter().map(|p| self.running.iter().position(|s| s.id == p.id).expect("a planned row runs")).collect();
        let drafting: Vec<usize> = (0..plan.len()).filter(|&r| plan[r].k > 0).collect();
        let chunk = idx.iter().map(|&i| self.running[i].params.prefill_chunk).min().unwrap_or(512).max(1);
        let l = self.lanes.get_mut(lane).expect("the lane exists");
        let dpool = &mut l.draft.as_mut().expect("made by plan").pool;
        // Catch-up: feed each drafting row the context tokens its draft KV
        // lacks (all but the last token), rows of equal need together.
        loop {
            let behind: Vec<usize> = drafting
                .iter()
                .copied()
                .filter(|&r| {
                    let s = &self.running[idx[r]];
                    s.spec.as_ref().expect("drafting").kv_len < s.tokens.len() - 1
                })
                .collect();
            let Some(n) = behind
                .iter()
                .map(|&r| {
                    let s = &self.running[idx[r]];
                    s.tokens.len() - 1 - s.spec.as_ref().expect("drafting").kv_len
                })
                .min()
            else {
                break;
            };
            let n = n.min(chunk);
            let mut ids = Vec::with_capacity(behind.len() * n);
            for &r in &behind {
                let s = &self.running[idx[r]];
                let at = s.spec.as_ref().expect("drafting").kv_len;
                ids.extend(s.tokens[at..at + n].iter().map(|&t| t as i32));
            }
            let input = Array::from_slice(&ids, &[behind.len() as i32, n as i32]);
            let mut rows: Vec<&mut SpecRow> = rows_of(&mut self.running, &behind.iter().map(|&r| idx[r]).collect::<Vec<_>>());
            draft_forward(draft, dpool, &mut rows, input)?.eval()?;
        }
        // k_max draft steps, [B_d, 1] each, for every drafting row at once.
        let d_idx: Vec<usize> = drafting.iter().map(|&r| idx[r]).collect();
        let bd = d_idx.len() as i32;
        let lasts: Vec<i32> = d_idx.iter().map(|&i| *self.running[i].tokens.last().unwrap() as i32).collect();
        // Host mode: a row samples its drafts or masks them with its hook.
        let host = drafting.iter().any(|&r| plan[r].sampled || plan[r].hooked);
        // Per drafting row: its drafts (host mode) and the distributions they came from.
        let mut drafts_host: Vec<Vec<u32>> = vec![Vec::with_capacity(k_max); d_idx.len()];
        let mut qs: Vec<Vec<Vec<f32>>> = vec![Vec::new(); d_idx.len()];
        let mut samplers: Vec<Option<Sampler>> = drafting
            .iter()
            .map(|&r| (plan[r].sampled || plan[r].hooked).then(|| self.running[idx[r]].sampler().clone()))
            .collect();
        // A fork of each hooked row's hook, committed with its drafts (a
        // row whose fork fails or ends drafts on unmasked: the verify step's
        // own fork decides what is kept).
        let mut hooks: Vec<Option<Box<dyn LogitsHook>>> = drafting.iter().map(|&r| if plan[r].hooked { self.running[idx[r]].fork_hook() } else { None }).collect();
        let mut dev_drafts: Vec<Array> = Vec::with_capacity(k_max);
        let mut input = Array::from_slice(&lasts, &[bd, 1]);
        for _ in 0..k_max {
            let mut rows = rows_of(&mut self.running, &d_idx);
            let logits = draft_forward(draft, dpool, &mut rows, input)?; // [B_d, 1, V]
            if host {
                let v = logits.dim(-1) as usize;
                let l = logits.as_dtype(Dtype::Float32)?;
                l.eval()?;
                let all = l.try_as_slice::<f32>()?;
                let mut next = Vec::with_capacity(d_idx.len());
                for (j, row) in all.chunks(v).enumerate() {
                    let rd = drafting[j];
                    let t = match samplers[j].as_mut() {
                        Some(sm) => {
                            // As plain decoding: processors, then the hook's mask.
                            let mut lg = row.to_vec();
                            sm.process(&mut lg);
                            if let Some(h) = hooks[j].as_mut() {
                                if caught(|| h.apply(&mut lg)).is_err() {
                                    hooks[j] = None;
                                }
                            }
                            let t = if plan[rd].sampled {
                                let q = sm.distribution(&lg);
                                let sp = self.running[idx[rd]].spec.as_mut().expect("drafting");
                                let t = draw(&q, &mut sp.rng).unwrap_or_else(|| argmax(&lg));
                                qs[j].push(q);
                                t
                            } else {
                                argmax(&lg)
                            };
                            sm.accept(t);
                            let s = &self.running[idx[rd]];
                            if let Some(h) = hooks[j].as_mut() {
                                if s.eos_ids().contains(&t) || caught(|| h.commit(t)).is_err() || h.is_finished() {
                                    hooks[j] = None;
                                }
                            }
                            t
                        }
                        None => argmax(row),
                    };
                    drafts_host[j].push(t);
                    next.push(t as i32);
                }
                input = Array::from_slice(&next, &[bd, 1]);
            } else {
                let d = argmax_axis(logits.reshape(&[bd, -1])?, -1, None)?.as_dtype(Dtype::Int32)?.reshape(&[bd, 1])?;
                async_eval([&d])?;
                dev_drafts.push(d.clone());
                input = d;
            }
        }
        // The verify input [B, k_max + 1]: each row's last token, then its
        // drafts (padding: a non-drafting row repeats its last token).
        let b = plan.len() as i32;
        let lasts_all: Vec<i32> = idx.iter().map(|&i| *self.running[i].tokens.last().unwrap() as i32).collect();
        let lasts_all = Array::from_slice(&lasts_all, &[b, 1]);
        let pos_in_d: Vec<i32> = (0..plan.len()).map(|r| drafting.iter().position(|&x| x == r).unwrap_or(0) as i32).collect();
        let body = if host {
            let v: Vec<i32> = drafts_host.iter().flat_map(|d| d.iter().map(|&t| t as i32)).collect();
            Array::from_slice(&v, &[bd, k_max as i32])
        } else {
            concatenate(&dev_drafts, 1)? // [B_d, k_max]
        };
        let body = take_axis(&body, Array::from_slice(&pos_in_d, &[b]), 0)?; // [B, k_max]
        let is_d: Vec<bool> = (0..plan.len()).map(|r| plan[r].k > 0).collect();
        let body = select(Array::from_slice(&is_d, &[b, 1]), &body, &lasts_all)?;
        let input = concatenate(&[lasts_all, body], 1)?; // [B, k_max + 1]
        let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
        let logits = {
            let rows: Vec<Row> = idx.iter().map(|&i| Row { table: &self.running[i].table, offset: self.running[i].kv_len }).collect();
            let mut paged = PagedForward::new(pool, &rows, k_max + 1)?;
            model.logits(&input, &mut paged, false)? // [B, k_max + 1, V]
        };
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
        let width = k_max + 1;
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
        let mut out = Verified { rows: Vec::with_capacity(plan.len()) };
        for r in 0..plan.len() {
            let drafts: Vec<u32> = inp[r * width + 1..r * width + 1 + plan[r].k].iter().map(|&t| t as u32).collect();
            let best: Vec<u32> = bst[r * width..r * width + plan[r].k + 1].iter().map(|&t| t as u32).collect();
            // A row drafting fewer than k_max keeps the distributions of its own drafts.
            let mut q = drafting.iter().position(|&x| x == r).map(|j| std::mem::take(&mut qs[j])).unwrap_or_default();
            q.truncate(plan[r].k);
            out.rows.push(VerifiedRow { drafts, best, q, logits: logits_of[r].take() });
        }
        Ok(out)
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
}

pub(super) struct Verified {
    pub(super) rows: Vec<VerifiedRow>,
}

/// The draft states of `running[i]` for each i in `idx` (distinct), in order.
fn rows_of<'a>(running: &'a mut [Sequence], idx: &[usize]) -> Vec<&'a mut SpecRow> {
    let mut refs: Vec<Option<&mut Sequence>> = running.iter_mut().map(Some).collect();
    idx.iter()
        .map(|&i| &mut **refs[i].take().expect("distinct rows").spec.as_mut().expect("a drafting row has its state"))
        .collect()
}

/// One forward of the draft model: `input` [B, L] after each row's draft
/// KV; logits [B, 1, V] of the last position, lazily. The rows' draft
/// lengths advance by L.
fn draft_forward(draft: &mut LoadedModel, pool: &mut KvPool, rows: &mut [&mut SpecRow], input: Array) -> Result<Array> {
    let len = input.dim(1) as usize;
    let logits = {
        let r: Vec<Row> = rows.iter().map(|d| Row { table: &d.table, offset: d.kv_len }).collect();
        let mut paged = PagedForward::new(pool, &r, len)?;
        draft.logits(&input, &mut paged, true)?
    };
    for d in rows.iter_mut() {
        d.kv_len += len;
    }
    Ok(logits)
}
