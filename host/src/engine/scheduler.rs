//! Continuous batching on the engine thread.
//!
//! Sequences wait in a FIFO queue, are admitted while the KV budget and
//! `max_running` allow, and run together: every engine step runs at most one
//! prefill chunk (of the oldest sequence still prefilling) and then ONE
//! batched forward of all decoding sequences ([B, 1] tokens, each row at its
//! own position), samples each row with its own parameters, and streams.
//! Sequences join and leave between steps; a cancelled one (flag, or its
//! client gone) leaves at the next step and frees its blocks. When a step
//! needs blocks the budget does not have, the most recently admitted other
//! sequence is preempted: its full blocks go to the prefix cache, its blocks
//! are freed, and it goes back to the front of the queue with its generated
//! tokens, to be prefilled again (mostly from the prefix cache) later.
//! KV lives in the model's paged pool (`kv_pool`); each sequence holds a
//! block table, and prefix-cache hits share blocks instead of copying them.
use super::block_manager::{BlockManager, BlockStats};
use super::decode::{decode_forward, forward, read_rows, RowOut};
use super::kv_pool::KvPool;
use super::sequence::{Outcome, Sequence};
use super::worker::{Finish, FinishReason, GenEvent, WorkerError};
use super::LoadedModel;
use anyhow::Result;
use mlx_rs::{transforms::async_eval, Array};
use std::collections::{HashMap, VecDeque};

pub use super::kv_budget::{device_memory, KvAccount, KvBudget};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The engine's KV memory, shared by every loaded model.
    pub kv_budget: KvBudget,
    /// Tokens per KV block (prefix-cache granularity).
    pub block_size: usize,
    /// Most sequences running (prefilling or decoding) at once.
    pub max_running: usize,
    /// Automatic prefix caching.
    pub prefix_cache: bool,
    /// The prefix cache's SSD tier (`--kv-ssd-dir`, `--kv-ssd-gb`), per model.
    pub ssd: Option<super::ssd::SsdConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            kv_budget: KvBudget::Fraction(0.5),
            block_size: 16,
            max_running: 16,
            prefix_cache: true,
            ssd: None,
        }
    }
}

/// What the engine publishes after every step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub steps: u64,
    /// Rows in the last decode step.
    pub last_batch: usize,
    pub max_batch: usize,
    pub completed: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Per model id.
    pub blocks: Vec<(String, BlockStats)>,
    /// MLX memory (bytes), read on the engine thread at publish: in use,
    /// the most ever in use since the server started, and the allocator's cache.
    pub memory_active_bytes: u64,
    pub memory_peak_bytes: u64,
    pub memory_cache_bytes: u64,
    /// The engine's one KV budget (bytes), and what the loaded models' blocks
    /// (held by sequences or in the prefix cache) take of it now.
    pub kv_budget_bytes: u64,
    pub kv_used_bytes: u64,
}

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    managers: HashMap<String, BlockManager>,
    /// The KV budget every model's blocks draw from.
    account: Arc<KvAccount>,
    /// Per model: the last pipelined decode step's tokens, [B, 1] on the
    /// device, not read yet (rows point in with `Sequence::pending_row`).
    pending_tokens: HashMap<String, Array>,
    next_id: u64,
    pub stats: EngineStats,
    /// Test hook (`Worker::inject_panic`): this model's next step panics.
    #[doc(hidden)]
    pub panic_next_step: Option<String>,
}

/// What one decode step gave: its tokens left on the device (pipelined),
/// or each row's output (or error) read by the host.
enum Decoded {
    Pipelined(Array),
    Read(Vec<(u64, std::result::Result<RowOut, String>)>),
}

/// Whether a sequence got the blocks it asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reserved {
    Yes,
    /// Not now: other models hold the budget; it goes back to the queue.
    Wait,
    /// Not even alone.
    Never,
}

