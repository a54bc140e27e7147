//! State snapshot files (`.kvs`, state.rs): read back beside their block,
//! checked (tokens, bytes, every flipped byte), counted in the tier's bytes,
//! deleted with their block, and a corrupt one drops only itself.
use super::state::{parse_state, state_arrays};
use super::*;
use crate::engine::recurrent::RowState;
use mlx_rs::Array;
use std::fs;

/// Two state layers: conv [1, 3, 4] and SSM [1, 2, 2, 2] states.
fn state(x: f32) -> RowState {
    let a = |n: usize, shape: &[i32]| Array::from_slice(&(0..n).map(|i| i as f32 + x).collect::<Vec<_>>(), shape);
    RowState::from([(0, vec![a(12, &[1, 3, 4]), a(8, &[1, 2, 2, 2])]), (2, vec![a(12, &[1, 3, 4]), a(8, &[1, 2, 2, 2])])])
}

/// One layer's keys and values, [3 slots, 2 heads, 4].
fn kv() -> Vec<Array> {
    let a = Array::from_slice(&[1f32; 24], &[3, 2, 4]);
    vec![a.clone(), a]
}

const STATE: u64 = 4 * 2 * (12 + 8);

#[test]
fn state_arrays_round_trip_and_are_checked() {
    let st = state(1.0);
    let arrays = state_arrays(&st).unwrap();
    assert_eq!(arrays.len(), 5);
    let back = parse_state(&arrays, Some(STATE)).unwrap();
    assert_eq!(back.keys().copied().collect::<Vec<_>>(), [0, 2]);
    assert_eq!(back[&2][1].shape(), &[1, 2, 2, 2]);
    assert_eq!(back[&2][1].as_slice::<f32>(), st[&2][1].as_slice::<f32>());
    // Another state's size, a table that does not match, no table, not a row.
    assert!(parse_state(&arrays, Some(STATE + 4)).is_err());
    assert!(parse_state(&arrays[..4], None).is_err());
    assert!(parse_state(&arrays[1..], None).is_err());
    let mut wide = arrays.clone();
    wide[1].shape[0] = 2;
    wide[1].shape[1] = 3;
    wide[1].shape[2] = 2;
    assert!(parse_state(&wide, None).is_err());
}

#[test]
fn store_keeps_a_snapshot_beside_its_block() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SsdConfig { dir: tmp.path().to_path_buf(), max_bytes: 1 << 20 };
    let mut s = SsdStore::open(&cfg, 42).unwrap();
    assert!(!s.put_state(1, None, 0, &[1, 2, 3], &state(1.0), false), "no block: no snapshot");
    assert!(s.put(1, None, 0, &[1, 2, 3], &kv()) && s.put(2, Some(1), 1, &[4, 5, 6], &kv()));
    let block = s.bytes() / 2;
    assert!(s.put_state(2, Some(1), 1, &[4, 5, 6], &state(2.0), true));
    let with_state = s.bytes();
    assert!(with_state > 2 * block + STATE, "the snapshot's bytes count: {with_state}");
    assert!(s.has_state(2) && !s.has_state(1));
    // Checked like its block: other tokens or parent are not served (and
    // delete the snapshot, counted); the block stays.
    assert!(s.load_state(2, Some(1), 1, &[4, 5, 7], Some(STATE)).is_none());
    assert_eq!((s.corrupt, s.has_state(2), s.contains(2), s.bytes()), (1, false, true, 2 * block));
    assert!(s.put_state(2, Some(1), 1, &[4, 5, 6], &state(2.0), true));
    assert!(s.load_state(2, Some(1), 1, &[4, 5, 6], Some(STATE + 8)).is_none(), "another state's size");
    assert!(s.put_state(2, Some(1), 1, &[4, 5, 6], &state(2.0), true));
    let got = s.load_state(2, Some(1), 1, &[4, 5, 6], Some(STATE)).unwrap();
    assert_eq!(got[&0][0].as_slice::<f32>(), state(2.0)[&0][0].as_slice::<f32>());
    assert_eq!((s.state_reads, s.state_writes, s.corrupt), (1, 3, 2));
    s.flush();
    drop(s);
    // Reopened: indexed with its block; a flipped byte is caught on read,
    // deletes the snapshot only.
    let sub = tmp.path().join(format!("{:016x}", 42));
    let p = sub.join(format!("{:016x}.kvs", 2));
    let mut s = SsdStore::open(&cfg, 42).unwrap();
    assert_eq!((s.blocks(), s.bytes(), s.has_state(2)), (2, with_state, true));
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n - 9] ^= 4;
    fs::write(&p, b).unwrap();
    assert!(s.load_state(2, Some(1), 1, &[4, 5, 6], Some(STATE)).is_none());
    s.flush();
    assert_eq!((s.corrupt, s.has_state(2), s.contains(2), p.exists()), (1, false, true, false));
    // Deleted with its block; an orphan snapshot is deleted at start-up.
    assert!(s.put_state(2, Some(1), 1, &[4, 5, 6], &state(2.0), true));
    s.flush();
    fs::remove_file(sub.join(format!("{:016x}.kvb", 2))).unwrap();
    drop(s);
    let s = SsdStore::open(&cfg, 42).unwrap();
    assert_eq!((s.blocks(), s.bytes(), s.corrupt), (1, block, 0));
    assert!(!p.exists(), "an orphan snapshot was kept");
}
