//! One engine step of one lane: at most one prefill chunk budget of
//! prompts (prefill.rs: the chosen chunks in one batched forward with
//! ragged rows), then one batched decode forward of the lane's decoding rows
//! (pipelined when every row is greedy on the device; one compiled graph
//! where the lane's compiled step serves it, compiled_paged.rs). A model's step runs
//! each of its lanes in turn, so one batch of a model may hold several
//! families, each attending its own pool.
use super::super::compiled_paged::decode_step;
use super::super::decode::{decode_forward, read_rows, RowOut};
use super::super::sequence::{Outcome, Sequence};
use super::super::worker::WorkerError;
use super::super::LoadedModel;
use super::profile::{self, Phase};
use super::{Ended, LaneId, Reserved, Scheduler};
use anyhow::Result;
use mlx_rs::{transforms::async_eval, Array};

/// What one decode step gave: its tokens left on the device (pipelined),
/// or each row's output (or error) read by the host.
enum Decoded {
    Pipelined(Array),
    Read(Vec<(u64, std::result::Result<RowOut, String>)>),
}

impl Scheduler {
    /// One step for the running sequences of `lane`: prefill chunks, then
    /// one batched decode forward. Returns the sequences that ended.
    pub fn step(&mut self, lane: &LaneId, model: &mut LoadedModel) -> Vec<Ended> {
        if self.panic_next_step.as_deref() == Some(lane.model.as_str()) {
            self.panic_next_step = None;
            panic!("injected panic in a step of `{}` (test hook)", lane.model);
        }
        let mut ended = Vec::new();
        let mut preempted = Vec::new();
        self.stats.steps += 1;
        profile::begin();
        // A prefill is coming: hand out the pipelined tokens first, so running
        // streams (and first tokens) do not wait for it.
        if self.running.iter().any(|s| s.lane == *lane && s.to_prefill() > 0) {
            if let Some(p) = self.lanes.get_mut(lane).and_then(|l| l.pending.take()) {
                profile::time(Phase::Wait, || self.take_pending_tokens(lane, &p, &mut ended));
            }
        }
        if profile::enabled() {
            let (forwards, left) = (self.stats.prefill_forwards, self.prompt_left(lane));
            profile::time(Phase::Prefill, || self.prefill(lane, model, &mut ended, &mut preempted));
            let done = left.saturating_sub(self.prompt_left(lane));
            profile::note(self.stats.prefill_forwards - forwards, done as u64, 0);
        } else {
            self.prefill(lane, model, &mut ended, &mut preempted);
        }
        self.decode(lane, model, &mut ended, &mut preempted);
        profile::end(self.stats.steps, lane);
        // Preempted sequences go back to the front, oldest first.
        for s in preempted.into_iter() {
            self.waiting.push_front(s);
        }
        self.stats.completed += ended.len() as u64;
        self.stats.generated_tokens += ended.iter().map(|(s, _)| s.n as u64).sum::<u64>();
        ended
    }

    /// Prompt tokens the lane's running sequences still have to prefill.
    fn prompt_left(&self, lane: &LaneId) -> usize {
        self.running.iter().filter(|s| s.lane == *lane).map(|s| s.to_prefill()).sum()
    }

    /// Indices of the lane's sequences whose prompt is in.
    pub(super) fn decoding_rows(&self, lane: &LaneId) -> Vec<usize> {
        (0..self.running.len()).filter(|&i| self.running[i].lane == *lane && self.running[i].to_prefill() == 0).collect()
    }