/// A sequence that ended, with how.
pub type Ended = (Sequence, Result<Finish, WorkerError>);

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let budget = cfg.kv_budget.bytes();
        let mem = super::kv_budget::device_memory_info();
        tracing::info!("KV budget: {budget} bytes for all models ({:?} of {} bytes, {})", cfg.kv_budget, mem.bytes, mem.source);
        Self {
            account: Arc::new(KvAccount::new(budget)),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            managers: HashMap::new(),
            pending_tokens: HashMap::new(),
            next_id: 0,
            stats: EngineStats::default(),
            panic_next_step: None,
        }
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn busy_models(&self) -> Vec<String> {
        let mut v: Vec<String> = self.running.iter().map(|s| s.entry.id.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn manager(&mut self, model_id: &str, model: &LoadedModel) -> &mut BlockManager {
        let cfg = &self.cfg;
        self.managers.entry(model_id.to_string()).or_insert_with(|| {
            let s = &model.spec;
            let (k, v) = model.kv.clone();
            let probe = KvPool::new(s.num_layers as usize, k.clone(), v.clone(), cfg.block_size, 0);
            // What the pool's arrays really take per block, every layer, keys
            // and values, scales and norms included.
            let per_block = (probe.bytes_per_token() * cfg.block_size) as u64;
            // A ceiling: the blocks the whole budget holds; what the model
            // may take at a time is what the shared account has left.
            let total = (self.account.total() / per_block.max(1)) as usize;
            // The config's hash, the KV shape and families too: the SSD tier outlives the process.
            let config_hash = super::block_manager::signature_hash(&model.dir.config.to_string());
            let sig = format!(
                "{}|{}|dtype{}|L{}xK{}xD{}|config{:016x}|kv:{}-v2",
                model.dir.path.display(),
                model.dir.model_type,
                model.kv_bytes,
                s.num_layers,
                s.num_kv_heads,
                s.head_dim,
                config_hash,
                probe.family_key()
            );
            tracing::info!(
                "KV for {model_id}: family {}, up to {total} blocks of {} tokens ({per_block} bytes each) from the shared budget",
                probe.family_key(),
                cfg.block_size
            );
            let pool = KvPool::new(s.num_layers as usize, k, v, cfg.block_size, total);
            let mut m = BlockManager::new(pool, &sig).with_account(self.account.clone(), per_block);
            if let Some(ssd) = cfg.ssd.as_ref().filter(|_| cfg.prefix_cache) {
                match super::ssd::SsdStore::open(ssd, m.signature) {
                    Ok(store) => {
                        tracing::info!("KV SSD tier for {model_id}: {} blocks on disk", store.blocks());
                        m.attach_ssd(store);
                    }
                    Err(e) => tracing::warn!("KV SSD tier for {model_id} is off: {e:#}"),
                }
            }
            m
        })
    }

    /// Makes room for `blocks` more blocks of `model_id` in the shared
    /// budget by evicting idle cached blocks of the other models (least
    /// recently used first).
    fn shed_others(&mut self, model_id: &str, blocks: usize) {
        let Some(m) = self.managers.get(model_id) else { return };
        let want = (blocks.saturating_sub(m.available()) as u64) * m.snapshot().block_bytes;
        let mut freed = 0;
        for (id, other) in self.managers.iter_mut() {
            if freed >= want {
                break;
            }
            if id != model_id {
                freed += other.shed(want - freed);
            }
        }
    }

    /// Forgets a model's blocks (it was unloaded).
    pub fn drop_model(&mut self, model_id: &str) {
        self.managers.remove(model_id);
        self.pending_tokens.remove(model_id);
    }

    /// Ends every running sequence of `model_id` with `msg` (an internal
    /// error: a panic in its step left them in an unknown state), and gives
    /// the model's blocks back: references are rebuilt from the tables still
    /// running, so blocks of sequences lost in the panic are not leaked.
    pub fn fail_model(&mut self, model_id: &str, msg: &str) -> Vec<Ended> {
        self.pending_tokens.remove(model_id);
        let mut out = Vec::new();
        for mut s in std::mem::take(&mut self.running) {
            if s.entry.id == model_id {
                s.table.clear();
                s.kv_len = 0;
                s.pending_row = None;
                s.cached_upto = 0;
                out.push((s, Err(WorkerError::Internal(msg.to_string()))));
            } else {
                self.running.push(s);
            }
        }
        self.repair(model_id);
        self.stats.completed += out.len() as u64;
        out
    }

    /// Rebuilds `model_id`'s block references from its running sequences'
    /// tables (after a panic that may have dropped a sequence holding blocks).
    pub fn repair(&mut self, model_id: &str) {
        if let Some(m) = self.managers.get_mut(model_id) {
            m.rebuild_refs(
                self.running
                    .iter()
                    .filter(|s| s.entry.id == model_id)
                    .map(|s| s.table.as_slice()),
            );
        }
    }

    /// Forgets every model's blocks and pending tokens (the engine loop is
    /// restarting after a panic; its sequences have been ended).
    pub fn reset(&mut self) {
        self.managers.clear();
        self.pending_tokens.clear();
    }

    /// Removes cancelled sequences (waiting or running).
    pub fn reap_cancelled(&mut self) -> Vec<Ended> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].cancelled() {
                let s = self.waiting.remove(i).unwrap();
                let f = s.finish(FinishReason::Cancelled, None);
                out.push((s, Ok(f)));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                let s = self.running.remove(i);
                let f = s.finish(FinishReason::Cancelled, None);
                out.push((self.retire(s), Ok(f)));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Frees a sequence's blocks (caching its full blocks first).
    fn retire(&mut self, mut s: Sequence) -> Sequence {
        if let Some(m) = self.managers.get_mut(&s.entry.id) {
            if self.cfg.prefix_cache {
                cache_blocks(m, &mut s);
            }
            m.release(&s.table);
        }
        s.table.clear();
        s.kv_len = 0;
        s.pending_row = None;
        s.cached_upto = 0;
        s
    }

    /// Admits the queue's front sequence onto `model` if room allows.
    /// Ok(None): admitted; Ok(Some): it ended at once; Err(seq): no room now.
    pub fn admit(
        &mut self,
        mut s: Sequence,
        model: &mut LoadedModel,
    ) -> std::result::Result<Option<Ended>, Sequence> {
        if self.running.len() >= self.cfg.max_running.max(1) {
            return Err(s);
        }
        let first = !s.started_sent;
        if first {
            if let Err(e) = s.validate(model.spec.vocab_size as usize) {
                return Ok(Some((s, Err(e))));
            }
        }
        let id = s.entry.id.clone();
        self.manager(&id, model);
        // Blocks the prompts still prefilling will take.
        let pending: usize = {
            let m = &self.managers[&id];
            self.running
                .iter()
                .filter(|r| r.entry.id == id && r.to_prefill() > 0)
                .map(|r| {
                    m.blocks_for(r.tokens.len() + 1)
                        .saturating_sub(r.table.len())
                })
                .sum()
        };
        let mgr = self.managers.get_mut(&id).unwrap();
        let need = mgr.blocks_for(s.tokens.len() + 1);
        if need > mgr.total_blocks {
            let msg = format!(
                "the prompt needs {need} KV blocks of {} tokens but --kv-budget holds {}",
                mgr.block_size, mgr.total_blocks
            );
            return Ok(Some((s, Err(WorkerError::BadRequest(msg)))));
        }
        if mgr.available() < need + pending {
            self.shed_others(&id, need + pending);
        }
        let mgr = self.managers.get_mut(&id).unwrap();
        if mgr.available() < need + pending {
            return Err(s);
        }
        // Prefix cache: whole blocks of everything but the last token. Hit
        // blocks join the table as they are (shared, held by this sequence).
        s.cached_upto = 0;
        if self.cfg.prefix_cache {
            // Blocks read from the SSD tier must leave room for this sequence.
            let hits = mgr.lookup_keeping(&s.tokens[..s.tokens.len() - 1], need + pending);
            s.kv_len = hits.len() * mgr.block_size;
            s.cached_upto = hits.len();
            s.table = hits;
        }
        if first {
            let _ = s.events.send(GenEvent::Started);
            s.started_sent = true;
            self.stats.prompt_tokens += s.prompt_len as u64;
        }
        if s.params.max_tokens == 0 {
            let f = s.finish_length();
            return Ok(Some((self.retire(s), Ok(f))));
        }
        self.running.push(s);
        Ok(None)
    }

    /// Makes sure sequence `i` holds blocks for `n` more tokens: idle
    /// cached blocks of other models are evicted, then the newest other
    /// sequences of this model preempted, if needed.
    fn reserve(
        &mut self,
        model_id: &str,
        i: usize,
        n: usize,
        preempted: &mut Vec<Sequence>,
    ) -> (Reserved, usize) {
        let mut i = i;
        loop {
            let extra = {
                let s = &self.running[i];
                let m = &self.managers[model_id];
                m.blocks_for(s.kv_len + n).saturating_sub(s.table.len())
            };
            if self.managers[model_id].available() < extra {
                self.shed_others(model_id, extra);
            }
            if let Some(blocks) = self.managers.get_mut(model_id).unwrap().allocate(extra) {
                self.running[i].table.extend(blocks);
                return (Reserved::Yes, i);
            }
            // Preempt the newest other sequence of this model.
            let victim = (0..self.running.len())
                .rev()
                .find(|&j| j != i && self.running[j].entry.id == model_id);
            let Some(j) = victim else {
                // Alone: other models' running sequences hold the rest of
                // the budget (it waits for them), or it never fits.
                let m = &self.managers[model_id];
                let s = &self.running[i];
                let fits = m.blocks_for(s.kv_len + n) <= m.total_blocks && self.running.iter().any(|r| r.entry.id != model_id);
                return (if fits { Reserved::Wait } else { Reserved::Never }, i);
            };
            let mut v = self.running.remove(j);
            if j < i {
                i -= 1;
            }
            v.preempted += 1;
            if let Some(m) = self.managers.get_mut(model_id) {
                m.stats.preemptions += 1;
            }
            tracing::info!(
                "preempting sequence {} ({} tokens) for KV room",
                v.id,
                v.tokens.len()
            );
            v = self.retire(v);
            preempted.push(v);
        }
    }

    /// One step for the running sequences of `model_id`: at most one prefill
    /// chunk, then one batched decode forward. Returns the sequences that ended.
    pub fn step(&mut self, model_id: &str, model: &mut LoadedModel) -> Vec<Ended> {
        if self.panic_next_step.as_deref() == Some(model_id) {
            self.panic_next_step = None;
            panic!("injected panic in a step of `{model_id}` (test hook)");
        }
        let mut ended = Vec::new();
        let mut preempted = Vec::new();
        self.stats.steps += 1;
        // A prefill is coming: hand out the pipelined tokens first, so running
        // streams (and first tokens) do not wait for it.
        if self.running.iter().any(|s| s.entry.id == model_id && s.to_prefill() > 0) {
            if let Some(p) = self.pending_tokens.remove(model_id) {
                self.take_pending_tokens(model_id, &p, &mut ended);
            }
        }
        // --- prefill: chunks of prompts in arrival order, at most one
        // `--prefill-chunk` of tokens per step in all (so running streams
        // never wait longer than one chunk; short prompts share a step).
        // The budget protects decoding streams; while none is decoding, every
        // prefilling sequence takes its chunk this step (prompts that arrive
        // together start decoding together).
        let decoding = self.running.iter().any(|s| s.entry.id == model_id && s.to_prefill() == 0);
        let mut budget: Option<usize> = (!decoding).then_some(usize::MAX);
        let mut prefilled: Vec<u64> = Vec::new();
        while let Some(i) = self.running.iter().position(|s| {
            s.entry.id == model_id && s.to_prefill() > 0 && !prefilled.contains(&s.id)
        }) {
            let per = self.running[i].params.prefill_chunk.max(1);
            let left = *budget.get_or_insert(per);
            if left == 0 {
                break;
            }
            let chunk = per.min(left).min(self.running[i].to_prefill());
            budget = Some(left - chunk);
            prefilled.push(self.running[i].id);
            let (ok, i) = self.reserve(model_id, i, chunk, &mut preempted);
            if ok == Reserved::Wait {
                let s = self.running.remove(i);
                preempted.push(self.retire(s));
            } else if ok == Reserved::Never {
                let s = self.running.remove(i);
                let err = WorkerError::BadRequest("the prompt does not fit in --kv-budget".into());
                ended.push((self.retire(s), Err(err)));
            } else {
                let s = &mut self.running[i];
                let start = s.cached();
                let ids: Vec<i32> = s.tokens[start..start + chunk]
                    .iter()
                    .map(|&t| t as i32)
                    .collect();
                let pool = &mut self.managers.get_mut(model_id).unwrap().pool;
                let r = forward(
                    model,
                    pool,
                    &mut [s],
                    Array::from_slice(&ids, &[1, chunk as i32]),
                )
                .and_then(|l| Ok(l.eval()?));
                if let Err(e) = r {
                    let s = self.running.remove(i);
                    ended.push((self.retire(s), Err(WorkerError::Internal(format!("{e:#}")))));
                } else if self.cfg.prefix_cache && self.running[i].to_prefill() == 0 {
                    // Prompt done: share its blocks with requests that come meanwhile.
                    let m = self.managers.get_mut(model_id).unwrap();
                    cache_blocks(m, &mut self.running[i]);
                }
            }
        }
        // --- one decode step over every sequence whose prompt is in
        let mut rows: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].entry.id == model_id && self.running[i].to_prefill() == 0)
            .collect();
        // reserve one token each (may preempt others; indices shift)
        let ids_in: Vec<u64> = rows.iter().map(|&i| self.running[i].id).collect();
        for sid in ids_in {
            let Some(i) = self.running.iter().position(|s| s.id == sid) else {
                continue;
            };
            let (ok, i) = self.reserve(model_id, i, 1, &mut preempted);
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
        rows = (0..self.running.len())
            .filter(|&i| self.running[i].entry.id == model_id && self.running[i].to_prefill() == 0)
            .collect();
        let prev = self.pending_tokens.remove(model_id);
        if !rows.is_empty() {
            let b = rows.len();
            self.stats.last_batch = b;
            self.stats.max_batch = self.stats.max_batch.max(b);
            let row_ids: Vec<u64> = rows.iter().map(|&i| self.running[i].id).collect();
            // Every row greedy on the device: this step's tokens stay on the
            // device as the next step's input, and the host reads them one
            // step later, while the device runs that next step.
            let pipelined = pipelining() && rows.iter().all(|&i| self.running[i].takes_device_token());
            let pool = &mut self.managers.get_mut(model_id).unwrap().pool;
            let step = {
                // Borrow the rows mutably, in row order.
                let mut refs: Vec<Option<&mut Sequence>> = self.running.iter_mut().map(Some).collect();
                let mut seqs: Vec<&mut Sequence> = rows.iter().map(|&i| refs[i].take().unwrap()).collect();
                decode_forward(model, pool, &mut seqs, prev.as_ref()).and_then(|st| {
                    if pipelined {
                        async_eval([&st.tokens])?;
                        Ok((st, None))
                    } else {
                        let outs = read_rows(&seqs, &st)?;
                        Ok((st, Some(outs)))
                    }
                })
            };
            // A batch that fails is retried row by row, so a request that
            // breaks the forward fails alone and the others go on (nothing
            // of a failed forward is kept: `kv_len` only advances on success,
            // and the pool's layers are only replaced by complete writes).
            let step = match step {
                Ok((st, None)) => Decoded::Pipelined(st.tokens),
                Ok((_, Some(outs))) => Decoded::Read(row_ids.iter().copied().zip(outs.into_iter().map(Ok)).collect()),
                Err(e) if row_ids.len() == 1 => Decoded::Read(vec![(row_ids[0], Err(format!("{e:#}")))]),
                Err(e) => {
                    tracing::warn!("a batched decode step of {} rows failed ({e:#}); retrying row by row", row_ids.len());
                    let mut outs = Vec::with_capacity(row_ids.len());
                    for &sid in &row_ids {
                        let Some(i) = self.running.iter().position(|s| s.id == sid) else { continue };
                        let pool = &mut self.managers.get_mut(model_id).unwrap().pool;
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
                self.take_pending_tokens(model_id, &p, &mut ended);
            }
            match step {
                Decoded::Pipelined(tokens) => {
                    for (r, sid) in row_ids.iter().enumerate() {
                        if let Some(s) = self.running.iter_mut().find(|s| s.id == *sid) {
                            s.pending_row = Some(r);
                        }
                    }
                    self.pending_tokens.insert(model_id.to_string(), tokens);
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
        } else if let Some(p) = prev {
            self.take_pending_tokens(model_id, &p, &mut ended);
        }
        // Preempted sequences go back to the front, oldest first.
        for s in preempted.into_iter() {
            self.waiting.push_front(s);
        }
        self.stats.completed += ended.len() as u64;
        self.stats.generated_tokens += ended.iter().map(|(s, _)| s.n as u64).sum::<u64>();
        ended
    }

    /// Hands the previous pipelined step's tokens ([B, 1] int32, computed on
    /// the device) to the rows still waiting for them.
    fn take_pending_tokens(&mut self, model_id: &str, tokens: &Array, ended: &mut Vec<Ended>) {
        let toks: Result<Vec<u32>> = tokens.eval().map_err(Into::into).and_then(|_| Ok(tokens.try_as_slice::<i32>()?.iter().map(|&t| t as u32).collect()));
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            let Some(r) = s.pending_row.filter(|_| s.entry.id == model_id) else {
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

    pub fn publish(&mut self) -> EngineStats {
        self.stats.waiting = self.waiting.len();
        self.stats.running = self.running.len();
        let mut blocks: Vec<(String, BlockStats)> = self
            .managers
            .iter()
            .map(|(k, m)| (k.clone(), m.snapshot()))
            .collect();
        blocks.sort_by(|a, b| a.0.cmp(&b.0));
        self.stats.blocks = blocks;
        let (active, peak, cache) = super::metrics::mlx_memory();
        self.stats.memory_active_bytes = active;
        self.stats.memory_peak_bytes = self.stats.memory_peak_bytes.max(peak).max(active);
        self.stats.memory_cache_bytes = cache;
        self.stats.kv_budget_bytes = self.account.total();
        self.stats.kv_used_bytes = self.account.used();
        self.stats.clone()
    }
}

/// Pipelined greedy decode, on unless `RMLX_PIPELINE=0`.
fn pipelining() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RMLX_PIPELINE").map(|v| v != "0").unwrap_or(true))
}

/// Puts a sequence's not-yet-cached full blocks (of tokens in its KV) into
/// the prefix cache, where they are (no copy).
fn cache_blocks(m: &mut BlockManager, s: &mut Sequence) {
    let full = (s.kv_len.min(s.tokens.len()) / m.block_size).min(s.table.len());
    if full <= s.cached_upto {
        return;
    }
    let chain = m.chain(&s.tokens[..full * m.block_size]);
    for j in s.cached_upto..full {
        let (a, b) = (j * m.block_size, (j + 1) * m.block_size);
        let parent = j.checked_sub(1).map(|p| chain[p]);
        m.insert(chain[j], parent, j, s.tokens[a..b].to_vec(), s.table[j]);
    }
    s.cached_upto = full;
}
