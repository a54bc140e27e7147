//! A drafter head's forwards in the server's speculative step (plugin ABI
//! 3.6: `Model::conditioning`, `HEAD_STATE`; speculative/serve.rs): the
//! head keeps its own K/V in the lane's draft pool, one entry per context
//! token after the first it saw, entry j pairing token c_{j+1} with the
//! verifier's hidden states at position j (its conditioning), so it runs
//! one position behind the verifier.
//!
//! - `step`: a chained draft step, `[B_d, 1]`, each row's latest draft
//!   conditioned on the head's own state of the step before.
//! - `feed`: after acceptance, the kept tokens and the verifier's next one
//!   (n + 1 per row) conditioned on the verify forward's hidden states at
//!   their previous positions, one ragged forward for every row; the head's
//!   output after each row's last entry is its next seed. The chained
//!   entries were dropped before (the row's head length went back).
use super::super::super::attend::ForwardRequest;
use super::super::super::kv_pool::KvPool;
use super::super::super::paged::{PagedForward, Row};
use super::super::super::speculative::serve::SpecRow;
use super::super::super::LoadedModel;
use anyhow::{Context, Result};
use mlx_rs::{
    ops::{concatenate, indexing::TryIndexOp, zeros},
    transforms::async_eval,
    Array,
};
use rmlx_plugin_api::{author::Output, HEAD_STATE};

/// One forward of the head over `pool`: `tokens` [B, L] conditioned on
/// `cond` [B, L, C] after each row's head KV (`lens`: each row's real
/// tokens, left-padded to L) -> (logits [B, 1 | L, V], state [B, L, C']),
/// lazily.
fn forward(head: &mut LoadedModel, pool: &mut KvPool, rows: &[Row], lens: &[usize], tokens: &Array, cond: Array, output: Output) -> Result<(Array, Array)> {
    let (b, l) = (tokens.dim(0), tokens.dim(1));
    let mask = Array::from_slice(&vec![true; (b * l) as usize], &[b, l]);
    let req = ForwardRequest { output: Some(output), hidden_layers: vec![HEAD_STATE], inputs: Some((cond, mask)), ..ForwardRequest::default() };
    let mut paged = PagedForward::ragged(pool, rows, lens)?;
    let out = head.run(tokens, &mut paged, req)?;
    let state = out.hidden.into_iter().find(|(h, _)| *h == HEAD_STATE).map(|(_, s)| s);
    Ok((out.out, state.context("the drafter head returned no state (HEAD_STATE)")?))
}

/// A chained draft step: `input` [B_d, 1] (each row's latest draft) on
/// `state` [B_d, 1, C] (the head's state of the step before) -> (logits
/// [B_d, 1, V], state [B_d, 1, C]), lazily. The rows' head lengths advance by one.
pub(super) fn step(head: &mut LoadedModel, pool: &mut KvPool, rows: &mut [&mut SpecRow], input: Array, state: Array) -> Result<(Array, Array)> {
    let out = {
        let r: Vec<Row> = rows.iter().map(|d| Row { table: &d.table, offset: d.kv_len }).collect();
        forward(head, pool, &r, &vec![1; r.len()], &input, state, Output::AllLogits)?
    };
    for d in rows.iter_mut() {
        d.kv_len += 1;
    }
    Ok(out)
}

/// Feeds each row its `tokens[r]` with `conds[r]` [1, n_r, C] (one
/// ragged forward) -> per row (logits [1, 1, V], state [1, 1, C]) after its
/// last entry, evaluating in the background. The rows' head lengths advance
/// by n_r.
pub(super) fn feed(head: &mut LoadedModel, pool: &mut KvPool, rows: &mut [&mut SpecRow], tokens: &[Vec<u32>], conds: &[Array]) -> Result<Vec<(Array, Array)>> {
    let lens: Vec<usize> = tokens.iter().map(Vec::len).collect();
    let l = lens.iter().copied().max().unwrap_or(0);
    let b = rows.len();
    anyhow::ensure!(l > 0 && tokens.len() == b && conds.len() == b, "a head feed of {b} rows with {} token lists", tokens.len());
    // Left-padded, as `PagedForward::ragged` reads rows: [B, L] and [B, L, C].
    let mut ids = Vec::with_capacity(b * l);
    let mut cs = Vec::with_capacity(b);
    for (t, c) in tokens.iter().zip(conds) {
        ids.extend(std::iter::repeat_n(0, l - t.len()).chain(t.iter().map(|&x| x as i32)));
        let pad = (l - t.len()) as i32;
        cs.push(if pad > 0 { concatenate(&[zeros::<f32>(&[1, pad, c.dim(-1)])?.as_dtype(c.dtype())?, c.clone()], 1)? } else { c.clone() });
    }
    let input = Array::from_slice(&ids, &[b as i32, l as i32]);
    let cond = concatenate(&cs, 0)?; // [B, L, C]
    let (logits, state) = {
        let r: Vec<Row> = rows.iter().map(|d| Row { table: &d.table, offset: d.kv_len }).collect();
        forward(head, pool, &r, &lens, &input, cond, Output::LastLogits)?
    };
    let l = l as i32;
    let state = state.try_index((.., l - 1..l, ..))?; // [B, 1, C]
    async_eval([&logits, &state])?;
    let mut out = Vec::with_capacity(b);
    for (r, d) in rows.iter_mut().enumerate() {
        let r = r as i32;
        out.push((logits.try_index(r..r + 1)?, state.try_index(r..r + 1)?));
        d.kv_len += lens[r as usize];
    }
    Ok(out)
}
