//! A speculative decode step of one lane (issue 14, docs/SPECULATIVE.md):
//! the model's draft model proposes k_i tokens for each row that may
//! speculate, the model verifies every row in ONE forward of
//! `[B, k_max + 1]`, and each row keeps what accept.rs keeps.
//!
//! 1. Rows that may not speculate (the request's `num_draft_tokens: 0`,
//!    images, a logits hook that cannot be forked) have k_i = 0; the others
//!    start at the drafter's K and adapt per row (adapt.rs), never drafting
//!    more than their tokens left minus one.
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
//! 3. The draft KV catches up with the context (tokens it has not seen: the
//!    whole prompt at first, then the last kept draft), batched by equal
//!    lengths, then k_max `[B_d, 1]` draft forwards run for all drafting
//!    rows at once. Greedy rows' drafts stay on the device (argmax), so the
//!    step reads the host once; a row that samples draws each draft on the
//!    host from its own sampler chain (q_i).
//! 4. The verify forward is `[B, k_max + 1]` with every position's logits:
//!    a row with k_i < k_max is padded (its own later drafts, or its last
//!    token for a row that does not draft). Padding sits after the row's
//!    real tokens, so causal attention keeps it out of the real positions,
//!    and it is rolled back with the rejected drafts.
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
mod prompt;
mod settle;
mod targets;

use super::super::block_manager::BlockManager;
use super::super::kv_pool::KvPool;
use super::super::sequence::Outcome;
use super::super::worker::WorkerError;
use super::super::speculative::{
    accept::{accept_greedy, accept_greedy_with, accept_sampled},
    serve::{kind_label, Drafter, SpecRow},
};
use super::super::LoadedModel;
use super::{Ended, LaneId, Scheduler};
use anyhow::Result;
use forward::Verified;
use targets::Targets;

/// Puts the drafter back into its model however the step ends (a panic
/// included: the lane's sequences fail, the model keeps its drafter).
struct Split<'a> {
    model: &'a mut LoadedModel,
    drafter: Option<Box<Drafter>>,
}

impl Drop for Split<'_> {
    fn drop(&mut self) {
        self.model.draft = self.drafter.take();
    }
}

