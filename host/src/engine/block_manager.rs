//! KV memory accounting in fixed-size blocks, and the automatic prefix cache.
//!
//! Storage (see docs/KV_CACHE.md): each running sequence keeps its own
//! contiguous per-layer K/V buffers (`cache::KvCache`), grown in steps of
//! `grow_tokens`; the block manager accounts for them in blocks of
//! `block_size` tokens (a sequence holds `ceil(capacity / block_size)`
//! blocks, so the budget counts what is really allocated). The prefix cache
//! holds copies of full blocks ([1, K, block, hd] per layer) keyed by a chained
//! hash of their token ids and the model/dtype/KV-family signature; they come
//! out of the same budget, are reference-counted by the sequences that matched
//! them (those are not evicted), and are evicted least recently used first
//! (deepest first among equals) when a sequence needs room. With an SSD
//! tier (`ssd::SsdStore`) an evicted block is written to disk first, and a
//! lookup that misses in memory goes on along the chain on disk; blocks read
//! back join the memory cache like any other.
use super::ssd::SsdStore;
use mlx_rs::Array;
use std::collections::HashMap;

/// Chained block hash: FNV-1a 64 over (parent hash, signature hash, token ids).
/// Stable across runs and platforms (little-endian bytes).
pub fn block_hash(parent: u64, signature: u64, tokens: &[u32]) -> u64 {
    let mut h = Fnv::new();
    h.write(&parent.to_le_bytes());
    h.write(&signature.to_le_bytes());
    for t in tokens {
        h.write(&t.to_le_bytes());
    }
    h.0
}

/// Hash of the model/dtype/KV-family signature string.
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

/// One cached block: its tokens (checked on every match, so a hash collision
/// is never served) and per-layer (keys, values) [1, K, block, hd].
pub struct CachedBlock {
    pub tokens: Vec<u32>,
    pub kv: Vec<(Array, Array)>,
    /// The previous block of its chain (None for a first block).
    parent: Option<u64>,
    depth: usize,
    refs: usize,
    last_used: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BlockStats {
    pub block_size: usize,
    pub total_blocks: usize,
    /// Held by running sequences.
    pub seq_blocks: usize,
    /// Held by the prefix cache.
    pub cached_blocks: usize,
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
    /// Sequences' buffers grow in steps of this many tokens (a multiple of block_size).
    pub grow_tokens: usize,
    pub signature: u64,
    seq_blocks: usize,
    cache: HashMap<u64, CachedBlock>,
    clock: u64,
    ssd: Option<SsdStore>,
    pub stats: BlockStats,
}

impl BlockManager {
    pub fn new(block_size: usize, total_blocks: usize, grow_tokens: usize, signature: &str) -> Self {
        let block_size = block_size.max(1);
        let grow_tokens = grow_tokens.max(block_size).div_ceil(block_size) * block_size;
        Self {
            block_size,
            total_blocks,
            grow_tokens,
            signature: signature_hash(signature),
            seq_blocks: 0,
            cache: HashMap::new(),
            clock: 0,
            ssd: None,
            stats: BlockStats::default(),
        }
    }

    /// Adds the SSD tier: evicted blocks are written there, misses looked up there.
    pub fn attach_ssd(&mut self, store: SsdStore) {
        self.ssd = Some(store);
    }

    pub fn ssd(&mut self) -> Option<&mut SsdStore> {
        self.ssd.as_mut()
    }

    /// Blocks a sequence holds when `len` tokens are in its KV buffers.
    pub fn blocks_for(&self, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        len.div_ceil(self.grow_tokens) * self.grow_tokens / self.block_size
    }

    fn evictable(&self) -> usize {
        self.cache.values().filter(|b| b.refs == 0).count()
    }

    /// Blocks that could be handed out now (free plus evictable cache).
    pub fn available(&self) -> usize {
        self.total_blocks.saturating_sub(self.seq_blocks + self.cache.len()) + self.evictable()
    }

    /// Takes `n` blocks for a sequence, evicting cached blocks if needed.
    /// False (and nothing taken) when they cannot be had.
    pub fn allocate(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        if self.available() < n {
            return false;
        }
        while self.total_blocks < self.seq_blocks + self.cache.len() + n {
            if !self.evict_one() {
                return false;
            }
        }
        self.seq_blocks += n;
        true
    }

    pub fn release(&mut self, n: usize) {
        self.seq_blocks = self.seq_blocks.saturating_sub(n);
    }

