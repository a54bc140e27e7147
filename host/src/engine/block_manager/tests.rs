use super::*;
use super::super::kv_budget::KvAccount;
use mlx_rs::Array;
use std::sync::Arc;

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
