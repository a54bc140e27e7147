//! The paged KV store's block allocator and the automatic prefix cache.
//!
//! Storage (see docs/KV_CACHE.md): a model's KV lives in one pool of
//! physical blocks of `block_size` tokens (`kv_pool::KvPool`, owned here);
//! a running sequence holds a block table (ids into the pool). Blocks are
//! reference-counted by the sequences whose tables hold them. The prefix
//! cache maps a chained hash of a full block's token ids and the
//! model/dtype/KV-family signature to a physical block (keyed SipHash: the
//! key is random per process, or kept in the SSD tier's directory, so no
//! client can craft a prompt that collides on purpose; a hit is confirmed
//! against the block's own tokens, its parent block and its depth, so a
//! collision is never served): a sequence's full
//! blocks join the cache where they are (no copy), and a later request that
//! matches takes those same blocks into its own table (shared, no copy,
//! no recompute). A cached block no sequence holds is idle; idle blocks are
//! evicted least recently used first (deepest first among equals) when a
//! sequence needs room. With an SSD tier (`ssd::SsdStore`) an evicted block
//! is written to disk first, and a lookup that misses in memory goes on along
//! the chain on disk; blocks read back are written into a free pool block and
//!
//! By concept: `hash` (the keyed chain hashes), `allocator` (the free list,
//! reference counts and the shared KV budget), `prefix` (the prefix cache:
//! insert, lookup, LRU eviction), `ssd_tier` (spilling to and reading back
//! from the SSD tier), `stats` (what is reported), `window` (the window
//! layers' blocks of a pool split in layer groups, kv_groups.rs), `state`
//! (running sequences' recurrent state charged to the budget).
mod allocator;
mod hash;
mod prefix;
mod ssd_tier;
mod state;
mod stats;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_window;
mod window;

pub use hash::{block_hash, signature_hash, HashKey};
pub use prefix::CachedBlock;
pub use state::probe_state_bytes;
pub use stats::BlockStats;

use super::kv_budget::KvAccount;
use super::kv_pool::KvPool;
use super::recurrent::Snapshots;
use super::ssd::SsdStore;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub struct BlockManager {
    pub block_size: usize,
    pub total_blocks: usize,
    pub signature: u64,
    /// The chain hashes' key.
    key: HashKey,
    /// Test hook: chain hashes ignore the parent and the tokens (every
    /// block collides), to show that the checks alone keep prompts apart.
    #[doc(hidden)]
    pub constant_hash: bool,
    pub pool: KvPool,
    /// Blocks neither held nor cached (taken from the end: low ids first).
    free: Vec<u32>,
    /// Per block: how many sequences' tables hold it.
    refs: Vec<u32>,
    /// Per block: its hash while it is in the prefix cache.
    hash_of: Vec<Option<u64>>,
    /// The engine's KV budget, shared with the other models: every block out
    /// of the free list is charged `block_bytes` there.
    account: Option<Arc<KvAccount>>,
    block_bytes: u64,
    /// Blocks with refs > 0.
    held: usize,
    /// Cached blocks with refs == 0 (evictable).
    idle: usize,
    cache: HashMap<u64, CachedBlock>,
    clock: u64,
    ssd: Option<SsdStore>,
    /// The model keeps recurrent state (recurrent.rs): a prefix hit is only
    /// as deep as its deepest block with a state snapshot.
    pub recurrent: bool,
    /// State snapshots of cached blocks, by block hash (dropped with the block).
    pub snapshots: Snapshots,
    /// Bytes of one running sequence's recurrent state (state.rs; None
    /// until measured), and the sequences whose state is charged now.
    state_bytes: Option<u64>,
    live_states: HashSet<u64>,
    pub stats: BlockStats,
    /// The window group's blocks, when the pool splits its layers.
    win: Option<window::WinAlloc>,
}

impl BlockManager {
    pub fn new(pool: KvPool, signature: &str) -> Self {
        let total_blocks = pool.max_blocks;
        let win = pool.win.as_ref().map(|g| window::WinAlloc::new(g.window, g.max, total_blocks));
        Self {
            block_size: pool.block_size.max(1),
            total_blocks,
            signature: signature_hash(signature),
            key: HashKey::random(),
            constant_hash: false,
            pool,
            free: (0..total_blocks as u32).rev().collect(),
            refs: vec![0; total_blocks],
            hash_of: vec![None; total_blocks],
            account: None,
            block_bytes: 0,
            held: 0,
            idle: 0,
            cache: HashMap::new(),
            clock: 0,
            ssd: None,
            recurrent: false,
            snapshots: Snapshots::default(),
            state_bytes: None,
            live_states: HashSet::new(),
            stats: BlockStats::default(),
            win,
        }
    }

    /// Draws this model's blocks from `account` (the engine's one KV
    /// budget), `block_bytes` each (the full group's layers, when the pool
    /// splits them; its window blocks are charged the window layers' bytes);
    /// `total_blocks` is then only a ceiling.
    pub fn with_account(mut self, account: Arc<KvAccount>, block_bytes: u64) -> Self {
        self.snapshots.with_account(account.clone());
        if let Some(w) = self.win.as_mut() {
            w.bytes = (self.pool.group_bytes_per_token().1 * self.block_size) as u64;
        }
        self.account = Some(account);
        self.block_bytes = block_bytes;
        self
    }

    /// Blocks a table needs for `len` tokens.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }
}
