//! A drafter's prompt context in the server (docs/SPECULATIVE.md, "A
//! head's prompt context"): the prefill forward of a sequence that may
//! speculate also returns the verifier's hidden states of the layers its
//! drafter head names (`ForwardRequest::hidden_layers`, the same forward,
//! prefill.rs: the union of the layers of the heads its rows draft with),
//! and each chunk goes into the row's drafter at once:
//!
//! - a chained head (mtp, eagle3) takes the chunk's positions a..a+n-1 as
//!   entries (token c_{j+1} with the hidden states at j: the tokens after
//!   each position are the prompt's own, the last chunk ending at the
//!   prompt's last token but one), into its blocks of the lane's draft
//!   pool. Its output is not kept as a seed: the row's first speculative
//!   step drafts nothing, the verifier's token comes from the prompt's last
//!   position as in `rmlx generate`, and the head takes it with that
//!   position's hidden states (settle.rs); from then on its drafts are the
//!   ones `rmlx generate` makes;
//! - a block drafter (DFlash) takes the chunk as context rows into the
//!   sequence's own context store (one drafter forward per row, no logits),
//!   as dflash.rs's loop does after each prefill chunk.
//!
//! The entries must cover consecutive verifier positions (`SpecRow::ctx_at`):
//! a chunk that does not start where the drafter's context ends (a
//! prefix-cache hit skipped the cached tokens' forward, a preemption)
//! starts the context over at the chunk, so after a prefix hit the drafter's
//! context begins at the first uncached token. Its positions then count
//! from there (the head's own cache positions): RoPE attention over a cache
//! the head fills itself depends only on differences of positions, so
//! drafts differ from a full context only by what the context lacks.
//! Nothing here changes what the verifier computes: a failure only starts
//! the drafter's context over at its next speculative step.
use super::super::super::speculative::dflash::{forward_over, ContextStore};
use super::super::super::speculative::serve::{BlockContext, BlockDrafter, Drafter, SpecRow};
use super::super::super::LoadedModel;
use super::super::{LaneId, Scheduler};
use super::{drafter_of, head, Split};
use anyhow::Result;
use mlx_rs::{
    ops::{concatenate, indexing::TryIndexOp},
    transforms::eval,
    Array,
};
use rmlx_plugin_api::author::Output;

impl Scheduler {
    /// The verifier layers a prefill forward of rows `idx` (running
    /// indices) returns for the drafter heads of its rows: the union of
    /// their layers; none when no row may speculate with a head.
    pub(in super::super) fn prompt_conditioning(&self, model: &LoadedModel, idx: &[usize]) -> Vec<u32> {
        let mut asked: Vec<u32> = idx
            .iter()
            .filter_map(|&i| drafter_of(&self.running[i], &model.drafters))
            .map(|d| &model.drafters[d])
            .filter(|d| d.is_head())
            .flat_map(|d| d.conditioning.iter().copied())
            .collect();
        asked.sort_unstable();
        asked.dedup();
        asked
    }

    /// After a prefill forward of `rows` (id, first position, tokens) that
    /// returned `hidden` ([B, L, D] per layer, rows left-padded, in `rows`'
    /// order): each row that may speculate with a head feeds its chunk to
    /// its head (module doc).
    pub(in super::super) fn feed_prompt(&mut self, lane: &LaneId, model: &mut LoadedModel, rows: &[(u64, usize, usize)], hidden: &[(u32, Array)]) {
        if hidden.is_empty() || !model.drafters.iter().any(|d| d.is_head()) {
            return;
        }
        // Each row's drafter, then each head takes its own rows.
        let which: Vec<Option<usize>> = rows
            .iter()
            .map(|&(id, ..)| self.running.iter().find(|s| s.id == id).and_then(|s| drafter_of(s, &model.drafters)))
            .collect();
        let drafters = std::mem::take(&mut model.drafters);
        let mut split = Split { model, drafters };
        for (d, drafter) in split.drafters.iter_mut().enumerate() {
            if drafter.is_head() && which.contains(&Some(d)) {
                let mine: Vec<bool> = which.iter().map(|&w| w == Some(d)).collect();
                self.feed_head_prompt(lane, drafter, rows, &mine, hidden);
            }
        }
    }

