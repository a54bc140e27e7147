//! The block allocator: the free list (low ids first), per-block reference
//! counts (one per sequence table holding a block), and the engine's shared
//! KV budget every block out of the free list is charged to. A pool split
//! in layer groups (kv_groups.rs) gives each new block a window block too
//! (window.rs); table entries flagged `DEAD` hold no window reference.
use super::BlockManager;
use crate::engine::kv_groups::{id, DEAD};

impl BlockManager {
    /// A free block, charged to the account; None when there is none or the
    /// account has no room.
    pub(super) fn take_free(&mut self) -> Option<u32> {
        let b = *self.free.last()?;
        if let Some(a) = &self.account {
            if !a.charge(self.block_bytes) {
                return None;
            }
        }
        self.free.pop();
        Some(b)
    }

    /// A block back to the free list (credited to the account).
    pub(super) fn give_free(&mut self, b: u32) {
        if let Some(a) = &self.account {
            a.credit(self.block_bytes);
        }
        self.free.push(b);
    }

    /// Blocks out of the free list (what the account is charged for).
    pub(super) fn charged(&self) -> usize {
        self.total_blocks - self.free.len()
    }

    /// Evicts idle cached blocks (least recently used first) to the free
    /// list until `bytes` are back in the shared account or none is left
    /// (another model needs the room). Returns the bytes freed.
    pub fn shed(&mut self, bytes: u64) -> u64 {
        let mut freed = 0;
        while freed < bytes && self.idle > 0 {
            let w = self.window_blocks();
            let Some(b) = self.evict_one() else { break };
            self.give_free(b);
            freed += self.block_bytes + (w - self.window_blocks()) as u64 * self.win.as_ref().map_or(0, |a| a.bytes);
        }
        if freed < bytes {
            freed += self.shed_windows(bytes - freed);
        }
        freed
    }


    /// Blocks that could be handed out now: idle cached ones, and free ones
    /// the shared account has room for.
    pub fn available(&self) -> usize {
        let free = match &self.account {
            Some(a) => self.free.len().min((a.room() / self.block_bytes.max(1)) as usize),
            None => self.free.len(),
        };
        if self.win.is_none() {
            return free + self.idle;
        }
        // Each new block takes a window block too: the most n for which
        // both can be had from the account's one room.
        let fits = |n: usize| self.room_for(n, n);
        let (mut lo, mut hi) = (0, self.free.len() + self.idle);
        while lo < hi {
            let mid = (lo + hi + 1) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// `n` blocks for a sequence's table (each held once), evicting idle
    /// cached blocks if needed. None (and nothing taken) when they cannot be had.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.take_free().or_else(|| self.evict_one()) {
                Some(b) => b,
                // The account's room is held by idle window blocks.
                None if self.win.is_some() => match self.take_full_shedding_windows() {
                    Some(b) => b,
                    None => {
                        self.release(&out);
                        return None;
                    }
                },
                None => unreachable!("available() counted an idle block"),
            };
            self.refs[b as usize] = 1;
            self.held += 1;
            out.push(b);
            if self.win.is_some() && !self.map_window(b) {
                self.release(&out);
                return None;
            }
        }
        Some(out)
    }

    /// A sequence takes a reference to block `b` (a prefix-cache hit).
    pub(super) fn hold(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        if *r == 0 {
            self.held += 1;
            if self.hash_of[b as usize].is_some() {
                self.idle -= 1;
            }
        }
        *r += 1;
    }

    /// A sequence gives its table's blocks back: cached blocks nobody holds
    /// become idle (evictable), the others free.
    pub fn release(&mut self, table: &[u32]) {
        self.clock += 1;
        for &e in table {
            let b = id(e);
            if e & DEAD == 0 {
                self.drop_window_ref(b);
            }
            let r = &mut self.refs[b as usize];
            if *r == 0 {
                continue;
            }
            *r -= 1;
            if *r > 0 {
                continue;
            }
            self.held -= 1;
            match self.hash_of[b as usize] {
                Some(h) => {
                    self.idle += 1;
                    if let Some(c) = self.cache.get_mut(&h) {
                        c.last_used = self.clock;
                        let parent = c.parent;
                        self.touch_ancestors(parent);
                    }
                }
                None => {
                    self.unmap_window(b);
                    self.give_free(b)
                }
            }
        }
    }


    /// Sets every block's references from the tables that hold blocks now
    /// (after a panic left some sequence's references behind): blocks no
    /// table holds become idle (cached) or free. The prefix cache is kept.
    pub fn rebuild_refs<'a>(&mut self, tables: impl IntoIterator<Item = &'a [u32]>) {
        let tables: Vec<&[u32]> = tables.into_iter().collect();
        self.refs = vec![0; self.total_blocks];
        for t in &tables {
            for &e in t.iter() {
                if let Some(r) = self.refs.get_mut(id(e) as usize) {
                    *r += 1;
                }
            }
        }
        self.rebuild_window_refs(tables.iter().copied());
        let before = self.charged();
        self.held = self.refs.iter().filter(|&&r| r > 0).count();
        self.idle = (0..self.total_blocks)
            .filter(|&b| self.refs[b] == 0 && self.hash_of[b].is_some())
            .count();
        self.free = (0..self.total_blocks as u32)
            .rev()
            .filter(|&b| self.refs[b as usize] == 0 && self.hash_of[b as usize].is_none())
            .collect();
        if let Some(a) = &self.account {
            a.credit(before.saturating_sub(self.charged()) as u64 * self.block_bytes);
        }
    }
}
