//! A block drafter's (DFlash) drafts in the server's speculative step
//! (speculative/dflash.rs is the one-sequence loop; docs/SPECULATIVE.md).
//!
//! Each sequence has its own context store (`SpecRow::block`): the K/V the
//! drafter's layers make from the verifier's hidden states of the
//! sequence's kept tokens. The store lives outside the paged pool (the
//! drafter's block attends non-causally over it, which the paged pool
//! refuses) and its bytes are charged to the engine's one KV budget
//! (prompt.rs `charge`). A step's drafts are ONE drafter forward per
//! drafting row, `[new context rows ; last token, mask x k_r]`
//! (`forward_over`): the rows kept since its last forward join its context,
//! and the k_r masked rows' logits propose its drafts at once. Rows draft
//! one forward each because each attends over its own store (the forwards
//! are queued lazily and evaluated together with the picks).
//!
//! After verification (settle.rs) each row's kept positions `[last, kept
//! drafts]` and their hidden states from the verify forward wait in the
//! row's context (`BlockContext::pending`) for its next forward; rejected
//! drafts never enter it (the block's K/V is never kept).
use super::super::super::sequence::Sequence;
use super::super::super::speculative::{
    dflash::forward_over,
    serve::{BlockContext, BlockDrafter},
};
use super::super::super::LoadedModel;
use super::super::KvAccount;
use super::prompt::{charge, drop_block};
use anyhow::{Context, Result};
use mlx_rs::{
    ops::{broadcast_to, concatenate, indexing::TryIndexOp},
    Array,
};
use rmlx_plugin_api::author::Output;

/// The drafts' logits of the drafting rows `d_idx` (running indices, each
/// drafting `ks[j]` tokens): [B_d, k_max, V], lazily; a row drafting fewer
/// than k_max repeats its last row's logits (padding, never verified).
pub(super) fn propose(model: &mut LoadedModel, bd: BlockDrafter, running: &mut [Sequence], d_idx: &[usize], ks: &[usize], k_max: usize, account: &KvAccount) -> Result<Array> {
    let mut rows = Vec::with_capacity(d_idx.len());
    for (&i, &k) in d_idx.iter().zip(ks) {
        let s = &mut running[i];
        let bonus = *s.tokens.last().expect("a sequence has tokens");
        let sp = s.spec.as_mut().context("a drafting row has its state")?;
        let ctx: &mut BlockContext = sp.block.as_mut().context("a drafting row has its context")?;
        let block: Vec<u32> = std::iter::once(bonus).chain(std::iter::repeat_n(bd.mask_id, k)).collect();
        let s_rows = ctx.tokens.len() as i32;
        let toks = std::mem::take(&mut ctx.tokens);
        let pending = ctx.pending.take();
        let logits = match forward_over(model, &mut ctx.store, bd.width, &toks, pending.as_ref(), &block, Output::AllLogits) {
            Ok(l) => l, // [1, S + 1 + k, V]
            Err(e) => {
                (ctx.tokens, ctx.pending) = (toks, pending);
                return Err(e);
            }
        };
        let (a, k32) = (s_rows + 1, k as i32);
        let mut x = logits.try_index((.., a..a + k32, ..))?; // [1, k, V]
        if k < k_max {
            let last = x.try_index((.., k32 - 1..k32, ..))?;
            let pad = broadcast_to(&last, &[1, (k_max - k) as i32, x.dim(-1)])?;
            x = concatenate(&[x, pad], 1)?; // [1, k_max, V]
        }
        if let Err(e) = charge(ctx, account) {
            // Its drafts stand; its context starts over at its next step.
            tracing::warn!("a DFlash context store: {e:#}; it starts over");
            drop_block(sp, account);
        }
        rows.push(x);
    }
    Ok(concatenate(&rows, 0)?) // [B_d, k_max, V]
}
