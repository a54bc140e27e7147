//! The window group's blocks (kv_groups.rs): a free list of window block
//! ids of their own, charged to the KV budget at the window layers' bytes;
//! per full block, how many sequences still read it through their window
//! layers (`refs`). A full block gets a window block when it is allocated
//! (new tokens are always in the window); a sequence whose next query's
//! window has moved past a block drops its window reference (`slide`, the
//! table entry flagged `DEAD`), and a window block nobody reads goes back
//! to the free list, or, when its full block is in the prefix cache, stays
//! as an idle window block (evictable, least recently used first). A prefix
//! hit is only as long as the window blocks it needs are there (`fit`).
use super::BlockManager;
use crate::engine::kv_groups::{first_block, id, DEAD, NONE};

/// The window group's allocator state.
pub(super) struct WinAlloc {
    /// The group's window (positions).
    pub window: u32,
    /// Window block ids neither mapped nor in use (taken from the end).
    pub free: Vec<u32>,
    pub total: usize,
    /// Bytes of one window block (the window layers' keys and values).
    pub bytes: u64,
    /// Per full block: sequences that read it through their window layers.
    pub refs: Vec<u32>,
    /// Mapped window blocks no sequence reads (their full block is cached).
    pub idle: usize,
    /// Mapped window blocks.
    pub mapped: usize,
}

impl WinAlloc {
    pub fn new(window: u32, total: usize, full_total: usize) -> Self {
        Self { window, free: (0..total as u32).rev().collect(), total, bytes: 0, refs: vec![0; full_total], idle: 0, mapped: 0 }
    }
}

impl BlockManager {
    /// Full block `b`'s window block, if it has one.
    fn window_of(&self, b: u32) -> Option<u32> {
        self.pool.win.as_ref().and_then(|g| g.of(b))
    }

    /// A window block: a free one (charged), else an idle one evicted,
    /// else idle full blocks evicted until the account has room.
    fn take_window(&mut self) -> Option<u32> {
        loop {
            let w = self.win.as_mut()?;
            if let Some(&x) = w.free.last() {
                let ok = self.account.as_ref().is_none_or(|a| a.charge(w.bytes));
                if ok {
                    w.free.pop();
                    return Some(x);
                }
            }
            if let Some(x) = self.evict_window_one() {
                return Some(x);
            }
            let b = self.evict_one()?;
            self.give_free(b);
        }
    }

    /// A full block when the account's room is held by idle window blocks:
    /// they are evicted until one can be charged.
    pub(super) fn take_full_shedding_windows(&mut self) -> Option<u32> {
        loop {
            if let Some(b) = self.take_free() {
                return Some(b);
            }
            if self.shed_windows(1) == 0 {
                return None;
            }
        }
    }

    /// Gives full block `b` a window block, read by one sequence. False
    /// when none can be had.
    pub(super) fn map_window(&mut self, b: u32) -> bool {
        let Some(w) = self.take_window() else { return false };
        self.pool.set_window(b, w);
        let a = self.win.as_mut().expect("took a window block");
        a.mapped += 1;
        a.refs[b as usize] = 1;
        true
    }

    /// Unmaps full block `b`'s window block (no sequence reads it) and
    /// frees it (credited).
    pub(super) fn unmap_window(&mut self, b: u32) {
        let Some(w) = self.window_of(b) else { return };
        self.pool.set_window(b, NONE);
        let a = self.win.as_mut().expect("mapped");
        if a.refs[b as usize] == 0 && self.hash_of[b as usize].is_some() {
            a.idle -= 1;
        }
        a.refs[b as usize] = 0;
        a.mapped -= 1;
        a.free.push(w);
        let bytes = a.bytes;
        if let Some(acc) = &self.account {
            acc.credit(bytes);
        }
    }

    /// A sequence stops reading block `b` through its window layers.
    pub(super) fn drop_window_ref(&mut self, b: u32) {
        let cached = self.hash_of[b as usize].is_some();
        let Some(a) = self.win.as_mut() else { return };
        let r = &mut a.refs[b as usize];
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r > 0 {
            return;
        }
        if cached {
            a.idle += 1;
        } else {
            self.unmap_window(b);
        }
    }

