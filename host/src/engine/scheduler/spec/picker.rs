//! Picking a drafter's drafts in the server's speculative step (forward.rs):
//! after each draft step, each drafting row's next draft, on the device for
//! greedy rows (one host read per step), on the host for rows that sample
//! or mask with a fork of their logits hook, as plain decoding would.
use super::super::super::sampler::{argmax, Sampler};
use super::super::super::sequence::Sequence;
use super::super::super::speculative::accept::draw;
use super::super::super::worker::LogitsHook;
use super::targets::caught;
use super::SpecRowPlan;
use anyhow::Result;
use mlx_rs::{
    ops::{concatenate, indexing::argmax_axis},
    transforms::async_eval,
    Array, Dtype,
};

/// Picks each drafting row's next draft from a draft step's logits
/// [B_d, 1, V]: greedy rows by the argmax on the device (no host read), a
/// row that samples or has a hook on the host, as plain decoding would
/// (processors, then the hook fork's mask; drawn from q or the argmax).
pub(super) struct Picker {
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
    pub(super) qs: Vec<Vec<Vec<f32>>>,
    dev_drafts: Vec<Array>,
    /// The next draft step's input [B_d, 1]: each row's last token, then its latest draft.
    pub(super) input: Array,
}

impl Picker {
    pub(super) fn new(running: &[Sequence], plan: &[SpecRowPlan], drafting: &[usize], d_idx: &[usize], k_max: usize) -> Self {
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
    pub(super) fn pick(&mut self, running: &mut [Sequence], plan: &[SpecRowPlan], logits: &Array) -> Result<()> {
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
    pub(super) fn body(&self) -> Result<Array> {
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

