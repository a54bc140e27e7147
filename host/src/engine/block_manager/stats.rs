//! What the block manager reports (`/metrics`, the metrics database).
use super::BlockManager;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BlockStats {
    pub block_size: usize,
    /// Bytes of one block (keys and values of every layer).
    pub block_bytes: u64,
    pub total_blocks: usize,
    /// Held by running sequences (a block several share counts once).
    pub seq_blocks: usize,
    /// In the prefix cache (some may also be held by running sequences).
    pub cached_blocks: usize,
    /// Neither held nor cached.
    pub free_blocks: usize,
    /// Blocks the pool's arrays hold now (it grows on demand up to total_blocks).
    pub pool_blocks: usize,
    pub prefix_hits: u64,
    pub prefix_misses: u64,
    /// Tokens whose prefill a prefix-cache hit skipped.
    pub prefix_hit_tokens: u64,
    pub evictions: u64,
    pub preemptions: u64,
    /// SSD tier (`--kv-ssd-dir`): blocks read back from disk, blocks written
    /// to disk, blocks and bytes on disk now, and files found corrupt and skipped.
    pub ssd_reads: u64,
    pub ssd_writes: u64,
    pub ssd_blocks: u64,
    pub ssd_bytes: u64,
    pub ssd_corrupt: u64,
    /// Recurrent-state snapshots written to the SSD tier beside their
    /// blocks, and read back from it (ssd/state.rs).
    pub ssd_state_writes: u64,
    pub ssd_state_reads: u64,
    /// Layer groups (kv_groups.rs): bytes of one window block (the window
    /// layers' share of `block_bytes`; 0 when the layers are not split),
    /// window blocks mapped now (read by sequences or idle in the cache),
    /// idle window blocks evicted, and prefix-hit tokens cut because the
    /// window blocks a hit's next query reads were gone.
    pub window_block_bytes: u64,
    pub window_blocks: usize,
    /// Window blocks sequences read now (the rest of `window_blocks` is idle).
    pub window_held: usize,
    pub window_evictions: u64,
    pub window_cut_tokens: u64,
    /// Recurrent state (hybrids, state.rs): one running sequence's bytes,
    /// the running sequences' bytes charged to the budget now, and the
    /// prefix cache's state snapshots' bytes (charged too).
    pub state_bytes: u64,
    pub live_state_bytes: u64,
    pub snapshot_bytes: u64,
}

impl BlockManager {
    pub fn snapshot(&self) -> BlockStats {
        let mut s = BlockStats {
            block_size: self.block_size,
            block_bytes: self.block_bytes,
            total_blocks: self.total_blocks,
            seq_blocks: self.held,
            cached_blocks: self.cache.len(),
            free_blocks: self.free.len(),
            pool_blocks: self.pool.capacity(),
            window_blocks: self.window_blocks(),
            window_held: self.window_held(),
            state_bytes: self.state_bytes.unwrap_or(0),
            live_state_bytes: self.live_states().1,
            snapshot_bytes: self.snapshots.bytes,
            ..self.stats.clone()
        };
        if let Some(w) = self.win.as_ref() {
            // A block position in every layer: the full block and its window block.
            s.window_block_bytes = w.bytes;
            s.block_bytes += w.bytes;
        }
        if let Some(ssd) = self.ssd.as_ref() {
            s.ssd_reads = ssd.reads;
            s.ssd_writes = ssd.writes;
            s.ssd_blocks = ssd.blocks();
            s.ssd_bytes = ssd.bytes();
            s.ssd_corrupt = ssd.corrupt;
            s.ssd_state_writes = ssd.state_writes;
            s.ssd_state_reads = ssd.state_reads;
        }
        s
    }
}
