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
//! join the memory cache like any other.
use super::kv_budget::KvAccount;
use super::kv_pool::KvPool;
use super::recurrent::Snapshots;
use super::ssd::SsdStore;
use mlx_rs::Array;
use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Arc;

/// The prefix cache's hash key (SipHash-2-4's 128 bits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey(pub [u8; 16]);

impl HashKey {
    /// A fresh random key (the process's, when there is no SSD tier).
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// Chained block hash: keyed SipHash-2-4 over (parent hash, signature hash,
/// token ids), little-endian bytes. The same key gives the same hashes on
/// any run and platform (the SSD tier keeps its key beside its files).
pub fn block_hash(key: &HashKey, parent: u64, signature: u64, tokens: &[u32]) -> u64 {
    let mut h = siphasher::sip::SipHasher24::new_with_key(&key.0);
    h.write(&parent.to_le_bytes());
    h.write(&signature.to_le_bytes());
    for t in tokens {
        h.write(&t.to_le_bytes());
    }
    h.finish()
}

/// Hash of the model/dtype/KV-family signature string (not keyed: it names
/// the SSD tier's directory and is no client's to choose).
pub fn signature_hash(sig: &str) -> u64 {
    let mut h = Fnv::new();
    h.write(sig.as_bytes());
    h.0
}

struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// One cached block: its tokens, its parent and depth (all checked on every
/// match, so a hash collision is never served) and the physical block
/// holding its KV.
pub struct CachedBlock {
    pub tokens: Vec<u32>,
    pub block: u32,
    /// The previous block of its chain (None for a first block).
    pub parent: Option<u64>,
    pub depth: usize,
    last_used: u64,
}

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
}

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
    pub stats: BlockStats,
}

