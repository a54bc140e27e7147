//! The scheduler's forwards over the paged KV store: a prefill chunk of one
//! sequence, and the batched decode step (every running sequence feeds its
//! last token; one forward, one attention call per layer for all rows).
//! Rows that decode greedily with nothing to apply to the logits get the
//! device's argmax (one int per row crosses to the host); the others get
//! their logits row.
use super::{
    kv_pool::KvPool,
    paged::{PagedForward, Row},
    recurrent::{self, RowState},
    sequence::Sequence,
    LoadedModel,
};
use anyhow::Result;
use mlx_rs::{
    ops::{
        indexing::{argmax_axis, scatter_add_single, take_axis},
        select,
    },
    transforms::eval,
    Array, Dtype,
};

/// What a row gets from one decode step.
pub enum RowOut {
    /// The greedy token, chosen on the device.
    Token(u32),
    /// The logits (f32, one row of the vocabulary).
    Logits(Vec<f32>),
}

/// One decode forward, lazily: `tokens` [B, 1] int32 (the device's argmax)
/// and `logits` [B, 1, V].
pub struct Step {
    pub tokens: Array,
    pub logits: Array,
}

/// One decode forward over `seqs` (in row order), whose tables already hold
/// a block for the new token. A row's input is its last token, or, when
/// `pending_row` is set, its row of `prev` (the previous step's device tokens,
/// not read by the host yet). On an error the rows' KV state is undefined:
/// the caller ends them.
pub fn decode_forward(model: &mut LoadedModel, pool: &mut KvPool, seqs: &mut [&mut Sequence], prev: Option<&Array>) -> Result<Step> {
    let b = seqs.len() as i32;
    let host: Vec<i32> = seqs.iter().map(|s| *s.tokens.last().unwrap() as i32).collect();
    let mut input = Array::from_slice(&host, &[b, 1]);
    if let Some(prev) = prev.filter(|_| seqs.iter().any(|s| s.pending_row.is_some())) {
        let idx: Vec<i32> = seqs.iter().map(|s| s.pending_row.unwrap_or(0) as i32).collect();
        let use_prev: Vec<bool> = seqs.iter().map(|s| s.pending_row.is_some()).collect();
        let from_prev = take_axis(prev, Array::from_slice(&idx, &[b]), 0)?; // [B, 1]
        input = select(&Array::from_slice(&use_prev, &[b, 1]), &from_prev, &input)?;
    }
    let counting = super::op_count::enabled().then(|| super::op_count::count(&[&input])).transpose()?;
    let logits = forward(model, pool, seqs, input)?;
    let tokens = argmax_axis(&with_bias(seqs, &logits)?, -1, None)?.as_dtype(Dtype::Int32)?; // [B, 1]
    if let Some(before) = counting {
        report_ops(b, &before, &[&tokens, &logits])?;
    }
    Ok(Step { tokens, logits })
}

/// `RMLX_COUNT_OPS=1`: prints the primitives of the first decode step at
/// each batch size, less those of its input (the previous step's tokens,
/// possibly still queued).
fn report_ops(b: i32, input: &super::op_count::OpCount, outputs: &[&Array]) -> Result<()> {
    static SEEN: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(&b) {
        return Ok(());
    }
    seen.push(b);
    let mut step = super::op_count::count(outputs)?;
    for (k, n) in &input.by_kind {
        if let Some(m) = step.by_kind.get_mut(k) {
            *m = m.saturating_sub(*n);
        }
    }
    step.by_kind.retain(|_, n| *n > 0);
    eprintln!("server decode step (B = {b}): {step}");
    Ok(())
}

/// The logits the device's argmax reads: with the `logit_bias` of the rows
/// that take device tokens added, in f32 as the host's sampler adds it.
pub(super) fn with_bias(seqs: &[&mut Sequence], logits: &Array) -> Result<Array> {
    let v = logits.dim(-1);
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for (r, s) in seqs.iter().enumerate().filter(|(_, s)| s.takes_device_token()) {
        for &(id, b) in s.device_bias().iter().filter(|(id, _)| (*id as i32) < v) {
            idx.push(r as i32 * v + id as i32);
            val.push(b);
        }
    }
    if idx.is_empty() {
        return Ok(logits.clone());
    }
    let n = idx.len() as i32;
    let flat = logits.as_dtype(Dtype::Float32)?.reshape(&[-1])?; // [B*V]
    let flat = scatter_add_single(&flat, Array::from_slice(&idx, &[n]), Array::from_slice(&val, &[n, 1]), 0)?;
    Ok(flat.reshape(logits.shape())?)
}

/// Reads a step for the host: the rows' tokens, or logits for rows that
/// sample on the host.
pub fn read_rows(seqs: &[&mut Sequence], step: &Step) -> Result<Vec<RowOut>> {
    rows_out(seqs, &step.tokens, &step.logits)
}

/// Evaluates what the rows need (tokens always; logits only when a row
/// samples on the host) and hands each row its share.
fn rows_out(seqs: &[&mut Sequence], tokens: &Array, logits: &Array) -> Result<Vec<RowOut>> {
    let b = seqs.len();
    let need_logits = seqs.iter().any(|s| !s.takes_device_token());
    let logits = if need_logits {
        let l = logits.as_dtype(Dtype::Float32)?;
        eval([tokens, &l])?;
        Some(l)
    } else {
        tokens.eval()?;
        None
    };
    let toks = tokens.try_as_slice::<i32>()?;
    let all = match &logits {
        Some(l) => Some(l.try_as_slice::<f32>()?),
        None => None,
    };
    let v = all.map(|a| a.len() / b).unwrap_or(0);
    Ok(seqs
        .iter()
        .enumerate()
        .map(|(i, s)| match all {
            Some(a) if !s.takes_device_token() => RowOut::Logits(a[i * v..(i + 1) * v].to_vec()),
            _ => RowOut::Token(toks[i] as u32),
        })
        .collect())
}