    /// A sequence reads block `b` (mapped) through its window layers again.
    fn take_window_ref(&mut self, b: u32) {
        let Some(a) = self.win.as_mut() else { return };
        if a.refs[b as usize] == 0 {
            a.idle -= 1;
        }
        a.refs[b as usize] += 1;
    }

    /// Evicts the least recently used idle window block (its full block
    /// stays cached; the whole block is spilled to the SSD tier first);
    /// returns it, unmapped and still charged.
    fn evict_window_one(&mut self) -> Option<u32> {
        let a = self.win.as_ref()?;
        if a.idle == 0 {
            return None;
        }
        let pool = &self.pool;
        let (h, _) = self
            .cache
            .iter()
            .filter(|(_, c)| a.refs[c.block as usize] == 0 && pool.win.as_ref().is_some_and(|g| g.of(c.block).is_some()))
            .min_by_key(|(_, c)| (c.last_used, std::cmp::Reverse(c.depth)))?;
        let h = *h;
        let c = self.cache.remove(&h).expect("found above");
        // The block stays cached with its state snapshot; a copy goes beside it.
        let snap = self.snapshots.get(h).cloned();
        self.spill_evicted(h, &c, snap.as_ref());
        let b = c.block;
        self.cache.insert(h, c);
        let w = self.window_of(b).expect("an idle window block is mapped");
        self.pool.set_window(b, NONE);
        let a = self.win.as_mut().expect("checked");
        a.idle -= 1;
        a.mapped -= 1;
        self.stats.window_evictions += 1;
        Some(w)
    }

    /// Idle window blocks evicted to the free list until `bytes` are back
    /// in the shared account or none is left. Returns the bytes freed.
    pub(super) fn shed_windows(&mut self, bytes: u64) -> u64 {
        let mut freed = 0;
        while freed < bytes {
            let Some(w) = self.evict_window_one() else { break };
            let a = self.win.as_mut().expect("evicted one");
            a.free.push(w);
            let b = a.bytes;
            if let Some(acc) = &self.account {
                acc.credit(b);
            }
            freed += b.max(1);
        }
        freed
    }

    /// Before a sequence's next forward (its first query at `kv_len`):
    /// drops its window references on the blocks wholly before that
    /// query's window and flags them `DEAD` in its table.
    pub fn slide(&mut self, table: &mut [u32], kv_len: usize) {
        let Some(a) = self.win.as_ref() else { return };
        let first = first_block(kv_len, a.window, self.block_size).min(table.len());
        for j in (0..first).rev() {
            if table[j] & DEAD != 0 {
                break; // the blocks before were released earlier
            }
            self.drop_window_ref(table[j]);
            table[j] |= DEAD;
        }
    }

    /// A prefix hit (full blocks held; entries flagged `DEAD` hold no
    /// window reference, the others one) cut to its longest prefix whose
    /// next query finds the window blocks it reads: those take a window
    /// reference, the blocks before them are flagged `DEAD`, the blocks
    /// cut are released. Nothing without a window group.
    pub(crate) fn fit_window(&mut self, hits: &mut Vec<u32>) {
        let Some(a) = self.win.as_ref() else { return };
        let (window, bs) = (a.window, self.block_size);
        let mut n = hits.len();
        while n > 0 && !self.window_fits(hits, n) {
            n -= 1;
        }
        let cut = hits.split_off(n);
        if !cut.is_empty() {
            self.stats.window_cut_tokens += (cut.len() * bs) as u64;
            self.release(&cut);
        }
        let first = first_block(n * bs, window, bs);
        for (j, e) in hits.iter_mut().enumerate() {
            let (b, dead) = (id(*e), *e & DEAD != 0);
            if j >= first && dead {
                self.take_window_ref_of(b);
                *e = b;
            } else if j < first && !dead {
                self.drop_window_ref(b);
                *e = b | DEAD;
            }
        }
    }

