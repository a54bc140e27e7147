//! A speculative decode step of one lane (issue 14, docs/SPECULATIVE.md):
//! each row that may speculate drafts k_i tokens with its own drafter (the
//! model may have several, one per kind: the request's `draft_kind`, else
//! the model's first), the model verifies every row in ONE forward of
//! `[B, k_max + 1]`, and each row keeps what accept.rs keeps.
//!
//! 1. Rows that may not speculate (the request's `num_draft_tokens: 0`,
//!    images, a logits hook that cannot be forked, a kind the loaded model
//!    lacks) have k_i = 0; the others start at their drafter's K and adapt
//!    per row (adapt.rs), never drafting more than their tokens left minus
//!    one (plan.rs).
//!    A row with a logits hook (constrained decoding, thinking budgets)
//!    drafts under a fork of its hook: each draft step's logits are
//!    processed and masked as plain decoding would, and the fork is
//!    committed with the draft (forward.rs). A row with logprobs reads the
//!    verifier's logits on the host.
//! 2. Blocks: each drafting row's draft table covers its catch-up and k_max
//!    draft tokens, every row's verifier table k_max + 1 tokens. Nothing is
//!    preempted for speculation: a row whose draft blocks do not come does
//!    not draft this step, and when the verifier's do not come the step is
//!    the plain one.
//! 3. Each drafter drafts for its own rows, one drafter after the other
//!    (forward.rs): a draft model's KV catches up with the context (tokens
//!    it has not seen: the whole prompt at first, then the last kept
//!    draft), batched by equal lengths, then k_d `[B_d, 1]` draft forwards
//!    run for all its drafting rows at once (k_d: the most its rows draft);
//!    a head chains from its rows' seeds, a block drafter proposes each
//!    row's block. Greedy rows' drafts stay on the device (argmax), so the
//!    step reads the host once; a row that samples draws each draft on the
//!    host from its own sampler chain (q_i).
//! 4. The verify forward is `[B, k_max + 1]` with every position's logits
//!    and the hidden states of the union of the heads' conditioning layers:
//!    a row with k_i < k_max is padded (its own later drafts, its last
//!    token past its drafter's k_d, or its last token for a row that does
//!    not draft). Padding sits after the row's real tokens, so causal
//!    attention keeps it out of the real positions, and it is rolled back
//!    with the rejected drafts.
//! 5. Per row: accept (greedy: the longest run of drafts equal to the
//!    verifier's argmax; sampling: rejection sampling with the row's
//!    seeded RNG), emit the kept tokens and the verifier's next one through
//!    the sequence's own per-token logic. A row that reads its logits on
//!    the host (sampling, a hook, logprobs) takes position j's target from
//!    targets.rs: the verifier's logits processed and masked by a fresh
//!    fork of its hook advanced through the kept drafts, so greedy output
//!    is token for token and sampled output distributed exactly as
//!    constrained plain decoding; each emitted token carries the logprobs
//!    of its position (`sampler::logprobs`, plain decoding's code). Then
//!    roll back: `kv_len` is the kept context in both caches, and blocks
//!    wholly past it go back to their managers. Rejected tokens never reach the prefix cache
//!    (`cache_blocks` reads only the first `kv_len` tokens).
//!
//! An error in a forward leaves every row as it was (lengths only move
//! after success); those rows stop speculating and the plain step runs.
mod dflash;
mod forward;
mod head;
mod picker;
mod plan;
mod prompt;
mod settle;
mod targets;

use super::super::block_manager::BlockManager;
use super::super::sequence::{Outcome, Sequence};
use super::super::worker::WorkerError;
use super::super::speculative::{
    accept::{accept_greedy, accept_greedy_with, accept_sampled},
    serve::{drafter_for, kind_label, Drafter},
};
use super::super::LoadedModel;
use super::{Ended, LaneId, Scheduler};
use forward::Verified;
use targets::Targets;

/// Puts the drafters back into their model however the step ends (a panic
/// included: the lane's sequences fail, the model keeps its drafters).
struct Split<'a> {
    model: &'a mut LoadedModel,
    drafters: Vec<Drafter>,
}

impl Drop for Split<'_> {
    fn drop(&mut self) {
        self.model.drafters = std::mem::take(&mut self.drafters);
    }
}

/// The drafter (an index into `drafters`) sequence `s` drafts with: the
/// kind its request names, else the model's first; None when it may not
/// speculate or the model has no drafter of its kind.
fn drafter_of(s: &Sequence, drafters: &[Drafter]) -> Option<usize> {
    if !s.may_speculate() {
        return None;
    }
    drafter_for(drafters, s.params.draft_kind)
}

