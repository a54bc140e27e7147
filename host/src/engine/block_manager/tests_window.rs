//! The window group's blocks (window.rs): bounded per sequence, released
//! to the free list or kept idle in the cache, prefix hits cut to where
//! their window blocks are, the budget charged per group.
use super::*;
use crate::engine::kv_groups::{id, DEAD};
use crate::engine::kv_budget::KvAccount;
use mlx_rs::Array;
use std::sync::Arc;

/// Two layers (one K/V head of 2, f32): layer 0 windowed (4 positions),
/// layer 1 full; blocks of 2 tokens; `total` blocks in each group.
fn mgr(total: usize) -> BlockManager {
    let pool = super::super::kv_pool::test_pool(2, 1, 2, 2, total).with_windows(&[4, 0]).split_windows();
    assert!(pool.win.is_some());
    BlockManager::new(pool, "w")
}

/// A block's data: both layers' keys and values [2, 1, 2], filled with x.
fn data(x: f32) -> Vec<Array> {
    (0..4).map(|i| Array::from_slice(&[x + i as f32; 4], &[2, 1, 2])).collect()
}

/// A sequence's window blocks stay at ceil(window / block) + 1 however
/// long it grows; its full blocks grow with it; all come back at the end.
#[test]
fn window_blocks_stay_bounded_as_a_sequence_grows() {
    let mut m = mgr(64);
    let mut table: Vec<u32> = Vec::new();
    for kv_len in 0..60 {
        m.slide(&mut table, kv_len);
        let need = m.blocks_for(kv_len + 1).saturating_sub(table.len());
        table.extend(m.allocate(need).unwrap());
        assert!(m.window_blocks() <= 4 / 2 + 1, "{} window blocks at {kv_len}", m.window_blocks());
    }
    assert_eq!(table.len(), 30);
    assert_eq!(m.snapshot().seq_blocks, 30);
    assert!(table[..28].iter().all(|&e| e & DEAD != 0) && table[28..].iter().all(|&e| e & DEAD == 0), "{table:?}");
    m.release(&table);
    let s = m.snapshot();
    assert_eq!((s.seq_blocks, s.window_blocks, s.free_blocks), (0, 0, 64));
}

/// The account is charged each group's bytes: a released window block is
/// credited at once, and a whole sequence's blocks at its end.
#[test]
fn each_group_is_charged_its_own_bytes() {
    let account = Arc::new(KvAccount::new(1 << 20));
    let (full, win) = (2 * 2 * 2 * 4u64, 2 * 2 * 2 * 4u64); // 2 tokens x (k, v) x 2 values x f32, one layer each
    let mut m = mgr(64).with_account(account.clone(), full);
    assert_eq!(m.snapshot().window_block_bytes, win);
    assert_eq!(m.snapshot().block_bytes, full + win);
    let mut table = m.allocate(5).unwrap();
    assert_eq!(account.used(), 5 * (full + win));
    m.slide(&mut table, 10); // a query at 10 reads 7..=10: blocks 3 and 4
    assert_eq!(account.used(), 5 * full + 2 * win);
    m.release(&table);
    assert_eq!(account.used(), 0);
}