    /// One decode step over every sequence of the lane whose prompt is in.
    fn decode(&mut self, lane: &LaneId, model: &mut LoadedModel, ended: &mut Vec<Ended>, preempted: &mut Vec<Sequence>) {
        // Reserve one token each (may preempt others; indices shift).
        let ids_in: Vec<u64> = self.decoding_rows(lane).iter().map(|&i| self.running[i].id).collect();
        for sid in ids_in {
            let Some(i) = self.running.iter().position(|s| s.id == sid) else {
                continue;
            };
            let (ok, i) = self.reserve(lane, i, 1, preempted);
            if ok == Reserved::Wait {
                let s = self.running.remove(i);
                preempted.push(self.retire(s));
            } else if ok == Reserved::Never {
                // Alone and out of budget: the context is full.
                let mut s = self.running.remove(i);
                let f = s.finish_length();
                ended.push((self.retire(s), Ok(f)));
            }
        }
        // Speculative decoding (spec.rs), when the model has a drafter.
        if self.spec_decode(lane, model, ended) {
            return;
        }
        let rows = self.decoding_rows(lane);
        let prev = self.lanes.get_mut(lane).and_then(|l| l.pending.take());
        if rows.is_empty() {
            if let Some(p) = prev {
                self.take_pending_tokens(lane, &p, ended);
            }
            return;
        }
        let b = rows.len();
        profile::note(0, 0, b);
        self.stats.last_batch = b;
        self.stats.max_batch = self.stats.max_batch.max(b);
        let row_ids: Vec<u64> = rows.iter().map(|&i| self.running[i].id).collect();
        // Every row greedy on the device: this step's tokens stay on the
        // device as the next step's input, and the host reads them one
        // step later, while the device runs that next step. Not while a
        // row waits for its first token: pipelined, it would reach the
        // client only after the next step's graph is built and dispatched
        // (its TTFT one decode step longer); read now, it goes out at once.
        let first = rows.iter().any(|&i| self.running[i].t_first.is_none());
        let pipelined = pipelining() && !first && rows.iter().all(|&i| self.running[i].takes_device_token());
        let l = self.lanes.get_mut(lane).expect("the lane exists");
        let (pool, compiled) = (&mut l.mgr.pool, &mut l.compiled);
        let step = {
            // Borrow the rows mutably, in row order.
            let mut refs: Vec<Option<&mut Sequence>> = self.running.iter_mut().map(Some).collect();
            let mut seqs: Vec<&mut Sequence> = rows.iter().map(|&i| refs[i].take().unwrap()).collect();
            profile::time(Phase::Build, || decode_step(model, pool, compiled, &mut seqs, prev.as_ref())).and_then(|st| {
                if pipelined {
                    profile::time(Phase::Dispatch, || async_eval([&st.tokens]))?;
                    Ok((st, None))
                } else {
                    let outs = profile::time(Phase::Wait, || read_rows(&seqs, &st))?;
                    Ok((st, Some(outs)))
                }
            })
        };
        // A batch that fails is retried row by row, so a request that
        // breaks the forward fails alone and the others go on (nothing of a
        // failed forward is kept: `kv_len` only advances on success, and the
        // pool's layers are only replaced by complete writes).
        let step = match step {
            Ok((st, None)) => Decoded::Pipelined(st.tokens),
            Ok((_, Some(outs))) => Decoded::Read(row_ids.iter().copied().zip(outs.into_iter().map(Ok)).collect()),
            Err(e) if row_ids.len() == 1 => Decoded::Read(vec![(row_ids[0], Err(format!("{e:#}")))]),
            Err(e) => {
                tracing::warn!("a batched decode step of {} rows failed ({e:#}); retrying row by row", row_ids.len());
                let mut outs = Vec::with_capacity(row_ids.len());
                for &sid in &row_ids {
                    let Some(i) = self.running.iter().position(|s| s.id == sid) else { continue };
                    let pool = &mut self.lanes.get_mut(lane).expect("the lane exists").mgr.pool;
                    let s = &mut self.running[i];
                    let mut one = [s];
                    let r = decode_forward(model, pool, &mut one, prev.as_ref())
                        .and_then(|st| read_rows(&one, &st))
                        .map(|mut o| o.remove(0))
                        .map_err(|e| format!("{e:#}"));
                    outs.push((sid, r));
                }
                Decoded::Read(outs)
            }
        };
        // The previous step's tokens first (they come before this step's).
        if let Some(p) = prev {
            profile::time(Phase::Wait, || self.take_pending_tokens(lane, &p, ended));
        }
        match step {
            Decoded::Pipelined(tokens) => {
                for (r, sid) in row_ids.iter().enumerate() {
                    if let Some(s) = self.running.iter_mut().find(|s| s.id == *sid) {
                        s.pending_row = Some(r);
                    }
                }
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.pending = Some(tokens);
                }
            }
            Decoded::Read(outs) => {
                for (sid, out) in outs {
                    let Some(i) = self.running.iter().position(|s| s.id == sid) else { continue };
                    let s = &mut self.running[i];
                    let outcome = match out {
                        Ok(RowOut::Token(t)) => s.on_token(t),
                        Ok(RowOut::Logits(l)) => s.on_logits(l),
                        Err(msg) => Outcome::Done(Err(WorkerError::Internal(msg))),
                    };
                    if let Outcome::Done(res) = outcome {
                        let s = self.running.remove(i);
                        ended.push((self.retire(s), res));
                    }
                }
            }
        }
    }

    /// Hands the previous pipelined step's tokens ([B, 1] int32, computed on
    /// the device) to the lane's rows still waiting for them.
    pub(super) fn take_pending_tokens(&mut self, lane: &LaneId, tokens: &Array, ended: &mut Vec<Ended>) {
        let toks: Result<Vec<u32>> = tokens
            .eval()
            .map_err(Into::into)
            .and_then(|_| Ok(tokens.try_as_slice::<i32>()?.iter().map(|&t| t as u32).collect()));
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            let Some(r) = s.pending_row.filter(|_| s.lane == *lane) else {
                i += 1;
                continue;
            };
            s.pending_row = None;
            let outcome = match &toks {
                Ok(t) => s.on_token(t[r]),
                Err(e) => Outcome::Done(Err(WorkerError::Internal(format!("{e:#}")))),
            };
            match outcome {
                Outcome::Continue => i += 1,
                Outcome::Done(res) => {
                    let s = self.running.remove(i);
                    ended.push((self.retire(s), res));
                }
            }
        }
    }
}

/// Pipelined greedy decode, on unless `RMLX_PIPELINE=0`.
fn pipelining() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RMLX_PIPELINE").map(|v| v != "0").unwrap_or(true))
}