/// One row of a speculative step.
struct SpecRowPlan {
    id: u64,
    /// Its drafter (an index into the model's drafters); None: it only decodes.
    drafter: Option<usize>,
    /// Draft tokens this row verifies (0: it only decodes).
    k: usize,
    /// Its verifier and draft lengths before the step.
    kv: usize,
    draft_kv: usize,
    /// Samples on the host (drafts drawn from q; rejection sampling).
    sampled: bool,
    /// Has a logits hook: drafts under a fork of it, verified on the host.
    hooked: bool,
    /// Verifies on the host (sampled, hooked, or asks for logprobs).
    host: bool,
    /// Feeds the model's drafter head this step (drafting or not): the
    /// kept tokens go into the head with the verifier's hidden states.
    head: bool,
}

impl Scheduler {
    /// Runs this step's decode of `lane` speculatively when it applies
    /// (the model has a drafter, the lane's decoding rows are at most
    /// `spec_max_batch`, one of them may speculate and gets its blocks).
    /// False: the caller runs the plain step (the previous pipelined
    /// tokens may have been handed out already).
    pub(super) fn spec_decode(&mut self, lane: &LaneId, model: &mut LoadedModel, ended: &mut Vec<Ended>) -> bool {
        if model.drafters.is_empty() {
            return false;
        }
        let rows = self.decoding_rows(lane);
        // Its usage reports draft counts (zero while the batch is too large).
        let mut any = false;
        for &i in &rows {
            let on = drafter_of(&self.running[i], &model.drafters).is_some();
            self.running[i].spec_on |= on;
            any |= on;
        }
        if rows.is_empty() || rows.len() > self.cfg.spec_max_batch || !any {
            return false;
        }
        let drafters = std::mem::take(&mut model.drafters);
        let mut split = Split { model, drafters };
        let Split { model, drafters } = &mut split;
        // The host reads the acceptance before the next step: no pipelining.
        if let Some(p) = self.lanes.get_mut(lane).and_then(|l| l.pending.take()) {
            self.take_pending_tokens(lane, &p, ended);
        }
        let Some(plan) = self.plan(lane, drafters) else { return false };
        self.stats.last_batch = plan.len();
        self.stats.max_batch = self.stats.max_batch.max(plan.len());
        match self.run_spec(lane, model, drafters, &plan) {
            Ok(out) => {
                self.emit_spec(lane, model, drafters, &plan, out, ended);
                true
            }
            Err(e) => {
                tracing::warn!("a speculative step of {} rows failed ({e:#}); those requests go on without speculation", plan.len());
                for p in &plan {
                    let Some(i) = self.running.iter().position(|s| s.id == p.id) else { continue };
                    let s = &mut self.running[i];
                    s.kv_len = p.kv;
                    if p.k > 0 {
                        s.params.num_draft_tokens = Some(0);
                    }
                    if let Some(sp) = s.spec.as_mut() {
                        sp.kv_len = p.draft_kv.min(sp.kv_len);
                        if p.head {
                            sp.seed = None;
                            sp.ctx_at = usize::MAX;
                            prompt::drop_block(sp, &self.account);
                        }
                        // A draft model's state may have moved: it starts over.
                        if !sp.state.is_empty() {
                            sp.kv_len = 0;
                        }
                    }
                }
                self.trim_rows(lane, &plan);
                false
            }
        }
    }

    /// Gives back the blocks wholly past each planned row's context (its
    /// verifier table keeps room for the next token).
    fn trim_rows(&mut self, lane: &LaneId, plan: &[SpecRowPlan]) {
        let Some(l) = self.lanes.get_mut(lane) else { return };
        for p in plan {
            let Some(s) = self.running.iter_mut().find(|s| s.id == p.id) else { continue };
            // The context's length: a row whose recurrent state is fed
            // again (settle.rs) keeps the blocks its kept tokens are in.
            trim(&mut l.mgr, &mut s.table, s.tokens.len().max(s.kv_len + 1));
            if let Some(sp) = s.spec.as_mut() {
                if let Some(d) = l.drafts.get_mut(&sp.kind) {
                    trim(d, &mut sp.table, sp.kv_len);
                }
            }
        }
    }