    fn evict_one(&mut self) -> bool {
        let victim = self
            .cache
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .min_by_key(|(_, b)| (b.last_used, std::cmp::Reverse(b.depth)))
            .map(|(h, _)| *h);
        match victim {
            Some(h) => {
                let b = self.cache.remove(&h).unwrap();
                self.stats.evictions += 1;
                if let Some(ssd) = self.ssd.as_mut() {
                    ssd.put(h, b.depth, &b.tokens, &b.kv);
                }
                true
            }
            None => false,
        }
    }

    /// Hashes of the full blocks of `tokens`.
    pub fn chain(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent = 0u64;
        tokens
            .chunks_exact(self.block_size)
            .map(|c| {
                parent = block_hash(parent, self.signature, c);
                parent
            })
            .collect()
    }

    /// The longest cached prefix of `tokens` in whole blocks: its hashes
    /// (referenced: call `unref` when done with them). Counts a hit or a miss.
    pub fn lookup(&mut self, tokens: &[u32]) -> Vec<u64> {
        self.lookup_keeping(tokens, 0)
    }

    /// [`lookup`](Self::lookup); blocks missing in memory are read from the
    /// SSD tier (and cached in memory) only while more than `keep_free`
    /// blocks stay available, so the caller can still allocate them.
    pub fn lookup_keeping(&mut self, tokens: &[u32], keep_free: usize) -> Vec<u64> {
        self.clock += 1;
        let mut found = Vec::new();
        for (i, h) in self.chain(tokens).into_iter().enumerate() {
            let want = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let here = match self.cache.get(&h) {
                Some(b) => b.tokens == want,
                None => self.load_from_ssd(h, found.last().copied(), i, want, keep_free),
            };
            if !here {
                break;
            }
            let b = self.cache.get_mut(&h).unwrap();
            b.refs += 1;
            b.last_used = self.clock;
            found.push(h);
        }
        if found.is_empty() {
            self.stats.prefix_misses += 1;
        } else {
            self.stats.prefix_hits += 1;
            self.stats.prefix_hit_tokens += (found.len() * self.block_size) as u64;
        }
        found
    }

    /// Reads block `h` from the SSD tier into the memory cache; false on a
    /// miss, a bad file, or no room.
    fn load_from_ssd(&mut self, h: u64, parent: Option<u64>, depth: usize, tokens: &[u32], keep_free: usize) -> bool {
        if self.ssd.is_none() || self.available() <= keep_free {
            return false;
        }
        let ssd = self.ssd.as_mut().unwrap();
        if !ssd.contains(h) {
            return false;
        }
        match ssd.load(h, tokens) {
            Some(kv) => self.insert(h, parent, depth, tokens.to_vec(), kv),
            None => false,
        }
    }

    pub fn get(&self, h: u64) -> Option<&CachedBlock> {
        self.cache.get(&h)
    }

    pub fn unref(&mut self, hashes: &[u64]) {
        self.clock += 1;
        for h in hashes {
            if let Some(b) = self.cache.get_mut(h) {
                b.refs = b.refs.saturating_sub(1);
                b.last_used = self.clock;
            }
        }
    }

    pub fn contains(&self, h: u64) -> bool {
        self.cache.contains_key(&h)
    }

    /// Adds a full block (its KV already copied out), child of `parent`.
    /// False when there is no room even after evicting (the block is then
    /// simply not cached).
    pub fn insert(
        &mut self,
        h: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: Vec<u32>,
        kv: Vec<(Array, Array)>,
    ) -> bool {
        if let Some(b) = self.cache.get_mut(&h) {
            b.last_used = self.clock;
            self.touch_ancestors(parent);
            return true;
        }
        while self.total_blocks < self.seq_blocks + self.cache.len() + 1 {
            if !self.evict_one() {
                return false;
            }
        }
        self.cache.insert(h, CachedBlock { tokens, kv, parent, depth, refs: 0, last_used: self.clock });
        self.touch_ancestors(parent);
        true
    }

    /// Makes a block's ancestors at least as recent as it, so eviction (least
    /// recently used, deepest first among equals) takes a chain's leaves
    /// before its root and chains stay matchable. Stops at an ancestor
    /// already that recent, so inserting a chain block by block is linear.
    fn touch_ancestors(&mut self, mut parent: Option<u64>) {
        while let Some(h) = parent {
            match self.cache.get_mut(&h) {
                Some(b) if b.last_used < self.clock => {
                    b.last_used = self.clock;
                    parent = b.parent;
                }
                _ => break,
            }
        }
    }

    /// Drops every unreferenced cached block.
    pub fn clear_cache(&mut self) {
        self.cache.retain(|_, b| b.refs > 0);
    }

