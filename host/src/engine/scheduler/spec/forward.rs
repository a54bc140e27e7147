//! The forwards of a speculative step (see spec.rs): the drafts (a draft
//! model's catch-up and k_max batched draft steps over the lane's draft
//! pool, or a drafter head's seed and chained steps, head.rs), then the
//! model's one `[B, k_max + 1]` verify forward, which also returns the
//! hidden states a head conditions on and the recurrent state, read back
//! for acceptance.
use super::super::super::attend::ForwardRequest;
use super::super::super::kv_pool::KvPool;
use super::super::super::paged::{PagedForward, Row};
use super::super::super::recurrent::{self, RowState};
use super::super::super::sampler::{argmax, Sampler};
use super::super::super::sequence::Sequence;
use super::super::super::speculative::{
    accept::draw,
    serve::{Drafter, HeadSeed, SpecRow},
};
use super::super::super::worker::LogitsHook;
use super::super::super::LoadedModel;
use super::super::{LaneId, Scheduler};
use super::head;
use super::targets::caught;
use super::SpecRowPlan;
use anyhow::{Context, Result};
use rmlx_plugin_api::author::Output;
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
    pub(super) fn run_spec(&mut self, lane: &LaneId, model: &mut LoadedModel, drafter: &mut Drafter, plan: &[SpecRowPlan]) -> Result<Verified> {
        let k_max = plan.iter().map(|p| p.k).max().unwrap_or(0);
        let idx: Vec<usize> = plan.iter().map(|p| self.running.iter().position(|s| s.id == p.id).expect("a planned row runs")).collect();
        let drafting: Vec<usize> = (0..plan.len()).filter(|&r| plan[r].k > 0).collect();
        let d_idx: Vec<usize> = drafting.iter().map(|&r| idx[r]).collect();
        let mut picker = Picker::new(&self.running, plan, &drafting, &d_idx, k_max);
        let mut draft_states: Vec<Vec<RowState>> = vec![Vec::new(); d_idx.len()];
        if let Some(bd) = drafter.block {
            // A block drafter: every draft of a row from one forward over
            // its own context store (dflash.rs), picked position by position.
            if !d_idx.is_empty() {
                let ks: Vec<usize> = drafting.iter().map(|&r| plan[r].k).collect();
                let account = self.account.clone();
                let logits = super::dflash::propose(&mut drafter.model, bd, &mut self.running, &d_idx, &ks, k_max, &account)?; // [B_d, k_max, V]
                for j in 0..k_max as i32 {
                    // A gathered copy, not a strided view: host rows read it as a slice.
                    picker.pick(&mut self.running, plan, &take_axis(&logits, Array::from_slice(&[j], &[1]), 1)?)?;
                }
            }
        } else if drafter.is_head() {
            let l = self.lanes.get_mut(lane).expect("the lane exists");
            let dpool = &mut l.draft.as_mut().expect("made by plan").pool;
            // A drafter head: the first draft from each row's seed, each next
            // one from a chained head step on the draft before and the
            // head's own state.
            if !d_idx.is_empty() {
                let seeds = |f: fn(&HeadSeed) -> &Array| -> Result<Array> {
                    let parts: Vec<Array> = d_idx.iter().map(|&i| f(self.running[i].spec.as_ref().and_then(|sp| sp.seed.as_ref()).expect("a drafting head row has its seed")).clone()).collect();
                    Ok(concatenate(&parts, 0)?) // [B_d, 1, X]
                };
                let (mut lg, mut st) = (seeds(|h| &h.logits)?, seeds(|h| &h.state)?);
                for j in 0..k_max {
                    if j > 0 {
                        let mut rows = rows_of(&mut self.running, &d_idx);
                        (lg, st) = head::step(&mut drafter.model, dpool, &mut rows, picker.input.clone(), st)?;
                    }
                    picker.pick(&mut self.running, plan, &lg)?;
                }
            }
        } else {
            let l = self.lanes.get_mut(lane).expect("the lane exists");
            let dpool = &mut l.draft.as_mut().expect("made by plan").pool;
            let chunk = idx.iter().map(|&i| self.running[i].params.prefill_chunk).min().unwrap_or(512).max(1);
            catch_up(&mut self.running, &d_idx, &mut drafter.model, dpool, chunk)?;
            // k_max draft steps, [B_d, 1] each, for every drafting row at
            // once; a draft model with state layers keeps each step's state.
            let keep = drafter.model.has_state();
            for _ in 0..k_max {
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
        // The verify input [B, k_max + 1]: each row's last token, then its
        // drafts (padding: a non-drafting row repeats its last token).
        let b = plan.len() as i32;
        let lasts_all: Vec<i32> = idx.iter().map(|&i| *self.running[i].tokens.last().unwrap() as i32).collect();
        let lasts_all = Array::from_slice(&lasts_all, &[b, 1]);
        let input = if k_max == 0 {
            lasts_all // [B, 1]: rows only feeding their heads
        } else {
            let pos_in_d: Vec<i32> = (0..plan.len()).map(|r| drafting.iter().position(|&x| x == r).unwrap_or(0) as i32).collect();
            let body = picker.body()?; // [B_d, k_max]
            let body = take_axis(&body, Array::from_slice(&pos_in_d, &[b]), 0)?; // [B, k_max]
            let is_d: Vec<bool> = (0..plan.len()).map(|r| plan[r].k > 0).collect();
            let body = select(Array::from_slice(&is_d, &[b, 1]), &body, &lasts_all)?;
            concatenate(&[lasts_all, body], 1)? // [B, k_max + 1]
        };
        let width = k_max + 1;
        let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
        // The verifier returns the layers the head conditions on in the same
        // forward, and its recurrent state (kept per row, split below).
        let mut asked = drafter.conditioning.clone();
        asked.sort_unstable();
        asked.dedup();
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
        let cond = if drafter.is_head() {
            let parts = drafter
                .conditioning
                .iter()
                .map(|l| out.hidden.iter().find(|(h, _)| h == l).map(|(_, a)| a.clone()))
                .collect::<Option<Vec<_>>>()
                .context("the verifier did not return the hidden states the drafter head conditions on")?;
            Some(if parts.len() == 1 { parts[0].clone() } else { concatenate(&parts, -1)? }) // [B, k_max + 1, C]
        } else {
            None
        };
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
            // A row drafting fewer than k_max keeps the distributions of its own drafts.
            let mut q = drafting.iter().position(|&x| x == r).map(|j| std::mem::take(&mut picker.qs[j])).unwrap_or_default();
            q.truncate(plan[r].k);
            let state = new_states
                .iter()
                .map(|(&layer, st)| Ok((layer, recurrent::row(st, r, plan.len())?)))
                .collect::<Result<RowState, rmlx_plugin_api::PluginError>>()
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let draft_states = drafting.iter().position(|&x| x == r).map(|j| std::mem::take(&mut draft_states[j])).unwrap_or_default();
            out.rows.push(VerifiedRow { drafts, best, q, logits: logits_of[r].take(), state, draft_states });
        }
        Ok(out)
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

/// Picks each drafting row's next draft from a draft step's logits
/// [B_d, 1, V]: greedy rows by the argmax on the device (no host read), a
/// row that samples or has a hook on the host, as plain decoding would
/// (processors, then the hook fork's mask; drawn from q or the argmax).
struct Picker {
    /// Plan rows and running indices of the drafting rows.
    drafting: Vec<usize>,
    d_idx: Vec<usize>,
    /// Host mode: a row samples its drafts or masks them with its hook.
    host: bool,
    samplers: Vec<Option<Sampler>>,
    /// A fork of each hooked row's hook, committed with its drafts (a row
    /// whose fork fails or ends drafts on unmasked: the verify step's own
    /// fork decides what is kept).
    hooks: Vec<Option<Box<dyn LogitsHook>>>,
    /// Per drafting row: its drafts (host mode) and the distributions they came from.
    drafts_host: Vec<Vec<u32>>,
    qs: Vec<Vec<Vec<f32>>>,
    dev_drafts: Vec<Array>,
    /// The next draft step's input [B_d, 1]: each row's last token, then its latest draft.
    input: Array,
}

impl Picker {
    fn new(running: &[Sequence], plan: &[SpecRowPlan], drafting: &[usize], d_idx: &[usize], k_max: usize) -> Self {
        let lasts: Vec<i32> = d_idx.iter().map(|&i| *running[i].tokens.last().unwrap() as i32).collect();
        Self {
            drafting: drafting.to_vec(),
            d_idx: d_idx.to_vec(),
            host: drafting.iter().any(|&r| plan[r].sampled || plan[r].hooked),
            samplers: drafting.iter().map(|&r| (plan[r].sampled || plan[r].hooked).then(|| running[d_idx_of(drafting, d_idx, r)].sampler().clone())).collect(),
            hooks: drafting.iter().map(|&r| if plan[r].hooked { running[d_idx_of(drafting, d_idx, r)].fork_hook() } else { None }).collect(),
            drafts_host: vec![Vec::with_capacity(k_max); d_idx.len()],
            qs: vec![Vec::new(); d_idx.len()],
            dev_drafts: Vec::with_capacity(k_max),
            input: Array::from_slice(&lasts, &[lasts.len() as i32, 1]),
        }
    }

    /// Picks from `logits` [B_d, 1, V]; the picks become `input`.
    fn pick(&mut self, running: &mut [Sequence], plan: &[SpecRowPlan], logits: &Array) -> Result<()> {
        let bd = self.d_idx.len() as i32;
        if !self.host {
            let d = argmax_axis(logits.reshape(&[bd, -1])?, -1, None)?.as_dtype(Dtype::Int32)?.reshape(&[bd, 1])?;
            async_eval([&d])?;
            self.dev_drafts.push(d.clone());
            self.input = d;
            return Ok(());
        }
        let v = logits.dim(-1) as usize;
        let l = logits.as_dtype(Dtype::Float32)?;
        l.eval()?;
        let all = l.try_as_slice::<f32>()?;
        let mut next = Vec::with_capacity(self.d_idx.len());
        for (j, row) in all.chunks(v).enumerate() {
            let (rd, i) = (self.drafting[j], self.d_idx[j]);
            let t = match self.samplers[j].as_mut() {
                Some(sm) => {
                    // As plain decoding: processors, then the hook's mask.
                    let mut lg = row.to_vec();
                    sm.process(&mut lg);
                    if let Some(h) = self.hooks[j].as_mut() {
                        if caught(|| h.apply(&mut lg)).is_err() {
                            self.hooks[j] = None;
                        }
                    }
                    let t = if plan[rd].sampled {
                        let q = sm.distribution(&lg);
                        let sp = running[i].spec.as_mut().expect("drafting");
                        let t = draw(&q, &mut sp.rng).unwrap_or_else(|| argmax(&lg));
                        self.qs[j].push(q);
                        t
                    } else {
                        argmax(&lg)
                    };
                    sm.accept(t);
                    let s = &running[i];
                    if let Some(h) = self.hooks[j].as_mut() {
                        if s.eos_ids().contains(&t) || caught(|| h.commit(t)).is_err() || h.is_finished() {
                            self.hooks[j] = None;
                        }
                    }
                    t
                }
                None => argmax(row),
            };
            self.drafts_host[j].push(t);
            next.push(t as i32);
        }
        self.input = Array::from_slice(&next, &[bd, 1]);
        Ok(())
    }

    /// Every drafting row's drafts: [B_d, k_max].
    fn body(&self) -> Result<Array> {
        if self.host {
            let k = self.drafts_host.first().map_or(0, Vec::len) as i32;
            let v: Vec<i32> = self.drafts_host.iter().flat_map(|d| d.iter().map(|&t| t as i32)).collect();
            Ok(Array::from_slice(&v, &[self.d_idx.len() as i32, k]))
        } else {
            Ok(concatenate(&self.dev_drafts, 1)?)
        }
    }
}

/// The running index of plan row `r` among the drafting rows.
fn d_idx_of(drafting: &[usize], d_idx: &[usize], r: usize) -> usize {
    d_idx[drafting.iter().position(|&x| x == r).expect("a drafting row")]
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
    /// A drafter head's conditioning at every verified position, [B, width, C].
    pub(super) cond: Option<Array>,
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
