//! The prefix cache: full blocks keyed by their chained hash, matched
//! against their own tokens, parent and depth; idle blocks evicted least
//! recently used first, a chain's leaves before its root.
use super::hash::block_hash;
use super::BlockManager;
use crate::engine::kv_groups::DEAD;
use mlx_rs::Array;

/// One cached block: its tokens, its parent and depth (all checked on every
/// match, so a hash collision is never served) and the physical block
/// holding its KV.
pub struct CachedBlock {
    pub tokens: Vec<u32>,
    pub block: u32,
    /// The previous block of its chain (None for a first block).
    pub parent: Option<u64>,
    pub depth: usize,
    pub(super) last_used: u64,
}

impl BlockManager {
    /// Evicts the least recently used idle cached block (deepest first among
    /// equals), spilling it to the SSD tier first; returns its id, now unheld
    /// and uncached.
    pub(super) fn evict_one(&mut self) -> Option<u32> {
        let (h, _) = self
            .cache
            .iter()
            .filter(|(_, c)| self.refs[c.block as usize] == 0)
            .min_by_key(|(_, c)| (c.last_used, std::cmp::Reverse(c.depth)))?;
        let h = *h;
        let c = self.cache.remove(&h).unwrap();
        let snap = self.snapshots.take(h);
        self.idle -= 1;
        self.stats.evictions += 1;
        // Its state snapshot (if any) goes to the SSD tier with it.
        self.spill_evicted(h, &c, snap.as_ref());
        // Its window block goes too (the block id is reused).
        self.unmap_window(c.block);
        self.hash_of[c.block as usize] = None;
        Some(c.block)
    }

    /// Hashes of the full blocks of `tokens`.
    pub fn chain(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent = 0u64;
        tokens
            .chunks_exact(self.block_size)
            .map(|c| {
                parent = if self.constant_hash { 7 } else { block_hash(&self.key, parent, self.signature, c) };
                parent
            })
            .collect()
    }

    /// The longest cached prefix of `tokens` in whole blocks: its physical
    /// blocks, held for the caller (give them back with `release`, usually
    /// as part of the caller's table). Counts a hit or a miss.
    pub fn lookup(&mut self, tokens: &[u32]) -> Vec<u32> {
        self.lookup_keeping(tokens, 0)
    }

    /// [`lookup`](Self::lookup); blocks missing in memory are read from the
    /// SSD tier (into free pool blocks) only while more than `keep_free`
    /// blocks stay available, so the caller can still allocate them.
    /// A pool split in layer groups: the hit is cut to where its next
    /// query's window blocks are all there (`fit_window`), and its entries
    /// before that window come flagged `DEAD`.
    pub fn lookup_keeping(&mut self, tokens: &[u32], keep_free: usize) -> Vec<u32> {
        self.clock += 1;
        let mut found = Vec::new();
        let mut parent = None;
        for (i, h) in self.chain(tokens).into_iter().enumerate() {
            let want = &tokens[i * self.block_size..(i + 1) * self.block_size];
            // A hit is this very block: its tokens, after the block this
            // lookup matched last (whose own check covers its parent, and so
            // on to the first block), at this depth.
            let here = match self.cache.get(&h) {
                Some(c) => c.tokens == want && c.parent == parent && c.depth == i,
                None => self.load_from_ssd(h, parent, i, want, keep_free),
            };
            if !here {
                break;
            }
            let c = self.cache.get_mut(&h).unwrap();
            c.last_used = self.clock;
            let b = c.block;
            self.hold(b);
            // Held, no window reference yet (`fit_window` takes those).
            found.push(if self.win.is_some() { b | DEAD } else { b });
            parent = Some(h);
        }
        self.fit_window(&mut found);
        if found.is_empty() {
            self.stats.prefix_misses += 1;
        } else {
            self.stats.prefix_hits += 1;
            self.stats.prefix_hit_tokens += (found.len() * self.block_size) as u64;
        }
        found
    }


    /// Caches new data (per layer (keys, values) [1, K, block, hd]) in a
    /// block of its own, idle. False when no block can be had.
    pub fn insert_data(
        &mut self,
        h: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: Vec<u32>,
        kv: &[Array],
    ) -> bool {
        if self.cache.contains_key(&h) {
            return true;
        }
        let Some(b) = self.allocate(1).map(|v| v[0]) else {
            return false;
        };
        if let Err(e) = self.pool.write_block(b, kv) {
            tracing::warn!("KV block write failed: {e:#}");
            self.release(&[b]);
            return false;
        }
        self.insert(h, parent, depth, tokens, b);
        self.release(&[b]);
        true
    }

    pub fn get(&self, h: u64) -> Option<&CachedBlock> {
        self.cache.get(&h)
    }

    pub fn contains(&self, h: u64) -> bool {
        self.cache.contains_key(&h)
    }

    /// Puts a sequence's full block `b` into the prefix cache where it is
    /// (no copy), child of `parent`. When another block already caches the
    /// same hash, that one stays (and `b` stays private to its sequence).
    pub fn insert(&mut self, h: u64, parent: Option<u64>, depth: usize, tokens: Vec<u32>, b: u32) {
        if let Some(c) = self.cache.get_mut(&h) {
            c.last_used = self.clock;
            self.touch_ancestors(parent);
            return;
        }
        if self.hash_of[b as usize].is_some() {
            return; // already cached under another hash: never two
        }
        self.hash_of[b as usize] = Some(h);
        if self.refs[b as usize] == 0 {
            self.idle += 1;
        }
        self.cache.insert(
            h,
            CachedBlock {
                tokens,
                block: b,
                parent,
                depth,
                last_used: self.clock,
            },
        );
        self.touch_ancestors(parent);
    }

    /// Makes a block's ancestors at least as recent as it, so eviction (least
    /// recently used, deepest first among equals) takes a chain's leaves
    /// before its root and chains stay matchable. Stops at an ancestor
    /// already that recent, so inserting a chain block by block is linear.
    pub(super) fn touch_ancestors(&mut self, mut parent: Option<u64>) {
        while let Some(h) = parent {
            match self.cache.get_mut(&h) {
                Some(c) if c.last_used < self.clock => {
                    c.last_used = self.clock;
                    parent = c.parent;
                }
                _ => break,
            }
        }
    }


    /// Drops every idle cached block.
    pub fn clear_cache(&mut self) {
        let idle: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, c)| self.refs[c.block as usize] == 0)
            .map(|(h, _)| *h)
            .collect();
        for h in idle {
            let c = self.cache.remove(&h).unwrap();
            self.unmap_window(c.block);
            self.hash_of[c.block as usize] = None;
            self.snapshots.remove(h);
            self.idle -= 1;
            self.give_free(c.block);
        }
    }
}