    /// [`Self::feed_prompt`] for one head: the rows `mine` marks.
    fn feed_head_prompt(&mut self, lane: &LaneId, drafter: &mut Drafter, rows: &[(u64, usize, usize)], mine: &[bool], hidden: &[(u32, Array)]) {
        // The conditioning in the head's order: [B, L, C].
        let parts: Option<Vec<Array>> = drafter.conditioning.iter().map(|l| hidden.iter().find(|(h, _)| h == l).map(|(_, a)| a.clone())).collect();
        let cond = match parts.map(|p| if p.len() == 1 { Ok(p[0].clone()) } else { concatenate(&p, -1) }) {
            Some(Ok(c)) => c,
            _ => return tracing::warn!("the prefill did not return the drafter's conditioning; its context starts at its first speculative step"),
        };
        let l = cond.dim(1);
        // Per row that may speculate: (running index, first position, tokens, its rows [1, n, C]).
        let mut fed: Vec<(usize, usize, usize, Array)> = Vec::new();
        for (b, &(id, a, n)) in rows.iter().enumerate() {
            let Some(i) = self.running.iter().position(|s| s.id == id) else { continue };
            let s = &mut self.running[i];
            if !mine[b] || n == 0 {
                continue;
            }
            let (b, n32) = (b as i32, n as i32);
            let Ok(c) = cond.try_index((b..b + 1, l - n32..l, ..)) else { continue };
            let start = s.params.num_draft_tokens.unwrap_or(drafter.num_draft_tokens);
            let seed = s.params.sampling.seed;
            s.spec.get_or_insert_with(|| Box::new(SpecRow::new(drafter.kind, start, seed)));
            fed.push((i, a, n, c));
        }
        if fed.is_empty() {
            return;
        }
        match drafter.block {
            Some(bd) => {
                for (i, a, n, c) in fed {
                    self.block_prompt(&mut drafter.model, bd, i, a, n, &c);
                }
            }
            None => {
                if let Err(e) = self.head_prompt(lane, drafter, &fed) {
                    tracing::warn!("feeding a drafter head the prompt failed ({e:#}); its context starts at its first speculative step");
                    for &(i, ..) in &fed {
                        let sp = self.running[i].spec.as_mut().expect("made above");
                        sp.kv_len = 0;
                        sp.seed = None;
                        sp.ctx_at = usize::MAX;
                    }
                }
            }
        }
    }