    pub fn snapshot(&self) -> BlockStats {
        let mut s = BlockStats {
            block_size: self.block_size,
            total_blocks: self.total_blocks,
            seq_blocks: self.seq_blocks,
            cached_blocks: self.cache.len(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kv() -> Vec<(Array, Array)> {
        vec![(Array::from_slice(&[0f32], &[1]), Array::from_slice(&[0f32], &[1]))]
    }

    #[test]
    fn chained_hashes_depend_on_the_whole_prefix_and_signature() {
        let m = BlockManager::new(2, 10, 2, "a");
        let n = BlockManager::new(2, 10, 2, "b");
        let a = m.chain(&[1, 2, 3, 4]);
        let b = m.chain(&[9, 2, 3, 4]);
        assert_eq!(a.len(), 2);
        assert_ne!(a[1], b[1]);
        assert_ne!(a, n.chain(&[1, 2, 3, 4]));
        assert_eq!(a, m.chain(&[1, 2, 3, 4, 5]));
    }

    #[test]
    fn lookup_refs_and_lru_eviction() {
        let mut m = BlockManager::new(2, 4, 2, "s");
        let toks = [1, 2, 3, 4];
        let ch = m.chain(&toks);
        assert!(m.insert(ch[0], None, 0, vec![1, 2], kv()));
        assert!(m.insert(ch[1], Some(ch[0]), 1, vec![3, 4], kv()));
        let hit = m.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(hit, ch);
        // referenced blocks are not evictable: 2 free only
        assert_eq!(m.available(), 2);
        assert!(!m.allocate(3));
        m.unref(&hit);
        assert!(m.allocate(3)); // evicts the deeper block first
        assert!(m.contains(ch[0]) && !m.contains(ch[1]));
        assert_eq!(m.lookup(&[1, 2, 9, 9]).len(), 1);
        assert_eq!(m.stats.prefix_hits, 2);
        assert_eq!(m.lookup(&[7, 7]).len(), 0);
        assert_eq!(m.stats.prefix_misses, 1);
    }

    #[test]
    fn evicted_blocks_spill_to_ssd_and_come_back() {
        use super::super::ssd::{SsdConfig, SsdStore};
        let tmp = tempfile::tempdir().unwrap();
        let mut m = BlockManager::new(2, 2, 2, "s");
        let store = SsdStore::open(&SsdConfig { dir: tmp.path().into(), max_bytes: 1 << 20 }, m.signature).unwrap();
        m.attach_ssd(store);
        let block =
            |x: f32| vec![(Array::from_slice(&[x; 4], &[1, 1, 2, 2]), Array::from_slice(&[-x; 4], &[1, 1, 2, 2]))];
        let ch = m.chain(&[1, 2, 3, 4]);
        assert!(m.insert(ch[0], None, 0, vec![1, 2], block(1.0)));
        assert!(m.insert(ch[1], Some(ch[0]), 1, vec![3, 4], block(2.0)));
        assert!(m.allocate(2)); // both evicted, both written
        let s = m.snapshot();
        assert_eq!((s.cached_blocks, s.evictions, s.ssd_writes, s.ssd_blocks), (0, 2, 2, 2));
        m.release(2);
        let hit = m.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(hit, ch);
        let s = m.snapshot();
        assert_eq!((s.ssd_reads, s.prefix_hits, s.cached_blocks), (2, 1, 2));
        assert_eq!(m.get(ch[1]).unwrap().kv[0].1.as_slice::<f32>(), &[-2.0; 4]);
        m.unref(&hit);
        // No room to keep: nothing is read from disk.
        assert!(m.allocate(2));
        assert!(m.lookup(&[1, 2, 3, 4]).is_empty());
        assert_eq!(m.snapshot().ssd_reads, 2);
    }

    #[test]
    fn eviction_takes_leaves_before_roots() {
        let mut m = BlockManager::new(1, 3, 1, "s");
        let a = m.chain(&[1, 2, 3]);
        // The root is inserted first (older), then its children.
        assert!(m.insert(a[0], None, 0, vec![1], kv()));
        m.unref(&[]); // time passes
        assert!(m.insert(a[1], Some(a[0]), 1, vec![2], kv()));
        m.unref(&[]);
        assert!(m.insert(a[2], Some(a[1]), 2, vec![3], kv()));
        assert!(m.allocate(2)); // evicts two blocks: the deepest ones
        assert!(m.contains(a[0]) && !m.contains(a[1]) && !m.contains(a[2]));
        assert_eq!(m.lookup(&[1, 2, 3, 4]).len(), 1);
    }

    #[test]
    fn blocks_follow_buffer_growth() {
        let m = BlockManager::new(16, 100, 64, "s");
        assert_eq!(m.blocks_for(0), 0);
        assert_eq!(m.blocks_for(1), 4);
        assert_eq!(m.blocks_for(64), 4);
        assert_eq!(m.blocks_for(65), 8);
    }
}