/// One forward of `input` [B, L] (row b continues `seqs[b]`) through the
/// pool; logits [B, 1, V], lazily. The rows' `kv_len` advance by L.
pub fn forward(
    model: &mut LoadedModel,
    pool: &mut KvPool,
    seqs: &mut [&mut Sequence],
    input: Array,
) -> Result<Array> {
    forward_with(model, pool, seqs, input, None)
}

/// [`forward`] with input embeddings (features [B, L, hidden], mask bool
/// [B, L]) replacing the token embeddings where the mask is set (images).
pub fn forward_with(
    model: &mut LoadedModel,
    pool: &mut KvPool,
    seqs: &mut [&mut Sequence],
    input: Array,
    inputs: Option<(Array, Array)>,
) -> Result<Array> {
    let lens = vec![input.dim(1) as usize; seqs.len()];
    forward_rows(model, pool, seqs, input, &lens, inputs, false)
}

/// One forward of ragged rows (`PagedForward::ragged`): row b of `input`
/// [B, L] brings `lens[b]` new tokens of `seqs[b]`, left-padded to L; each
/// row's `kv_len` advances by its own length and its recurrent state (if
/// the model keeps one) becomes what the model set. Logits [B, 1, V] of each
/// row's last token; with `eval` they are evaluated before any row changes
/// (an error leaves every row as it was), else lazily.
pub(crate) fn forward_rows(
    model: &mut LoadedModel,
    pool: &mut KvPool,
    seqs: &mut [&mut Sequence],
    input: Array,
    lens: &[usize],
    inputs: Option<(Array, Array)>,
    eval: bool,
) -> Result<Array> {
    Ok(forward_rows_hidden(model, pool, seqs, input, lens, inputs, eval, Vec::new())?.0)
}

/// [`forward_rows`] that also returns the hidden states of `hidden_layers`
/// (`ForwardRequest::hidden_layers`: [B, L, D] each, left-padded as the
/// input), lazily: a drafter head's conditioning during prefill.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_rows_hidden(
    model: &mut LoadedModel,
    pool: &mut KvPool,
    seqs: &mut [&mut Sequence],
    input: Array,
    lens: &[usize],
    inputs: Option<(Array, Array)>,
    eval: bool,
    hidden_layers: Vec<u32>,
) -> Result<(Array, Vec<(u32, Array)>)> {
    let rows: Vec<Row> = seqs
        .iter()
        .map(|s| Row {
            table: &s.table,
            offset: s.kv_len,
        })
        .collect();
    let states: Vec<&RowState> = seqs.iter().map(|s| &s.state).collect();
    let bs = pool.block_size;
    // The same rows as the last batched forward, none changed since: its
    // stacked states as they are.
    let b = seqs.len();
    let same = |t: u64| seqs.iter().enumerate().all(|(r, s)| s.state_tag == Some((t, r)));
    let stacked = pool.batch_state.as_ref().filter(|l| l.rows == b && same(l.tag)).map(|l| l.states.clone());
    let mut paged = PagedForward::ragged(pool, &rows, lens)?.with_states(states).with_stacked(stacked);
    // Images of a model that attends bidirectionally within each (media.rs).
    if inputs.is_some() && model.bidirectional_media() {
        let runs = seqs.iter().zip(lens).map(|(s, &n)| s.params.media.as_ref().map_or_else(Vec::new, |m| m.bidirectional_runs(s.kv_len, n))).collect();
        paged = paged.with_runs(runs)?;
    }
    // Multimodal RoPE (ABI 3.7): rows whose prompt has a layout (mrope.rs).
    paged = paged.with_positions(super::mrope::batch_positions(seqs, lens));
    let req = super::attend::ForwardRequest { inputs, hidden_layers, ..super::attend::ForwardRequest::logits(true) };
    let out = model.run(&input, &mut paged, req)?;
    let (logits, hidden) = (out.out, out.hidden);
    // Recurrent state: the rows' own change only now the forward succeeded.
    let new_states = paged.take_states();
    drop(paged);
    if eval {
        logits.eval()?;
    }
    // Split into rows first: an error here leaves every row as it was.
    let per_row = (0..b)
        .map(|r| new_states.iter().map(|(&layer, st)| Ok((layer, recurrent::row(st, r, b)?))).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    let tag = (b > 1 && !new_states.is_empty()).then(recurrent::next_tag);
    if let Some(tag) = tag {
        pool.batch_state = Some(recurrent::BatchState { tag, rows: b, states: new_states });
    }
    for (r, ((s, new), &len)) in seqs.iter_mut().zip(per_row).zip(lens).enumerate() {
        s.kv_len += len;
        if new.is_empty() {
            continue;
        }
        s.state.extend(new);
        s.state_tag = tag.map(|t| (t, r));
        // At a block boundary: the state the prefix cache keeps with the
        // block (a copy that fails only costs a later prefix hit).
        if s.kv_len % bs == 0 {
            if let Ok(snap) = recurrent::snapshot(&s.state) {
                s.snapshot = Some((s.kv_len / bs, snap));
            }
        }
    }
    Ok((logits, hidden))
}