impl BlockManager {
    pub fn new(pool: KvPool, signature: &str) -> Self {
        let total_blocks = pool.max_blocks;
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
            stats: BlockStats::default(),
        }
    }

    /// Draws this model's blocks from `account` (the engine's one KV
    /// budget), `block_bytes` each; `total_blocks` is then only a ceiling.
    pub fn with_account(mut self, account: Arc<KvAccount>, block_bytes: u64) -> Self {
        self.snapshots.with_account(account.clone());
        self.account = Some(account);
        self.block_bytes = block_bytes;
        self
    }

    /// A free block, charged to the account; None when there is none or the
    /// account has no room.
    fn take_free(&mut self) -> Option<u32> {
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
    fn give_free(&mut self, b: u32) {
        if let Some(a) = &self.account {
            a.credit(self.block_bytes);
        }
        self.free.push(b);
    }

    /// Blocks out of the free list (what the account is charged for).
    fn charged(&self) -> usize {
        self.total_blocks - self.free.len()
    }

    /// Evicts idle cached blocks (least recently used first) to the free
    /// list until `bytes` are back in the shared account or none is left
    /// (another model needs the room). Returns the bytes freed.
    pub fn shed(&mut self, bytes: u64) -> u64 {
        let mut freed = 0;
        while freed < bytes && self.idle > 0 {
            let Some(b) = self.evict_one() else { break };
            self.give_free(b);
            freed += self.block_bytes;
        }
        freed
    }

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

    /// Blocks a table needs for `len` tokens.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// Blocks that could be handed out now: idle cached ones, and free ones
    /// the shared account has room for.
    pub fn available(&self) -> usize {
        let free = match &self.account {
            Some(a) => self.free.len().min((a.room() / self.block_bytes.max(1)) as usize),
            None => self.free.len(),
        };
        free + self.idle
    }

    /// `n` blocks for a sequence's table (each held once), evicting idle
    /// cached blocks if needed. None (and nothing taken) when they cannot be had.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.take_free() {
                Some(b) => b,
                None => self.evict_one().expect("available() counted an idle block"),
            };
            self.refs[b as usize] = 1;
            self.held += 1;
            out.push(b);
        }
        Some(out)
    }

    /// A sequence takes a reference to block `b` (a prefix-cache hit).
    fn hold(&mut self, b: u32) {
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
        for &b in table {
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
                None => self.give_free(b),
            }
        }
    }

    /// Evicts the least recently used idle cached block (deepest first among
    /// equals), spilling it to the SSD tier first; returns its id, now unheld
    /// and uncached.
    fn evict_one(&mut self) -> Option<u32> {
        let (h, _) = self
            .cache
            .iter()
            .filter(|(_, c)| self.refs[c.block as usize] == 0)
            .min_by_key(|(_, c)| (c.last_used, std::cmp::Reverse(c.depth)))?;
        let h = *h;
        let c = self.cache.remove(&h).unwrap();
        self.hash_of[c.block as usize] = None;
        self.snapshots.remove(h);
        self.idle -= 1;
        self.stats.evictions += 1;
        if let Some(ssd) = self.ssd.as_mut() {
            if ssd.contains(h) {
                ssd.touch(h); // already on disk: marks it used
            } else {
                match self.pool.read_block(c.block) {
                    Ok(kv) => {
                        ssd.put(h, c.parent, c.depth, &c.tokens, &kv);
                    }
                    Err(e) => {
                        tracing::warn!("KV SSD tier: reading block {} failed: {e:#}", c.block)
                    }
                }
            }
        }
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
            found.push(b);
            parent = Some(h);
        }
        if found.is_empty() {
            self.stats.prefix_misses += 1;
        } else {
            self.stats.prefix_hits += 1;
            self.stats.prefix_hit_tokens += (found.len() * self.block_size) as u64;
        }
        found
    }

    /// Reads block `h` from the SSD tier into a free pool block and the
    /// memory cache; false on a miss, a bad file, or no room.
    fn load_from_ssd(
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
    fn touch_ancestors(&mut self, mut parent: Option<u64>) {
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

    /// Sets every block's references from the tables that hold blocks now
    /// (after a panic left some sequence's references behind): blocks no
    /// table holds become idle (cached) or free. The prefix cache is kept.
    pub fn rebuild_refs<'a>(&mut self, tables: impl IntoIterator<Item = &'a [u32]>) {
        self.refs = vec![0; self.total_blocks];
        for t in tables {
            for &b in t {
                if let Some(r) = self.refs.get_mut(b as usize) {
                    *r += 1;
                }
            }
        }
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
            self.hash_of[c.block as usize] = None;
            self.snapshots.remove(h);
            self.idle -= 1;
            self.give_free(c.block);
        }
    }

    pub fn snapshot(&self) -> BlockStats {
        let mut s = BlockStats {
            block_size: self.block_size,
            block_bytes: self.block_bytes,
            total_blocks: self.total_blocks,
            seq_blocks: self.held,
            cached_blocks: self.cache.len(),
            free_blocks: self.free.len(),
            pool_blocks: self.pool.capacity(),
            ..self.stats.clone()
        };
        if let Some(ssd) = self.ssd.as_ref() {
            s.ssd_reads = ssd.reads;
            s.ssd_writes = ssd.writes;
            s.ssd_blocks = ssd.blocks();
            s.ssd_bytes = ssd.bytes();
            s.ssd_corrupt = ssd.corrupt;
        }
        s
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
        }
        let Some(ssd) = self.ssd.as_mut() else { return };
        let mut blocks: Vec<(&u64, &CachedBlock)> = self.cache.iter().collect();
        // Roots first: if the cap stops the spill, what is on disk is matchable.
        blocks.sort_by_key(|(_, c)| c.depth);
        let mut n = 0;
        for (h, c) in blocks {
            if ssd.contains(*h) {
                continue;
            }
            match self.pool.read_block(c.block) {
                Ok(kv) if ssd.put_wait(*h, c.parent, c.depth, &c.tokens, &kv) => n += 1,
                Ok(_) => {}
                Err(e) => tracing::warn!("KV SSD tier: reading block {} failed: {e:#}", c.block),
            }
        }
        if n > 0 {
            tracing::info!("KV SSD tier: spilled {n} cached blocks");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mgr(block: usize, total: usize, sig: &str) -> BlockManager {
        BlockManager::new(super::super::kv_pool::test_pool(1, 1, 2, block, total), sig)
    }

    /// One layer's keys and values [block, 1, 2] filled with x and -x.
    fn data(x: f32, block: usize) -> Vec<Array> {
        let n = 2 * block;
        vec![
            Array::from_slice(&vec![x; n], &[block as i32, 1, 2]),
            Array::from_slice(&vec![-x; n], &[block as i32, 1, 2]),
        ]
    }

    #[test]
    fn chained_hashes_depend_on_the_whole_prefix_and_signature() {
        let m = mgr(2, 10, "a");
        let n = mgr(2, 10, "b");
        let a = m.chain(&[1, 2, 3, 4]);
        let b = m.chain(&[9, 2, 3, 4]);
        assert_eq!(a.len(), 2);
        assert_ne!(a[1], b[1]);
        assert_ne!(a, n.chain(&[1, 2, 3, 4]));
        assert_eq!(a, m.chain(&[1, 2, 3, 4, 5]));
    }

    #[test]
    fn lookup_refs_and_lru_eviction() {
        let mut m = mgr(2, 4, "s");
        let ch = m.chain(&[1, 2, 3, 4]);
        assert!(m.insert_data(ch[0], None, 0, vec![1, 2], &data(1.0, 2)));
        assert!(m.insert_data(ch[1], Some(ch[0]), 1, vec![3, 4], &data(2.0, 2)));
        let hit = m.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(
            hit,
            vec![m.get(ch[0]).unwrap().block, m.get(ch[1]).unwrap().block]
        );
        // held blocks are not evictable: 2 free only
        assert_eq!(m.available(), 2);
        assert!(m.allocate(3).is_none());
        m.release(&hit);
        let got = m.allocate(3).unwrap(); // evicts the deeper block
        assert_eq!(got.len(), 3);
        assert!(m.contains(ch[0]) && !m.contains(ch[1]));
        assert_eq!(m.lookup(&[1, 2, 9, 9]).len(), 1);
        assert_eq!(m.stats.prefix_hits, 2);
        assert_eq!(m.lookup(&[7, 7]).len(), 0);
        assert_eq!(m.stats.prefix_misses, 1);
    }

    #[test]
    fn a_sequences_blocks_are_cached_in_place_and_shared() {
        let mut m = mgr(2, 8, "s");
        let table = m.allocate(3).unwrap(); // a sequence of 5 tokens
        let ch = m.chain(&[1, 2, 3, 4]);
        m.insert(ch[0], None, 0, vec![1, 2], table[0]);
        m.insert(ch[1], Some(ch[0]), 1, vec![3, 4], table[1]);
        let s = m.snapshot();
        assert_eq!((s.seq_blocks, s.cached_blocks, s.free_blocks), (3, 2, 5));
        // A second sequence shares both blocks: nothing is copied or allocated.
        let hit = m.lookup(&[1, 2, 3, 4, 9]);
        assert_eq!(hit, table[..2]);
        assert_eq!(m.snapshot().free_blocks, 5);
        // The first ends: its cached blocks stay (still held by the second),
        // its private block is freed.
        m.release(&table);
        let s = m.snapshot();
        assert_eq!((s.seq_blocks, s.cached_blocks, s.free_blocks), (2, 2, 6));
        assert_eq!(m.available(), 6);
        m.release(&hit);
        assert_eq!(m.available(), 8);
        m.clear_cache();
        assert_eq!(m.snapshot().free_blocks, 8);
    }

    #[test]
    fn evicted_blocks_spill_to_ssd_and_come_back() {
        use super::super::ssd::{SsdConfig, SsdStore};
        let tmp = tempfile::tempdir().unwrap();
        let mut m = mgr(2, 2, "s");
        let store = SsdStore::open(
            &SsdConfig {
                dir: tmp.path().into(),
                max_bytes: 1 << 20,
            },
            m.signature,
        )
        .unwrap();
        m.attach_ssd(store);
        let ch = m.chain(&[1, 2, 3, 4]);
        assert!(m.insert_data(ch[0], None, 0, vec![1, 2], &data(1.0, 2)));
        assert!(m.insert_data(ch[1], Some(ch[0]), 1, vec![3, 4], &data(2.0, 2)));
        let t = m.allocate(2).unwrap(); // both evicted, both written
        let s = m.snapshot();
        assert_eq!(
            (s.cached_blocks, s.evictions, s.ssd_writes, s.ssd_blocks),
            (0, 2, 2, 2)
        );
        m.release(&t);
        let hit = m.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(hit.len(), 2);
        let s = m.snapshot();
        assert_eq!((s.ssd_reads, s.prefix_hits, s.cached_blocks), (2, 1, 2));
        let back = m.pool.read_block(hit[1]).unwrap();
        assert_eq!(
            back[1]
                .as_dtype(mlx_rs::Dtype::Float32)
                .unwrap()
                .as_slice::<f32>(),
            &[-2.0; 4]
        );
        m.release(&hit);
        // No room to keep: nothing is read from disk.
        let _t = m.allocate(2).unwrap();
        assert!(m.lookup(&[1, 2, 3, 4]).is_empty());
        assert_eq!(m.snapshot().ssd_reads, 2);
    }

    /// The chain hashes are keyed: another key (another process without an
    /// SSD tier) gives other hashes for the same tokens and signature.
    #[test]
    fn chain_hashes_are_keyed() {
        let (a, b) = (mgr(2, 4, "s"), mgr(2, 4, "s"));
        assert_ne!(a.chain(&[1, 2]), b.chain(&[1, 2]));
        let k = HashKey([3; 16]);
        assert_eq!(block_hash(&k, 0, 1, &[1, 2]), block_hash(&k, 0, 1, &[1, 2]));
        assert_ne!(block_hash(&k, 0, 1, &[1, 2]), block_hash(&HashKey([4; 16]), 0, 1, &[1, 2]));
    }

    /// With every hash forced equal, a prompt never gets another prompt's
    /// KV: a hit needs the block's own tokens, its parent and its depth.
    #[test]
    fn a_forced_hash_collision_is_a_miss() {
        let mut m = mgr(1, 8, "s");
        m.constant_hash = true;
        // Prompt [1, 2] is cached: block 0 = [1] (first), block 1 = [2] after [1].
        let t = m.allocate(2).unwrap();
        let ch = m.chain(&[1, 2]);
        assert_eq!(ch[0], ch[1]);
        m.insert(ch[0], None, 0, vec![1], t[0]);
        m.insert(ch[1], Some(ch[0]), 1, vec![2], t[1]);
        m.release(&t);
        // Another first token: a miss.
        assert!(m.lookup(&[3, 2]).is_empty());
        // [2] as a first block has the tokens of a cached block, but not its
        // parent or depth: a miss.
        let mut n = mgr(1, 8, "s");
        n.constant_hash = true;
        let t = n.allocate(2).unwrap();
        n.insert(7, None, 0, vec![1], t[0]);
        n.release(&t[..1]);
        // Only a block [2] at depth 1 after [1] is cached under the hash.
        n.clear_cache();
        n.insert(7, Some(7), 1, vec![2], t[1]);
        n.release(&t[1..]);
        assert!(n.lookup(&[2, 5]).is_empty(), "served a block of another chain");
        assert_eq!(n.stats.prefix_hits, 0);
        // The real prompt still hits its first block.
        assert_eq!(m.lookup(&[1, 9]).len(), 1);
    }

    /// Two models' managers draw from one account: one model's blocks
    /// (held or cached) leave the other less room, shedding its idle cached
    /// blocks gives room back, and a manager that goes gives back its share.
    #[test]
    fn managers_share_one_budget() {
        let account = Arc::new(KvAccount::new(4 * 100));
        let mut a = mgr(1, 4, "a").with_account(account.clone(), 100);
        let mut b = mgr(1, 4, "b").with_account(account.clone(), 100);
        let t = a.allocate(3).unwrap();
        assert_eq!((a.available(), b.available()), (1, 1));
        assert!(b.allocate(2).is_none());
        // a caches two of its blocks and ends: they stay charged (idle).
        let ch = a.chain(&[1, 2]);
        a.insert(ch[0], None, 0, vec![1], t[0]);
        a.insert(ch[1], Some(ch[0]), 1, vec![2], t[1]);
        a.release(&t);
        assert_eq!(account.used(), 200);
        assert_eq!((a.available(), b.available()), (4, 2));
        let tb = b.allocate(2).unwrap();
        assert_eq!(account.used(), 400);
        assert!(b.allocate(1).is_none());
        // b needs one more: a sheds an idle block.
        assert_eq!(a.shed(100), 100);
        assert!(!a.contains(ch[1]) && a.contains(ch[0]), "the leaf goes first");
        let _held = b.allocate(1).unwrap();
        b.release(&tb);
        assert_eq!(account.used(), 200);
        drop(b);
        assert_eq!(account.used(), 100, "a's cached root is all that is left");
        drop(a);
        assert_eq!(account.used(), 0);
    }

    #[test]
    fn eviction_takes_leaves_before_roots() {
        let mut m = mgr(1, 3, "s");
        let a = m.chain(&[1, 2, 3]);
        // The root is inserted first (older), then its children.
        assert!(m.insert_data(a[0], None, 0, vec![1], &data(1.0, 1)));
        m.release(&[]); // time passes
        assert!(m.insert_data(a[1], Some(a[0]), 1, vec![2], &data(2.0, 1)));
        m.release(&[]);
        assert!(m.insert_data(a[2], Some(a[1]), 2, vec![3], &data(3.0, 1)));
        assert!(m.allocate(2).is_some()); // evicts two blocks: the deepest ones
        assert!(m.contains(a[0]) && !m.contains(a[1]) && !m.contains(a[2]));
        assert_eq!(m.lookup(&[1, 2, 3, 4]).len(), 1);
    }
}
