//! Lanes: the sequences of one model whose KV cache uses one pair of
//! families (keys, values). Each lane has its own block manager and paged
//! pool (families never share blocks: the prefix-cache and SSD signature
//! carry the family key), its own pipelined tokens and its own decode
//! forward per step. Every lane draws its blocks from the engine's one KV
//! account, as models do.
use super::super::block_manager::{signature_hash, BlockManager};
use super::super::kv_pool::{family_key, KvPool, KvSide};
use super::super::compiled_paged::CompiledPaged;
use super::super::speculative::DraftKind;
use super::super::LoadedModel;
use super::{Scheduler, SchedulerConfig};
use mlx_rs::Array;

/// A lane: a model and its KV families' key (`f32`, `q4`, `q8/turbo3`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneId {
    pub model: String,
    pub family: String,
}

impl LaneId {
    /// The lane of `model_id`'s sequences whose keys and values use `k` and `v`.
    pub fn new(model_id: &str, k: &KvSide, v: &KvSide) -> Self {
        Self { model: model_id.to_string(), family: family_key(k, v) }
    }

    /// How stats and metrics name the lane: the model id for the model's
    /// own families (what every request without `kv_cache` uses), else
    /// `MODEL kv=FAMILY`.
    pub fn label(&self, default: bool) -> String {
        if default {
            self.model.clone()
        } else {
            format!("{} kv={}", self.model, self.family)
        }
    }
}

/// One lane's state.
pub struct Lane {
    pub mgr: BlockManager,
    /// The last pipelined decode step's tokens, [B, 1] on the device, not
    /// read yet (rows point in with `Sequence::pending_row`).
    pub pending: Option<Array>,
    /// Whether these are the model's own families (`LoadedModel::kv`).
    pub default: bool,
    /// Each drafter's pool and blocks for this lane's speculating
    /// sequences (spec.rs), by kind, each made on first use; a block
    /// drafter (dflash) keeps its context per sequence and has none.
    pub drafts: std::collections::BTreeMap<DraftKind, BlockManager>,
    /// The lane's compiled decode step (compiled_paged.rs); dropped with
    /// the lane, on the engine thread.
    pub compiled: CompiledPaged,
}

impl Lane {
    /// A lane of `model` whose keys and values use `k` and `v`: its pool
    /// may take up to the whole shared budget, counted in its own real bytes
    /// per block (a compressed family fits proportionally more blocks).
    fn new(cfg: &SchedulerConfig, account: &std::sync::Arc<super::KvAccount>, id: &LaneId, model: &LoadedModel, k: KvSide, v: KvSide) -> Self {
        let s = &model.spec;
        // Each layer as the model declares it (kv_layout.rs: its own shape,
        // SHARED with an earlier layer, or recurrent state). The worker
        // checked the layout fits the families (`lane_kv`).
        // Window layers in a group of their own (kv_groups.rs): they keep
        // only the blocks their window reads (`RMLX_KV_WINDOW_GROUPS=0`:
        // every layer keeps every block, for A/B runs).
        let split = std::env::var("RMLX_KV_WINDOW_GROUPS").map_or(true, |v| v != "0");
        let pool = match KvPool::for_model(model, k.clone(), v.clone(), cfg.block_size, 0) {
            Ok(p) if split => p.split_windows(),
            Ok(p) => p,
            Err(e) => {
                tracing::error!("{e:#}; the lane's layers are taken as uniform");
                KvPool::new(s.num_layers as usize, k, v, cfg.block_size, 0)
            }
        };
        // What the pool's arrays really take per block: every layer that
        // stores K/V (shared and recurrent-state layers store none), keys
        // and values in the layer's own shape, scales and norms included.
        // Split in layer groups: a full block is charged the full layers'
        // bytes, a window block the window layers' (the block manager).
        let (full_bytes, win_bytes) = pool.group_bytes_per_token();
        let per_block = (full_bytes * cfg.block_size) as u64;
        let win_block = (win_bytes * cfg.block_size) as u64;
        // A ceiling: the blocks the whole budget holds; what the lane may
        // take at a time is what the shared account has left.
        let total = (account.total() / per_block.max(1)) as usize;
        let win_total = (account.total() / win_block.max(1)) as usize;
        // The config's hash, the KV shape and families too: the SSD tier outlives the process.
        let config_hash = signature_hash(&model.dir.config.to_string());
        let sig = format!(
            "{}|{}|dtype{}|L{}xK{}xD{}|config{:016x}|kv:{}-v2{}",
            model.dir.path.display(),
            model.dir.model_type,
            model.kv_bytes,
            s.num_layers,
            s.num_kv_heads,
            s.head_dim,
            config_hash,
            id.family,
            // Calibrated families encode differently: their blocks never mix with others'.
            match (pool.k.calibration, pool.v.calibration) {
                (None, None) => String::new(),
                (a, b) => format!("|cal{:016x}/{:016x}", a.unwrap_or(0), b.unwrap_or(0)),
            }
        );
        let default = id.family == super::super::kv_family::family_key_of(model);
        let name = id.label(default);
        tracing::info!(
            "KV for {name}: family {}, up to {total} blocks of {} tokens ({per_block} bytes each) from the shared budget",
            id.family,
            cfg.block_size
        );
        if let Some(w) = pool.win.as_ref() {
            tracing::info!("KV for {name}: window layers ({} positions) in blocks of their own, {win_block} bytes each", w.window);
        }
        let pool = pool.with_max_blocks(total).with_window_max(win_total);
        let compiled = CompiledPaged::new(model, &pool);
        let mut mgr = BlockManager::new(pool, &sig).with_account(account.clone(), per_block);
        mgr.recurrent = model.cache_layers.iter().any(|l| l.kind == rmlx_plugin_api::cache_kind::STATE);
        // A model with recurrent state keeps its blocks' state snapshots in
        // the SSD tier beside them (ssd/state.rs).
        if let Some(ssd) = cfg.ssd.as_ref().filter(|_| cfg.prefix_cache) {
            match super::super::ssd::SsdStore::open(ssd, mgr.signature) {
                Ok(store) => {
                    tracing::info!("KV SSD tier for {name}: {} blocks on disk", store.blocks());
                    mgr.attach_ssd(store);
                }
                Err(e) => tracing::warn!("KV SSD tier for {name} is off: {e:#}"),
            }
        }
        Self { mgr, pending: None, default, drafts: Default::default(), compiled }
    }
}