    /// A chained head's entries for the chunks `fed`, one ragged forward.
    fn head_prompt(&mut self, lane: &LaneId, drafter: &mut Drafter, fed: &[(usize, usize, usize, Array)]) -> Result<()> {
        let kind = drafter.kind;
        self.draft_lane(lane, kind, &drafter.model)?;
        let head = &mut drafter.model;
        let mut rows: Vec<(usize, Vec<u32>, Array)> = Vec::with_capacity(fed.len());
        for (i, a, n, c) in fed {
            let (i, a, n) = (*i, *a, *n);
            let s = &mut self.running[i];
            let tokens = s.tokens[a + 1..a + n + 1].to_vec();
            let sp = s.spec.as_mut().expect("made by feed_prompt");
            sp.seed = None;
            if sp.ctx_at != a {
                sp.kv_len = 0; // its context starts over at this chunk
            }
            let d = self.lanes.get_mut(lane).and_then(|l| l.drafts.get_mut(&kind)).expect("made above");
            let need = d.blocks_for(sp.kv_len + n).saturating_sub(sp.table.len());
            match d.allocate(need) {
                Some(b) => sp.table.extend(b),
                None => {
                    sp.kv_len = 0;
                    sp.ctx_at = usize::MAX; // no room: it starts over later
                    continue;
                }
            }
            rows.push((i, tokens, c.clone()));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
        let tokens: Vec<Vec<u32>> = rows.iter().map(|r| r.1.clone()).collect();
        let conds: Vec<Array> = rows.iter().map(|r| r.2.clone()).collect();
        let dpool = &mut self.lanes.get_mut(lane).and_then(|l| l.drafts.get_mut(&kind)).expect("made above").pool;
        let outs = {
            let mut refs: Vec<&mut SpecRow> = super::forward::rows_of(&mut self.running, &idx);
            head::feed(head, dpool, &mut refs, &tokens, &conds)?
        };
        // Its K/V is written once the forward is evaluated.
        let arrays: Vec<&Array> = outs.iter().flat_map(|(l, s)| [l, s]).collect();
        eval(arrays)?;
        for (i, a, n, _) in fed {
            // Entries end at position a + n - 1: the next takes a + n.
            let sp = self.running[*i].spec.as_mut().expect("made by feed_prompt");
            if idx.contains(i) {
                sp.ctx_at = a + n;
            }
        }
        Ok(())
    }

    /// A block drafter's context rows for running row `i`'s chunk (positions
    /// a..a+n, hidden states `c` [1, n, C]) into its own store.
    fn block_prompt(&mut self, model: &mut LoadedModel, bd: BlockDrafter, i: usize, a: usize, n: usize, c: &Array) {
        let account = self.account.clone();
        let s = &mut self.running[i];
        let tokens = s.tokens[a..a + n].to_vec();
        let sp = s.spec.as_mut().expect("made by feed_prompt");
        if sp.ctx_at != a || sp.block.is_none() {
            restart_block(sp, &account, a, model.spec.num_layers as usize, self.cfg.block_size);
        }
        let ctx = sp.block.as_mut().expect("made above");
        let r = take_in(model, bd, ctx, &tokens, c).and_then(|h| Ok(eval([&h])?));
        match r.and_then(|()| charge(ctx, &account)) {
            Ok(()) => sp.ctx_at = a + n,
            Err(e) => {
                tracing::warn!("a DFlash drafter's prompt context failed ({e:#}); it starts over at the row's next speculative step");
                drop_block(sp, &account);
            }
        }
    }
}

/// The drafter takes `ctx`'s pending rows and then `tokens` with `c` into
/// its store (a forward without a block; its output, lazily).
fn take_in(model: &mut LoadedModel, bd: BlockDrafter, ctx: &mut BlockContext, tokens: &[u32], c: &Array) -> Result<Array> {
    let (toks, rows) = pending_with(ctx, tokens, c)?;
    let h = forward_over(model, &mut ctx.store, bd.width, &toks, Some(&rows), &[], Output::Hidden)?;
    ctx.tokens.clear();
    ctx.pending = None;
    Ok(h)
}

/// `ctx`'s pending rows followed by `tokens` / `c` [1, n, C].
pub(super) fn pending_with(ctx: &BlockContext, tokens: &[u32], c: &Array) -> Result<(Vec<u32>, Array)> {
    let toks: Vec<u32> = ctx.tokens.iter().chain(tokens).copied().collect();
    let rows = match &ctx.pending {
        Some(p) => concatenate(&[p.clone(), c.clone()], 1)?,
        None => c.clone(),
    };
    Ok((toks, rows))
}

/// A fresh context store for `sp`, starting at verifier position `at`.
/// Its capacity grows in steps of `step` positions (the engine's block
/// size), so what is charged follows its length as the pool's blocks do.
pub(super) fn restart_block(sp: &mut SpecRow, account: &super::super::KvAccount, at: usize, layers: usize, step: usize) {
    drop_block(sp, account);
    sp.block = Some(BlockContext { store: ContextStore::with_step(layers, step), tokens: Vec::new(), pending: None, charged: 0 });
    sp.ctx_at = at;
}

/// Drops `sp`'s context store (its bytes go back to the budget); its
/// context starts over at its next speculative step.
pub(super) fn drop_block(sp: &mut SpecRow, account: &super::super::KvAccount) {
    if let Some(b) = sp.block.take() {
        account.credit(b.charged);
    }
    sp.ctx_at = usize::MAX;
}

/// Charges the engine's KV budget for what `ctx`'s store grew by; an Err
/// when the budget has no room (the caller drops the store).
pub(super) fn charge(ctx: &mut BlockContext, account: &super::super::KvAccount) -> Result<()> {
    let now = ctx.store.bytes();
    if now > ctx.charged {
        let more = now - ctx.charged;
        anyhow::ensure!(account.charge(more), "the KV budget has no room for {more} more bytes of its context store");
        ctx.charged = now;
    }
    Ok(())
}