    /// Accepts, emits and rolls back each row (see the module doc).
    #[allow(clippy::too_many_arguments)]
    fn emit_spec(&mut self, lane: &LaneId, model: &mut LoadedModel, drafters: &mut [Drafter], plan: &[SpecRowPlan], out: Verified, ended: &mut Vec<Ended>) {
        // Per drafter: drafts proposed and kept this step, and its rows' drafts.
        let mut drafted = vec![0u64; drafters.len()];
        let mut accepted = vec![0u64; drafters.len()];
        let mut log: Vec<Vec<Vec<u32>>> = vec![Vec::new(); drafters.len()];
        let (width, cond) = (out.width, out.cond);
        let mut states = Vec::with_capacity(plan.len());
        for (p, mut v) in plan.iter().zip(out.rows) {
            // A drafting row has a drafter; its counts go to that one.
            let d = p.drafter.unwrap_or(0);
            if self.cfg.log_drafts && p.k > 0 {
                log[d].push(v.drafts.clone());
            }
            states.push((std::mem::take(&mut v.state), std::mem::take(&mut v.draft_states)));
            let Some(i) = self.running.iter().position(|s| s.id == p.id) else { continue };
            let s = &mut self.running[i];
            let (kept, outcome) = if p.k == 0 {
                s.kv_len = p.kv + 1;
                let o = match v.logits {
                    Some(mut l) => s.on_logits(l.swap_remove(0)),
                    None => s.on_token(v.best[0]),
                };
                (0, o)
            } else if p.host {
                match s.fork_hook().map(Some).or_else(|| (!p.hooked).then_some(None)) {
                    Some(hook) => {
                        let rows = v.logits.unwrap_or_default();
                        let eos = s.eos_ids().to_vec();
                        let mut tg = Targets::new(&rows, &v.drafts, s.sampler().clone(), hook, &eos);
                        let sp = s.spec.as_mut().expect("drafting");
                        let (n, next) = if p.sampled {
                            accept_sampled(&v.drafts, &v.q, |j| tg.distribution(j), &mut sp.rng)
                        } else {
                            accept_greedy_with(&v.drafts, |j| tg.argmax(j))
                        };
                        let top_n = s.params.logprobs;
                        // Counted first: a row that ends in this step reports them.
                        s.kv_len = p.kv + 1 + n;
                        count(s, p.k, n, &mut drafted[d], &mut accepted[d]);
                        let mut o = Outcome::Continue;
                        for (j, &t) in v.drafts[..n].iter().chain(std::iter::once(&next)).enumerate() {
                            // The hook failed at this position: plain decoding would too.
                            if let Some((_, e)) = tg.error.as_ref().filter(|(at, _)| *at == j) {
                                o = Outcome::Done(Err(WorkerError::Internal(e.clone())));
                                break;
                            }
                            let sampled = tg.sampled(j, t, top_n);
                            o = s.on_sampled(sampled);
                            if matches!(o, Outcome::Done(_)) {
                                break;
                            }
                        }
                        (n, o)
                    }
                    // A hook that cannot be forked now (every hook the API
                    // makes can): only position 0, as plain decoding.
                    None => {
                        s.kv_len = p.kv + 1;
                        let o = match v.logits {
                            Some(mut l) => s.on_logits(l.swap_remove(0)),
                            None => s.on_token(v.best[0]),
                        };
                        (0, o)
                    }
                }
            } else {
                let (n, next) = accept_greedy(&v.drafts, &v.best);
                s.kv_len = p.kv + 1 + n;
                count(s, p.k, n, &mut drafted[d], &mut accepted[d]);
                let mut o = Outcome::Continue;
                for &t in v.drafts[..n].iter().chain(std::iter::once(&next)) {
                    o = s.on_token(t);
                    if matches!(o, Outcome::Done(_)) {
                        break;
                    }
                }
                (n, o)
            };
            let _ = kept;
            match outcome {
                Outcome::Done(res) => {
                    let s = self.running.remove(i);
                    ended.push((self.retire(s), res));
                }
                Outcome::Continue => {
                    let s = &mut self.running[i];
                    if let Some(sp) = s.spec.as_mut() {
                        sp.kv_len = sp.kv_len.min(s.tokens.len() - 1);
                    }
                }
            }
        }
        // The verifier's recurrent state and the drafter heads (settle.rs).
        self.settle(lane, model, drafters, plan, states, cond, width);
        self.trim_rows(lane, plan);
        // Each drafter with a row in the step counts it (one verify forward).
        for (d, drafter) in drafters.iter().enumerate() {
            if !plan.iter().any(|p| p.drafter == Some(d) && (p.k > 0 || p.head)) {
                continue;
            }
            let c = self.stats.speculation.entry(kind_label(drafter.kind)).or_default();
            c.steps += 1;
            c.drafted_tokens += drafted[d];
            c.accepted_tokens += accepted[d];
            c.draft_log.extend(std::mem::take(&mut log[d]));
        }
    }
}


/// Counts a verified row's drafts (the request's usage, the step's totals)
/// and adapts its draft length.
fn count(s: &mut super::super::sequence::Sequence, k: usize, n: usize, drafted: &mut u64, accepted: &mut u64) {
    s.drafted += k;
    s.accepted += n;
    *drafted += k as u64;
    *accepted += n as u64;
    if let Some(sp) = s.spec.as_mut() {
        sp.len.update(k, n);
    }
}

/// Gives `table`'s blocks wholly past `len` tokens back to `mgr`.
fn trim(mgr: &mut BlockManager, table: &mut Vec<u32>, len: usize) {
    let keep = mgr.blocks_for(len);
    if table.len() > keep {
        mgr.release(&table[keep..]);
        table.truncate(keep);
    }
}