    /// Whether a hit cut to its first `n` blocks leaves its next query
    /// (at `n` blocks' tokens) the window blocks it reads (always true
    /// without a window group). A hit cut shorter than `fit_window` cut it
    /// (a model with recurrent state cuts it to a snapshot) must check
    /// again: blocks it flagged `DEAD` may now be in the window.
    pub(crate) fn window_fits(&self, hits: &[u32], n: usize) -> bool {
        let Some(a) = self.win.as_ref() else { return true };
        let bs = self.block_size;
        (first_block(n * bs, a.window, bs)..n).all(|j| self.window_of(id(hits[j])).is_some())
    }

    fn take_window_ref_of(&mut self, b: u32) {
        self.take_window_ref(b)
    }

    /// Window blocks a sequence reads at once while it prefills in chunks
    /// of `chunk` tokens: its chunk and the window before it (usize::MAX
    /// without a window group: every block has all layers).
    pub fn window_need(&self, chunk: usize) -> usize {
        match self.win.as_ref() {
            Some(a) => self.blocks_for(chunk.max(1) + a.window as usize) + 1,
            None => usize::MAX,
        }
    }

    /// Whether `full` new blocks can be had now, `window` of them with a
    /// window block (without a window group: `available() >= full`).
    /// Idle blocks of either group not reused count as room: evicting
    /// them credits the account.
    pub fn room_for(&self, full: usize, window: usize) -> bool {
        let Some(a) = self.win.as_ref() else {
            return self.available() >= full;
        };
        let (reuse_f, reuse_w) = (full.min(self.idle), window.min(a.idle));
        let (new_f, new_w) = (full - reuse_f, window - reuse_w);
        if new_f > self.free.len() || new_w > a.free.len() {
            return false;
        }
        let Some(acc) = self.account.as_ref() else { return true };
        let spare = (self.idle - reuse_f) as u64 * self.block_bytes + (a.idle - reuse_w) as u64 * a.bytes;
        new_f as u64 * self.block_bytes + new_w as u64 * a.bytes <= acc.room() + spare
    }

    /// Whether `full` blocks, `window` of them with a window block, fit the
    /// whole budget at all (with nothing else held).
    pub fn fits_budget(&self, full: usize, window: usize) -> bool {
        let (Some(a), Some(acc)) = (self.win.as_ref(), self.account.as_ref()) else { return true };
        full as u64 * self.block_bytes + window as u64 * a.bytes <= acc.total()
    }

    /// Window blocks out of the free list (charged).
    pub(super) fn window_charged(&self) -> usize {
        self.win.as_ref().map(|a| a.total - a.free.len()).unwrap_or(0)
    }

    /// Window references from the tables that hold blocks now (after a
    /// panic): window blocks nobody reads become idle (cached) or free.
    pub(super) fn rebuild_window_refs<'a>(&mut self, tables: impl IntoIterator<Item = &'a [u32]>) {
        let Some(a) = self.win.as_mut() else { return };
        a.refs.iter_mut().for_each(|r| *r = 0);
        for t in tables {
            for &e in t.iter().filter(|&&e| e & DEAD == 0) {
                if let Some(r) = a.refs.get_mut(e as usize) {
                    *r += 1;
                }
            }
        }
        let mapped: Vec<u32> = (0..self.total_blocks as u32).filter(|&b| self.window_of(b).is_some()).collect();
        let a = self.win.as_mut().expect("checked");
        a.idle = mapped.iter().filter(|&&b| a.refs[b as usize] == 0 && self.hash_of[b as usize].is_some()).count();
        let orphans: Vec<u32> = mapped.into_iter().filter(|&b| a.refs[b as usize] == 0 && self.hash_of[b as usize].is_none()).collect();
        for b in orphans {
            self.unmap_window(b);
        }
    }

    /// Mapped window blocks (held or idle).
    pub fn window_blocks(&self) -> usize {
        self.win.as_ref().map(|a| a.mapped).unwrap_or(0)
    }

    /// Window blocks some sequence reads (mapped, not idle).
    pub fn window_held(&self) -> usize {
        self.win.as_ref().map(|a| a.mapped - a.idle).unwrap_or(0)
    }

    /// Whether the pool keeps its window layers in blocks of their own.
    pub fn splits_windows(&self) -> bool {
        self.win.is_some()
    }
}
