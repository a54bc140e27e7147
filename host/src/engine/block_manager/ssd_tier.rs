//! The prefix cache's SSD tier: evicted blocks are written to disk, a
//! lookup that misses in memory reads them back into a free pool block, and
//! a manager going away spills what is not on disk yet.
use super::prefix::CachedBlock;
use super::BlockManager;
use crate::engine::recurrent::RowState;
use crate::engine::ssd::SsdStore;

impl BlockManager {
    /// Adds the SSD tier: evicted blocks are written there, misses looked up
    /// there. The chain hashes take the tier's key (kept on disk with its
    /// blocks), so attach it before anything is cached.
    pub fn attach_ssd(&mut self, store: SsdStore) {
        self.clear_cache();
        self.key = store.key();
        self.ssd = Some(store);
    }

    pub fn ssd(&mut self) -> Option<&mut SsdStore> {
        self.ssd.as_mut()
    }

    /// Reads block `h` from the SSD tier into a free pool block and the
    /// memory cache; false on a miss, a bad file, or no room.
    pub(super) fn load_from_ssd(
        &mut self,
        h: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: &[u32],
        keep_free: usize,
    ) -> bool {
        if self.ssd.is_none() || self.available() <= keep_free {
            return false;
        }
        if !self.ssd.as_mut().unwrap().contains(h) {
            return false;
        }
        match self.ssd.as_mut().unwrap().load(h, parent, depth, tokens) {
            Some(kv) => self.insert_data(h, parent, depth, tokens.to_vec(), &kv),
            None => false,
        }
    }

    /// Block `h`'s recurrent-state snapshot from the SSD tier (checked
    /// against one sequence's state bytes), kept in memory again beside
    /// the block when the budget has room. None: none there, or a bad file.
    pub(crate) fn load_state_from_ssd(&mut self, h: u64, parent: Option<u64>, depth: usize, tokens: &[u32]) -> Option<RowState> {
        let want = self.state_bytes.filter(|&n| n > 0);
        let st = self.ssd.as_mut()?.load_state(h, parent, depth, tokens, want)?;
        if self.cache.contains_key(&h) {
            self.snapshots.put(h, st.clone());
        }
        Some(st)
    }

    /// An evicted block goes to the SSD tier (if there is one) unless it is
    /// on disk already, in which case it is marked used there; its state
    /// snapshot `snap` (a model with recurrent state) goes beside it.
    pub(super) fn spill_evicted(&mut self, h: u64, c: &CachedBlock, snap: Option<&RowState>) {
        let Some(ssd) = self.ssd.as_mut() else { return };
        if ssd.contains(h) {
            ssd.touch(h); // already on disk: marks it used
        } else if !self.pool.whole(c.block) {
            // Its window layers' data was released (kv_groups.rs): the tier
            // keeps whole blocks only (it was spilled when that happened,
            // unless the tier was full or the block was still in use).
            return;
        } else {
            match self.pool.read_block(c.block) {
                Ok(kv) => {
                    if !ssd.put(h, c.parent, c.depth, &c.tokens, &kv) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("KV SSD tier: reading block {} failed: {e:#}", c.block);
                    return;
                }
            }
        }
        if let Some(st) = snap {
            ssd.put_state(h, c.parent, c.depth, &c.tokens, st, false);
        }
    }
}

/// A manager going away (model unloaded, engine shut down) spills its
/// cached blocks that are not on disk yet, so a restart reuses the whole
/// prefix cache, not only what had been evicted.
impl Drop for BlockManager {
    fn drop(&mut self) {
        // The model's share of the budget goes back to the others.
        if let Some(a) = &self.account {
            a.credit(self.charged() as u64 * self.block_bytes);
            a.credit(self.window_charged() as u64 * self.win.as_ref().map_or(0, |w| w.bytes));
            a.credit(self.live_states().1);
        }
        let Some(ssd) = self.ssd.as_mut() else { return };
        let mut blocks: Vec<(&u64, &CachedBlock)> = self.cache.iter().collect();
        // Roots first: if the cap stops the spill, what is on disk is matchable.
        blocks.sort_by_key(|(_, c)| c.depth);
        let mut n = 0;
        for (h, c) in blocks {
            let on_disk = ssd.contains(*h)
                || (self.pool.whole(c.block)
                    && match self.pool.read_block(c.block) {
                        Ok(kv) if ssd.put_wait(*h, c.parent, c.depth, &c.tokens, &kv) => {
                            n += 1;
                            true
                        }
                        Ok(_) => false,
                        Err(e) => {
                            tracing::warn!("KV SSD tier: reading block {} failed: {e:#}", c.block);
                            false
                        }
                    });
            // Its state snapshot (models with recurrent state) goes beside it.
            if let Some(st) = self.snapshots.get(*h).filter(|_| on_disk) {
                ssd.put_state(*h, c.parent, c.depth, &c.tokens, st, true);
            }
        }
        if n > 0 {
            tracing::info!("KV SSD tier: spilled {n} cached blocks");
        }
    }
}
