//! The plan of a speculative step (spec.rs): each decoding row's drafter
//! (the request's `draft_kind`, else the model's first; none for a row that
//! may not speculate), its draft length, and the blocks it needs: in its
//! drafter's pool of the lane (draft models and chained heads, one pool per
//! drafter, `Lane::drafts`) and k_max + 1 verifier positions for every row.
use super::super::super::block_manager::BlockManager;
use super::super::super::kv_pool::KvPool;
use super::super::super::speculative::{
    serve::{kind_label, Drafter, SpecRow},
    DraftKind,
};
use super::super::super::LoadedModel;
use super::super::{LaneId, Scheduler};
use super::{drafter_of, prompt, SpecRowPlan};
use anyhow::Result;

impl Scheduler {
    /// Each decoding row's drafter, draft length and blocks; None when no
    /// row drafts or feeds a head (blocks taken for it are given back).
    pub(super) fn plan(&mut self, lane: &LaneId, drafters: &[Drafter]) -> Option<Vec<SpecRowPlan>> {
        let rows = self.decoding_rows(lane);
        let mut plan: Vec<SpecRowPlan> = Vec::with_capacity(rows.len());
        for &i in &rows {
            let which = drafter_of(&self.running[i], drafters);
            let s = &mut self.running[i];
            let (mut k, mut head) = (0, false);
            if let Some(drafter) = which.map(|d| &drafters[d]) {
                let start = s.params.num_draft_tokens.unwrap_or(drafter.num_draft_tokens);
                let seed = s.params.sampling.seed;
                let (left, kv, first) = (s.left(), s.kv_len, s.n == 0);
                let sp = s.spec.get_or_insert_with(|| Box::new(SpecRow::new(drafter.kind, start, seed)));
                debug_assert_eq!(sp.kind, drafter.kind, "a sequence keeps its drafter");
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
                    if sp.seed.as_ref().is_none_or(|h| h.at != kv) {
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
            plan.push(SpecRowPlan { id: s.id, drafter: which, k, kv: s.kv_len, draft_kv, sampled, hooked, host, head });
        }
        let k_max = plan.iter().map(|p| p.k).max().unwrap_or(0);
        if k_max == 0 && !plan.iter().any(|p| p.head) {
            return None;
        }
        // Each paged drafter's pool (a block drafter's context is its own
        // store): one that cannot be made leaves its rows out of this step.
        for (d, drafter) in drafters.iter().enumerate() {
            if drafter.block.is_some() || !plan.iter().any(|p| p.drafter == Some(d) && (p.k > 0 || p.head)) {
                continue;
            }
            if let Err(e) = self.draft_lane(lane, drafter.kind, &drafter.model) {
                tracing::warn!("{}: no speculation with its `{}` drafter ({e:#})", lane.model, kind_label(drafter.kind));
                for p in plan.iter_mut().filter(|p| p.drafter == Some(d)) {
                    (p.k, p.head) = (0, false);
                }
            }
        }
        // Draft blocks: a draft model's catch-up and k_max draft tokens; a
        // head's k_max - 1 chained entries, then at most k_max + 1 kept.
        for p in plan.iter_mut().filter(|p| p.k > 0 || p.head) {
            let Some(drafter) = p.drafter.map(|d| &drafters[d]).filter(|d| d.block.is_none()) else { continue };
            let i = self.running.iter().position(|s| s.id == p.id).expect("a planned row runs");
            let s = &mut self.running[i];
            let sp = s.spec.as_mut().expect("a drafting row has its state");
            let d = self.lanes.get_mut(lane).and_then(|l| l.drafts.get_mut(&drafter.kind)).expect("made above");
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

    /// The lane's pool and block manager of the `kind` drafter `draft` (made
    /// on first use), drawing from the engine's one KV budget.
    pub(super) fn draft_lane(&mut self, lane: &LaneId, kind: DraftKind, draft: &LoadedModel) -> Result<()> {
        let (cfg, account) = (&self.cfg, &self.account);
        let l = self.lanes.get_mut(lane).expect("a running sequence's lane exists");
        if l.drafts.contains_key(&kind) {
            return Ok(());
        }
        // Each layer as the draft model declares it (kv_layout.rs).
        let (k, v) = draft.kv.clone();
        let pool = KvPool::for_model(draft, k, v, cfg.block_size, 0)?;
        let per_block = (pool.bytes_per_token() * cfg.block_size) as u64;
        let total = (account.total() / per_block.max(1)) as usize;
        let label = kind_label(kind);
        tracing::info!("`{label}` drafter KV for {}: up to {total} blocks of {} tokens ({per_block} bytes each) from the shared budget", lane.model, cfg.block_size);
        let pool = pool.with_max_blocks(total);
        let mgr = BlockManager::new(pool, &format!("draft|{label}|{}", draft.dir.path.display())).with_account(account.clone(), per_block);
        l.drafts.insert(kind, mgr);
        Ok(())
    }
}