impl Scheduler {
    /// Lane `id`'s block manager, made on first use with the families `kv`
    /// (keys, values) of `model`.
    pub fn lane(&mut self, id: &LaneId, model: &LoadedModel, kv: (KvSide, KvSide)) -> &mut BlockManager {
        let (cfg, account) = (&self.cfg, &self.account);
        &mut self.lanes.entry(id.clone()).or_insert_with(|| Lane::new(cfg, account, id, model, kv.0, kv.1)).mgr
    }

    /// The default lane's block manager of `model_id` (the model's own
    /// families), made on first use.
    pub fn manager(&mut self, model_id: &str, model: &LoadedModel) -> &mut BlockManager {
        let id = LaneId::new(model_id, &model.kv.0, &model.kv.1);
        self.lane(&id, model, model.kv.clone())
    }

    /// The lane's block manager (it exists while sequences use it).
    pub(super) fn mgr(&self, lane: &LaneId) -> &BlockManager {
        &self.lanes[lane].mgr
    }

    pub(super) fn mgr_mut(&mut self, lane: &LaneId) -> &mut BlockManager {
        &mut self.lanes.get_mut(lane).expect("a running sequence's lane exists").mgr
    }

    /// Makes room for `blocks` more blocks of `lane` in the shared budget by
    /// evicting idle cached blocks of the other lanes (of this model and the
    /// others), least recently used first.
    pub(super) fn shed_others(&mut self, lane: &LaneId, blocks: usize) {
        let Some(m) = self.lanes.get(lane) else { return };
        let want = (blocks.saturating_sub(m.mgr.available()) as u64) * m.mgr.snapshot().block_bytes;
        let mut freed = 0;
        for (id, other) in self.lanes.iter_mut() {
            if freed >= want {
                break;
            }
            if id != lane {
                freed += other.mgr.shed(want - freed);
            }
        }
    }

    /// Measures once what one sequence's recurrent state takes in `lane`
    /// (models with STATE layers; block_manager/state.rs), so that running
    /// sequences are charged it. A probe that fails leaves it uncharged.
    pub(super) fn measure_state(&mut self, lane: &LaneId, model: &mut LoadedModel) {
        let m = self.mgr(lane);
        if !m.recurrent || m.state_bytes().is_some() {
            return;
        }
        let name = lane.label(self.lanes[lane].default);
        let bytes = match super::super::block_manager::probe_state_bytes(model) {
            Ok(n) => {
                tracing::info!("KV for {name}: recurrent state of {n} bytes per running sequence, charged to the shared budget");
                n
            }
            Err(e) => {
                tracing::warn!("KV for {name}: the recurrent state's size is unknown ({e:#}); running sequences' states are not charged to the budget");
                0
            }
        };
        self.mgr_mut(lane).set_state_bytes(bytes);
    }

    /// Charges sequence `id`'s recurrent state to the budget while it runs
    /// (nothing for models without one), evicting idle cached blocks (this
    /// lane's, then the others') if that makes room. False: no room now.
    pub(super) fn charge_state(&mut self, lane: &LaneId, id: u64) -> bool {
        if self.mgr_mut(lane).charge_state(id) {
            return true;
        }
        let want = self.mgr(lane).state_bytes().unwrap_or(0);
        let mut freed = self.mgr_mut(lane).shed(want);
        for (other, l) in self.lanes.iter_mut() {
            if freed >= want {
                break;
            }
            if other != lane {
                freed += l.mgr.shed(want - freed);
            }
        }
        self.mgr_mut(lane).charge_state(id)
    }

    /// Lanes with running sequences, in a fixed order.
    pub fn busy_lanes(&self) -> Vec<LaneId> {
        let mut v: Vec<LaneId> = self.running.iter().map(|s| s.lane.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}
