//! Continuous batching on the engine thread.
//!
//! Sequences wait in a FIFO queue, are admitted while the KV budget and
//! `max_running` allow, and run together: every engine step runs at most one
//! `--prefill-chunk` of prompt tokens while streams decode (everyone's chunk
//! when none does), the chosen chunks batched into forwards with ragged rows
//! (prefill.rs), and then ONE batched forward of all decoding sequences
//! ([B, 1] tokens, each row at its own position), samples each row with its
//! own parameters, and streams.
//! Sequences join and leave between steps; a cancelled one (flag, or its
//! client gone) leaves at the next step and frees its blocks. When a step
//! needs blocks the budget does not have, the most recently admitted other
//! sequence is preempted: its full blocks go to the prefix cache, its blocks
//! are freed, and it goes back to the front of the queue with its generated
//! tokens, to be prefilled again (mostly from the prefix cache) later.
//! KV lives in paged pools (`kv_pool`); each sequence holds a block table,
//! and prefix-cache hits share blocks instead of copying them.
//!
//! Lanes (lanes.rs): a model's sequences are grouped by their KV families
//! (the request's `kv_cache`, else the model's own). Each lane has its own
//! pool and block manager, its own pipelined tokens and its own decode
//! forward per step (step.rs); preemption stays within a lane, and idle
//! cached blocks are evicted across lanes as across models, all from the
//! one shared KV budget.
mod config;
mod lanes;
mod prefill;
mod profile;
mod spec;
mod step;

pub use config::{default_max_running, default_prefill_step_tokens, SchedulerConfig};
pub use lanes::{Lane, LaneId};
use super::block_manager::{BlockManager, BlockStats};
use super::kv_groups;
use super::kv_pool::KvSide;
use super::sequence::Sequence;
use super::worker::{Finish, FinishReason, GenEvent, WorkerError};
use super::LoadedModel;
use anyhow::Result;
use std::collections::{HashMap, VecDeque};

pub use super::kv_budget::{device_memory, KvAccount, KvBudget};
use std::sync::Arc;

/// What the engine publishes after every step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub steps: u64,
    /// Rows in the last decode step (of one lane).
    pub last_batch: usize,
    /// Prefill forwards run, and prompt chunks they carried (a batched
    /// prefill forward carries several: scheduler/prefill.rs).
    pub prefill_forwards: u64,
    pub prefill_chunks: u64,
    pub max_batch: usize,
    /// The most sequences ever running at once (every lane and model).
    pub max_running: usize,
    pub completed: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Per lane: the model id for its own KV families, `MODEL kv=FAMILY`
    /// for a lane of requests that chose other families (`LaneId::label`).
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
    /// Speculative decoding, per drafter kind (`draft`).
    pub speculation: std::collections::BTreeMap<String, SpecCounts>,
}

/// What one drafter kind did since the server started.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecCounts {
    /// Speculative decode steps (one verify forward each).
    pub steps: u64,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    /// Each verified row's drafts, in order (`SchedulerConfig::log_drafts`).
    #[serde(skip)]
    pub draft_log: Vec<Vec<u32>>,
}

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    /// Per lane (model and KV families): its blocks and pipelined tokens.
    lanes: HashMap<LaneId, Lane>,
    /// The KV budget every lane's blocks draw from.
    account: Arc<KvAccount>,
    next_id: u64,
    pub stats: EngineStats,
    /// Test hook (`Worker::inject_panic`): this model's next step panics.
    #[doc(hidden)]
    pub panic_next_step: Option<String>,
}