/// Cached blocks keep their window blocks idle after the sequence moved
/// on; a hit whose next query finds them is whole, one whose window blocks
/// were evicted is cut to where they are, and what it holds is exact.
#[test]
fn a_hit_is_cut_to_where_its_window_blocks_are() {
    let mut m = mgr(64);
    let tokens: Vec<u32> = (1..=12).collect();
    let ch = m.chain(&tokens);
    for j in 0..6usize {
        let parent = j.checked_sub(1).map(|p| ch[p]);
        assert!(m.insert_data(ch[j], parent, j, tokens[2 * j..2 * j + 2].to_vec(), &data(j as f32)));
    }
    assert_eq!(m.window_blocks(), 6, "cached blocks keep their window blocks, idle");
    // A hit of 12 tokens: its next query (12) reads 9..=12, blocks 4 and 5.
    let mut probe = tokens.clone();
    probe.push(99);
    let hit = m.lookup(&probe);
    assert_eq!(hit.len(), 6);
    assert!(hit[..4].iter().all(|&e| e & DEAD != 0) && hit[4..].iter().all(|&e| e & DEAD == 0), "{hit:?}");
    // Its data: the full layer's and the window layer's, as written.
    let d = m.pool.read_block(id(hit[5])).unwrap();
    assert_eq!(d[0].as_slice::<f32>()[0], 5.0);
    assert_eq!(d[3].as_slice::<f32>()[0], 8.0);
    m.release(&hit);
    // Evict block 5's window block: the hit is cut to 10 tokens (blocks 3
    // and 4 still have theirs), full blocks cached all the same.
    let b5 = m.get(ch[5]).unwrap().block;
    m.pool.win.as_ref().unwrap().of(b5).unwrap();
    while m.pool.win.as_ref().unwrap().of(b5).is_some() {
        assert!(m.shed_windows(1) > 0);
    }
    let hit = m.lookup(&probe);
    let s = m.snapshot();
    assert!(hit.len() < 6 && s.window_cut_tokens > 0, "{hit:?} {s:?}");
    let n = hit.len();
    let first = crate::engine::kv_groups::first_block(n * 2, 4, 2);
    for (j, &e) in hit.iter().enumerate() {
        assert_eq!(e & DEAD != 0, j < first, "{hit:?}");
        if j >= first {
            assert!(m.pool.whole(id(e)));
        }
    }
    assert!(m.contains(ch[5]), "the full block stays cached");
    m.release(&hit);
    // Every window block gone: no hit (its next query would read the
    // window layers' K/V of its last block at least).
    while m.shed_windows(1) > 0 {}
    let hit = m.lookup(&probe);
    assert!(hit.is_empty(), "{hit:?}");
    m.release(&hit);
    m.rebuild_refs(std::iter::empty());
    let s = m.snapshot();
    assert_eq!((s.seq_blocks, s.window_blocks), (0, 0), "{s:?}");
}

/// A model with recurrent state and window layers: a hit cut to its
/// deepest snapshot is checked again for the window blocks its next query
/// reads, and those blocks (flagged `DEAD` in the longer hit) hold their
/// window references again; a snapshot whose window blocks are gone is
/// passed over.
#[test]
fn a_hit_cut_to_a_snapshot_rechecks_its_window() {
    use crate::engine::recurrent::RowState;
    let mut m = mgr(64);
    m.recurrent = true;
    let tokens: Vec<u32> = (1..=12).collect();
    let ch = m.chain(&tokens);
    for j in 0..6usize {
        let parent = j.checked_sub(1).map(|p| ch[p]);
        assert!(m.insert_data(ch[j], parent, j, tokens[2 * j..2 * j + 2].to_vec(), &data(j as f32)));
    }
    let st = |x: f32| RowState::from([(1, vec![Array::from_slice(&[x; 2], &[1, 2])])]);
    assert!(m.snapshots.put(ch[0], st(1.0)) && m.snapshots.put(ch[2], st(3.0)));
    let mut probe = tokens.clone();
    probe.push(99);
    // The whole hit is 6 blocks (0..4 DEAD); cut to 3 (the snapshot after
    // 6 tokens), its next query (6) reads 3..=6: blocks 1 and 2.
    let (hit, state) = m.lookup_state(&probe, 0);
    assert_eq!(hit.len(), 3, "{hit:?}");
    assert_eq!(state.unwrap()[&1][0].as_slice::<f32>(), [3.0, 3.0]);
    assert!(hit[0] & DEAD != 0 && hit[1..].iter().all(|&e| e & DEAD == 0 && m.pool.whole(id(e))), "{hit:?}");
    m.release(&hit);
    // Block 2's window block evicted: the snapshot after block 2 is passed
    // over for the one after block 0 (a query at 2 reads blocks 0 and 1),
    // if theirs are still there; else a miss. Never a hit missing its window.
    let b2 = m.get(ch[2]).unwrap().block;
    while m.pool.win.as_ref().unwrap().of(b2).is_some() {
        assert!(m.shed_windows(1) > 0);
    }
    let (hit, state) = m.lookup_state(&probe, 0);
    assert!(hit.len() <= 1 && hit.is_empty() == state.is_none(), "{hit:?}");
    for &e in &hit {
        assert!(e & DEAD == 0 && m.pool.whole(id(e)), "{hit:?}");
    }
    m.release(&hit);
    m.rebuild_refs(std::iter::empty());
    assert_eq!(m.snapshot().seq_blocks, 0);
}