/// One row of a speculative step.
struct SpecRowPlan {
    id: u64,
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
        if model.draft.is_none() {
            return false;
        }
        let rows = self.decoding_rows(lane);
        // Its usage reports draft counts (zero while the batch is too large).
        for &i in &rows {
            let s = &mut self.running[i];
            s.spec_on |= s.may_speculate();
        }
        if rows.is_empty() || rows.len() > self.cfg.spec_max_batch || !rows.iter().any(|&i| self.running[i].may_speculate()) {
            return false;
        }
        let drafter = model.draft.take();
        let mut split = Split { model, drafter };
        let Split { model, drafter } = &mut split;
        let drafter = drafter.as_mut().expect("checked above");
        // The host reads the acceptance before the next step: no pipelining.
        if let Some(p) = self.lanes.get_mut(lane).and_then(|l| l.pending.take()) {
            self.take_pending_tokens(lane, &p, ended);
        }
        let Some(plan) = self.plan(lane, drafter) else { return false };
        self.stats.last_batch = plan.len();
        self.stats.max_batch = self.stats.max_batch.max(plan.len());
        let kind = kind_label(drafter.kind).to_string();
        match self.run_spec(lane, model, drafter, &plan) {
            Ok(out) => {
                self.emit_spec(lane, model, drafter, &plan, out, &kind, ended);
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

    /// Each decoding row's draft length and blocks; None when no row drafts
    /// (blocks taken for it are given back).
    fn plan(&mut self, lane: &LaneId, drafter: &Drafter) -> Option<Vec<SpecRowPlan>> {
        let rows = self.decoding_rows(lane);
        let mut plan: Vec<SpecRowPlan> = Vec::with_capacity(rows.len());
        for &i in &rows {
            let s = &mut self.running[i];
            let (mut k, mut head) = (0, false);
            if s.may_speculate() {
                let start = s.params.num_draft_tokens.unwrap_or(drafter.num_draft_tokens);
                let seed = s.params.sampling.seed;
                let (left, kv, first) = (s.left(), s.kv_len, s.n == 0);
                let sp = s.spec.get_or_insert_with(|| Box::new(SpecRow::new(start, seed)));
                k = sp.len.get().min(left.saturating_sub(1));
                if sp.kv_len == 0 {
                    sp.state.clear(); // its draft KV starts over (new, preempted)
                }
                if let Some(bd) = drafter.block {
                    // A block drafter drafts over its context, which must
                    // end at the context's last token but one (the prefill
                    // and each step fill it). Otherwise (it decoded without
                    // the drafter since: plain steps, a preemption) its
                    // context starts over here: no drafts this step, and it
                    // takes this step's kept positions.
                    if sp.block.is_none() || sp.ctx_at != kv {
                        prompt::restart_block(sp, &self.account, kv, drafter.model.spec.num_layers as usize, self.cfg.block_size);
                        k = 0;
                    }
                    // The first token is the verifier's own, from the
                    // prompt's last position (as `rmlx generate` takes it
                    // from its prefill), so the drafts after it are the
                    // ones `rmlx generate` makes.
                    let empty = sp.block.as_ref().is_none_or(|b| b.store.is_empty() && b.tokens.is_empty());
                    k = if empty || first { 0 } else { k.min(bd.size - 1) };
                    head = left > 1;
                } else if drafter.is_head() {
                    // A head drafts from its seed, the output after the
                    // context's last token. Without one that follows the
                    // context now it drafts nothing this step, and the head
                    // takes this step's token with the verifier's hidden
                    // states: after the prefill fed it the prompt (prompt.rs:
                    // its entries end where the sequence's K/V does) its KV
                    // stays; otherwise (the row decoded without the head
                    // since: plain steps, a preemption, a prompt too short
                    // to prefill) it starts over.
                    if !sp.seed.as_ref().is_some_and(|h| h.at == kv) {
                        if sp.ctx_at != kv {
                            sp.kv_len = 0;
                        }
                        sp.seed = None;
                        sp.ctx_at = kv;
                        k = 0;
                    }
                    head = left > 1;
                }
            }
            let sampled = !s.sampler().is_plain_greedy();
            let hooked = s.has_hook();
            let host = sampled || hooked || s.params.logprobs.is_some();
            let draft_kv = s.spec.as_ref().map_or(0, |sp| sp.kv_len);
            plan.push(SpecRowPlan { id: s.id, k, kv: s.kv_len, draft_kv, sampled, hooked, host, head });
        }
        let k_max = plan.iter().map(|p| p.k).max().unwrap_or(0);
        if k_max == 0 && !plan.iter().any(|p| p.head) {
            return None;
        }
        // A block drafter's context is its own store: no draft pool.
        if drafter.block.is_none() {
            if let Err(e) = self.draft_lane(lane, &drafter.model) {
                tracing::warn!("{}: no speculation ({e:#})", lane.model);
                return None;
            }
        }
        // Draft blocks: a draft model's catch-up and k_max draft tokens; a
        // head's k_max - 1 chained entries, then at most k_max + 1 kept.
        for p in plan.iter_mut().filter(|p| (p.k > 0 || p.head) && drafter.block.is_none()) {
            let i = self.running.iter().position(|s| s.id == p.id).expect("a planned row runs");
            let s = &mut self.running[i];
            let sp = s.spec.as_mut().expect("a drafting row has its state");
            let d = self.lanes.get_mut(lane).and_then(|l| l.draft.as_mut()).expect("made above");
            let upto = if p.head { sp.kv_len + k_max + 1 } else { s.tokens.len() - 1 + k_max };
            let need = d.blocks_for(upto).saturating_sub(sp.table.len());
            match d.allocate(need) {
                Some(b) => sp.table.extend(b),
                None => {
                    p.k = 0;
                    if p.head {
                        p.head = false;
                        sp.seed = None;
                    }
                }
            }
        }
        let k_max = plan.iter().map(|p| p.k).max().unwrap_or(0);
        // Verifier blocks: k_max + 1 tokens for every row (padding included).
        let mut ok = k_max > 0 || plan.iter().any(|p| p.head);
        for p in plan.iter() {
            if !ok {
                break;
            }
            let i = self.running.iter().position(|s| s.id == p.id).expect("a planned row runs");
            let extra = self.mgr(lane).blocks_for(p.kv + k_max + 1).saturating_sub(self.running[i].table.len());
            if self.mgr(lane).available() < extra {
                self.shed_others(lane, extra);
            }
            match self.mgr_mut(lane).allocate(extra) {
                Some(b) => self.running[i].table.extend(b),
                None => ok = false,
            }
        }
        if !ok {
            self.trim_rows(lane, &plan);
            return None;
        }
        Some(plan)
    }

    /// The lane's draft pool and block manager (made on first use), drawing
    /// from the engine's one KV budget.
    fn draft_lane(&mut self, lane: &LaneId, draft: &LoadedModel) -> Result<()> {
        let (cfg, account) = (&self.cfg, &self.account);
        let l = self.lanes.get_mut(lane).expect("a running sequence's lane exists");
        if l.draft.is_some() {
            return Ok(());
        }
        // Each layer as the draft model declares it (kv_layout.rs).
        let (k, v) = draft.kv.clone();
        let pool = KvPool::for_model(draft, k, v, cfg.block_size, 0)?;
        let per_block = (pool.bytes_per_token() * cfg.block_size) as u64;
        let total = (account.total() / per_block.max(1)) as usize;
        tracing::info!("draft KV for {}: up to {total} blocks of {} tokens ({per_block} bytes each) from the shared budget", lane.model, cfg.block_size);
        let pool = pool.with_max_blocks(total);
        l.draft = Some(BlockManager::new(pool, &format!("draft|{}", draft.dir.path.display())).with_account(account.clone(), per_block));
        Ok(())
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
            if let (Some(sp), Some(d)) = (s.spec.as_mut(), l.draft.as_mut()) {
                trim(d, &mut sp.table, sp.kv_len);
            }
        }
    }

    /// Accepts, emits and rolls back each row (see the module doc).
    #[allow(clippy::too_many_arguments)]
    fn emit_spec(&mut self, lane: &LaneId, model: &mut LoadedModel, drafter: &mut Drafter, plan: &[SpecRowPlan], out: Verified, kind: &str, ended: &mut Vec<Ended>) {
        let (mut drafted, mut accepted) = (0u64, 0u64);
        let (width, cond) = (out.width, out.cond);
        let mut states = Vec::with_capacity(plan.len());
        let mut log = Vec::new();
        for (p, mut v) in plan.iter().zip(out.rows) {
            if self.cfg.log_drafts && p.k > 0 {
                log.push(v.drafts.clone());
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
                        count(s, p.k, n, &mut drafted, &mut accepted);
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
                count(s, p.k, n, &mut drafted, &mut accepted);
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
        // The verifier's recurrent state and the drafter head (settle.rs).
        self.settle(lane, model, drafter, plan, states, cond, width);
        self.trim_rows(lane, plan);
        let c = self.stats.speculation.entry(kind.to_string()).or_default();
        c.steps += 1;
        c.drafted_tokens += drafted;
        c.accepted_tokens += accepted;
        c.draft_log.extend(log);
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