/// Whether a sequence got the blocks it asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reserved {
    Yes,
    /// Not now: other lanes (or models) hold the budget; it goes back to the queue.
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
            lanes: HashMap::new(),
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

    /// Forgets a model's blocks, every lane (it was unloaded).
    pub fn drop_model(&mut self, model_id: &str) {
        self.lanes.retain(|id, _| id.model != model_id);
    }

    /// Ends every running sequence of `model_id`, all lanes (see `fail_lane`).
    pub fn fail_model(&mut self, model_id: &str, msg: &str) -> Vec<Ended> {
        let lanes: Vec<LaneId> = self.lanes.keys().filter(|l| l.model == model_id).cloned().collect();
        lanes.iter().flat_map(|l| self.fail_lane(l, msg)).collect()
    }

    /// Ends every running sequence of `lane` with `msg` (an internal error:
    /// a panic in its step left them in an unknown state), and gives the
    /// lane's blocks back: references are rebuilt from the tables still
    /// running, so blocks of sequences lost in the panic are not leaked.
    /// The model's other lanes go on.
    pub fn fail_lane(&mut self, lane: &LaneId, msg: &str) -> Vec<Ended> {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.pending = None;
        }
        let mut out = Vec::new();
        for mut s in std::mem::take(&mut self.running) {
            if s.lane == *lane {
                s.table.clear();
                s.kv_len = 0;
                s.state.clear();
                s.snapshot = None;
                s.state_tag = None;
                s.pending_row = None;
                s.cached_upto = 0;
                s.spec = None;
                out.push((s, Err(WorkerError::Internal(msg.to_string()))));
            } else {
                self.running.push(s);
            }
        }
        self.repair(lane);
        self.stats.completed += out.len() as u64;
        out
    }

    /// Rebuilds `lane`'s block references from its running sequences'
    /// tables (after a panic that may have dropped a sequence holding blocks).
    pub fn repair(&mut self, lane: &LaneId) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.mgr.rebuild_refs(self.running.iter().filter(|s| s.lane == *lane).map(|s| s.table.as_slice()));
            let ids: Vec<u64> = self.running.iter().filter(|s| s.lane == *lane).map(|s| s.id).collect();
            l.mgr.keep_states(&ids);
            for (kind, d) in l.drafts.iter_mut() {
                let tables = self.running.iter().filter(|s| s.lane == *lane).filter_map(|s| s.spec.as_ref()).filter(|sp| sp.kind == *kind);
                d.rebuild_refs(tables.map(|sp| sp.table.as_slice()));
            }
        }
    }

    /// Forgets every lane's blocks and pending tokens (the engine loop is
    /// restarting after a panic; its sequences have been ended).
    pub fn reset(&mut self) {
        self.lanes.clear();
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

    /// Frees a sequence's blocks (caching its full blocks first, with its
    /// last block-boundary state snapshot), and drops its recurrent state:
    /// a preempted sequence rebuilds it when it is prefilled again (from
    /// the deepest snapshot the prefix cache still has, else from zeros).
    fn retire(&mut self, mut s: Sequence) -> Sequence {
        if let Some(l) = self.lanes.get_mut(&s.lane) {
            if self.cfg.prefix_cache {
                cache_blocks(&mut l.mgr, &mut s);
            }
            l.mgr.release(&s.table);
            l.mgr.credit_state(s.id);
            // Its draft KV goes too (rebuilt from its tokens if it comes back).
            if let Some(sp) = s.spec.as_mut() {
                if let Some(d) = l.drafts.get_mut(&sp.kind) {
                    d.release(&sp.table);
                }
                sp.table.clear();
                sp.kv_len = 0;
            }
            // A drafter head's seed and a block drafter's context store too.
            if let Some(sp) = s.spec.as_mut() {
                sp.seed = None;
                if let Some(b) = sp.block.take() {
                    self.account.credit(b.charged);
                }
            }
        }
        s.table.clear();
        s.kv_len = 0;
        s.state.clear();
        s.snapshot = None;
        s.state_tag = None;
        s.pending_row = None;
        s.cached_upto = 0;
        s
    }

    /// Admits the queue's front sequence onto `model` if room allows, in
    /// the lane of its KV families `kv` (keys, values; the worker resolves
    /// the request's `kv_cache`, else they are the model's own).
    /// Ok(None): admitted; Ok(Some): it ended at once; Err(seq): no room now.
    pub fn admit(
        &mut self,
        mut s: Sequence,
        model: &mut LoadedModel,
        kv: (KvSide, KvSide),
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
        let lane = LaneId::new(&s.entry.id, &kv.0, &kv.1);
        self.lane(&lane, model, kv);
        s.lane = lane.clone();
        self.measure_state(&lane, model);
        // Blocks the prompts still prefilling in this lane will take (a
        // pool split in layer groups: as many window blocks as their window
        // and prefill chunk reach at once, `window_need`).
        let (pending, pending_win) = {
            let m = self.mgr(&lane);
            self.running.iter().filter(|r| r.lane == lane && r.to_prefill() > 0).fold((0, 0), |(f, w), r| {
                let n = m.blocks_for(r.tokens.len() + 1).saturating_sub(r.table.len());
                (f + n, w + n.min(m.window_need(r.params.prefill_chunk)))
            })
        };
        let mgr = self.mgr(&lane);
        let need = mgr.blocks_for(s.tokens.len() + 1);
        let need_win = need.min(mgr.window_need(s.params.prefill_chunk));
        if need > mgr.total_blocks || !mgr.fits_budget(need, need_win) || !mgr.fits_with_state(need) {
            let state = match mgr.state_bytes() {
                Some(n) if n > 0 => format!(" and its recurrent state of {n} bytes"),
                _ => String::new(),
            };
            let msg = format!(
                "the prompt needs {need} KV blocks of {} tokens{state} but --kv-budget holds {} (KV cache {})",
                mgr.block_size, mgr.total_blocks, lane.family
            );
            return Ok(Some((s, Err(WorkerError::BadRequest(msg)))));
        }
        // Its recurrent state (hybrids) is charged while it runs, first:
        // the blocks' room check below sees what it takes.
        if !self.charge_state(&lane, s.id) {
            return Err(s);
        }
        let mgr = self.mgr(&lane);
        if !mgr.room_for(need + pending, need_win + pending_win) {
            self.shed_others(&lane, need + pending);
        }
        let prefix_cache = self.cfg.prefix_cache;
        let mgr = self.mgr_mut(&lane);
        if !mgr.room_for(need + pending, need_win + pending_win) {
            mgr.credit_state(s.id);
            return Err(s);
        }
        // Prefix cache: whole blocks of everything but the last token. Hit
        // blocks join the table as they are (shared, held by this sequence).
        s.cached_upto = 0;
        if prefix_cache {
            // Blocks read from the SSD tier must leave room for this sequence.
            // A model with recurrent state resumes from the hit's snapshot.
            // Image placeholders are keyed by their image (engine/media.rs).
            let key = super::media::cache_tokens(&s);
            let (hits, state) = mgr.lookup_state(&key[..key.len() - 1], need + pending);
            drop(key);
            s.kv_len = hits.len() * mgr.block_size;
            s.cached_upto = hits.len();
            s.table = hits;
            s.state = state.unwrap_or_default();
            s.state_tag = None;
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
        self.stats.max_running = self.stats.max_running.max(self.running.len());
        Ok(None)
    }

    /// Makes sure sequence `i` holds blocks for `n` more tokens: idle
    /// cached blocks of other lanes and models are evicted, then the newest
    /// other sequences of this lane preempted, if needed.
    fn reserve(&mut self, lane: &LaneId, i: usize, n: usize, preempted: &mut Vec<Sequence>) -> (Reserved, usize) {
        let mut i = i;
        // Window layers: the blocks wholly before this forward's first
        // query's window go back first (kv_groups.rs). Its full blocks join
        // the prefix cache before, so the window blocks released stay
        // there, idle (evictable), for a later prompt that ends near them.
        {
            let cache = self.cfg.prefix_cache;
            let s = &mut self.running[i];
            if let Some(l) = self.lanes.get_mut(lane).filter(|l| l.mgr.splits_windows()) {
                if cache {
                    cache_blocks(&mut l.mgr, s);
                }
                l.mgr.slide(&mut s.table, s.kv_len);
            }
        }
        loop {
            let extra = {
                let s = &self.running[i];
                self.mgr(lane).blocks_for(s.kv_len + n).saturating_sub(s.table.len())
            };
            if self.mgr(lane).available() < extra {
                self.shed_others(lane, extra);
            }
            if let Some(blocks) = self.mgr_mut(lane).allocate(extra) {
                self.running[i].table.extend(blocks);
                return (Reserved::Yes, i);
            }
            // Preempt the newest other sequence of this lane.
            let victim = (0..self.running.len()).rev().find(|&j| j != i && self.running[j].lane == *lane);
            let Some(j) = victim else {
                // Alone: other lanes' running sequences hold the rest of
                // the budget (it waits for them), or it never fits.
                let m = self.mgr(lane);
                let s = &self.running[i];
                let fits = m.blocks_for(s.kv_len + n) <= m.total_blocks && self.running.iter().any(|r| r.lane != *lane);
                return (if fits { Reserved::Wait } else { Reserved::Never }, i);
            };
            let mut v = self.running.remove(j);
            if j < i {
                i -= 1;
            }
            v.preempted += 1;
            self.mgr_mut(lane).stats.preemptions += 1;
            tracing::info!("preempting sequence {} ({} tokens, KV cache {}) for KV room", v.id, v.tokens.len(), lane.family);
            v = self.retire(v);
            preempted.push(v);
        }
    }

    pub fn publish(&mut self) -> EngineStats {
        self.stats.waiting = self.waiting.len();
        self.stats.running = self.running.len();
        let mut blocks: Vec<(String, BlockStats)> =
            self.lanes.iter().map(|(id, l)| (id.label(l.default), l.mgr.snapshot())).collect();
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

/// Puts a sequence's not-yet-cached full blocks (of tokens in its KV) into
/// the prefix cache, where they are (no copy), and its block-boundary state
/// snapshot (models with recurrent state) beside the block it ends.
fn cache_blocks(m: &mut BlockManager, s: &mut Sequence) {
    let full = (s.kv_len.min(s.tokens.len()) / m.block_size).min(s.table.len());
    let snap = s.snapshot.as_ref().is_some_and(|(j, _)| (1..=full).contains(j));
    if full <= s.cached_upto && !snap {
        return;
    }
    // Image placeholders are keyed by their image (engine/media.rs).
    let key = super::media::cache_tokens(s);
    let chain = m.chain(&key[..full * m.block_size]);
    for j in s.cached_upto.min(full)..full {
        let (a, b) = (j * m.block_size, (j + 1) * m.block_size);
        let parent = j.checked_sub(1).map(|p| chain[p]);
        m.insert(chain[j], parent, j, key[a..b].to_vec(), kv_groups::id(s.table[j]));
    }
    drop(key);
    s.cached_upto = s.cached_upto.max(full);
    if snap {
        let (j, state) = s.snapshot.take().expect("checked above");
        // Only beside a block the cache holds (it may have refused none, but
        // a snapshot must never outlive its block).
        if m.contains(chain[j - 1]) {
            // Idle blocks are evicted for its room if needed (keep_snapshot).
            m.keep_snapshot(chain[j - 1], state);
        }
    }
}
