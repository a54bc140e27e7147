//! Tests of paged.rs: paged attention against plain attention over each
//! row's contiguous history (ragged rows, windows, shared layers).
use super::super::kv_pool::test_pool;
use super::*;
use mlx_rs::ops::{concatenate, indexing::TryIndexOp};
use super::super::attend::KvStore;
use mlx_rs::{
    fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask},
    random,
};

/// Reference: attention of one row over its contiguous k/v history.
fn reference(q: &Array, k: &Array, v: &Array, window: u32) -> Array {
    let (l, lk) = (q.dim(2), k.dim(2));
    let mut m = Vec::new();
    for i in 0..l {
        let pos = (lk - l + i) as usize;
        m.extend(
            (0..lk as usize).map(|j| j <= pos && (window == 0 || j + window as usize > pos)),
        );
    }
    let m = Array::from_slice(&m, &[1, 1, l, lk]);
    scaled_dot_product_attention(q, k, v, 0.5, ScaledDotProductAttentionMask::Array(&m), None)
        .unwrap()
}

fn close(a: &Array, b: &Array) {
    let d = (a - b)
        .abs()
        .unwrap()
        .max(None)
        .unwrap()
        .item_exact::<f32>();
    assert!(d < 1e-5, "max abs diff {d}");
}

/// One paged forward's attention (layer 0, scale 0.5) over `rows`.
fn attend(pool: &mut KvPool, rows: &[Row], q: &Array, k: &Array, v: &Array, window: u32) -> Array {
    let mut f = PagedForward::new(pool, rows, k.dim(2) as usize).unwrap();
    f.attend(0, q.clone(), k.clone(), v.clone(), &AttendOpts::plain(0.5).window(window)).unwrap()
}

/// Two sequences with scattered, interleaved block tables: a prefill
/// chunk each, then batched decode steps; every output equals attention
/// over the row's own contiguous history, with and without a window.
#[test]
fn paged_batch_matches_contiguous_attention() {
    let (h, kh, hd, bs) = (4, 2, 8, 4);
    // Random q [b, H, l, hd], k and v [b, K, l, hd].
    let qkv = |b: i32, l: i32| {
        let r = |heads: i32| random::normal::<f32>(&[b, heads, l, hd], None, None, None).unwrap();
        (r(h), r(kh), r(kh))
    };
    let mut pool = test_pool(1, kh, hd, bs, 64);
    let tables = [vec![5u32, 1, 7, 2], vec![0u32, 6, 3, 4]];
    let prompt = [6i32, 9];
    let mut hist: Vec<(Array, Array)> = Vec::new();
    for window in [0u32, 3] {
        let mut pool_w = test_pool(1, kh, hd, bs, 64);
        let pool = if window == 0 { &mut pool } else { &mut pool_w };
        hist.clear();
        // prefill each row alone
        for (r, &n) in prompt.iter().enumerate() {
            let (q, k, v) = qkv(1, n);
            let rows = [Row {
                table: &tables[r],
                offset: 0,
            }];
            let out = attend(pool, &rows, &q, &k, &v, window);
            close(&out, &reference(&q, &k, &v, window));
            hist.push((k, v));
        }
        // batched decode steps
        for step in 0..4 {
            let (q, k, v) = qkv(2, 1);
            let rows: Vec<Row> = (0..2)
                .map(|r| Row {
                    table: &tables[r],
                    offset: prompt[r] as usize + step,
                })
                .collect();
            let out = attend(pool, &rows, &q, &k, &v, window);
            for r in 0..2i32 {
                let row = |x: &Array| x.try_index((r..r + 1, .., .., ..)).unwrap();
                let (hk, hv) = &hist[r as usize];
                let hk = concatenate(&[hk.clone(), row(&k)], 2).unwrap();
                let hv = concatenate(&[hv.clone(), row(&v)], 2).unwrap();
                close(&row(&out), &reference(&row(&q), &hk, &hv, window));
                hist[r as usize] = (hk, hv);
            }
        }
    }
    // A block read back and written to another id holds the same data.
    let a = pool.read_block(1).unwrap();
    pool.write_block(9, &a).unwrap();
    let b = pool.read_block(9).unwrap();
    close(&a[0], &b[0]);
    close(&a[1], &b[1]);
    assert_eq!(a[0].shape(), &[bs as i32, kh, hd]);
}

/// Ragged rows (batched prefill): rows of 5, 2 and 1 new tokens,
/// left-padded to 5, over different cached contexts, in one forward,
/// equal attention over each row's own contiguous history, with and
/// without a window, and store exactly what per-row forwards store
/// (padding writes nothing).
#[test]
fn ragged_rows_equal_per_row_attention() {
    let (h, kh, hd, bs) = (4, 2, 8, 4);
    let r = |b: i32, heads: i32, l: i32| random::normal::<f32>(&[b, heads, l, hd], None, None, None).unwrap();
    let tables = [vec![5u32, 1, 7], vec![0u32, 6, 3], vec![2u32, 4, 8]];
    let (cached, lens) = ([3usize, 6, 0], [5usize, 2, 1]);
    for window in [0u32, 3] {
        let (mut batched, mut alone) = (test_pool(1, kh, hd, bs, 64), test_pool(1, kh, hd, bs, 64));
        // Each row's cached context, written alike into both pools.
        let mut hist = Vec::new();
        for (t, &c) in tables.iter().zip(&cached) {
            let (q, k, v) = (r(1, h, c.max(1) as i32), r(1, kh, c.max(1) as i32), r(1, kh, c.max(1) as i32));
            if c > 0 {
                let rows = [Row { table: t, offset: 0 }];
                attend(&mut batched, &rows, &q, &k, &v, window);
                attend(&mut alone, &rows, &q, &k, &v, window);
            }
            hist.push((k, v, c));
        }
        // The new tokens, left-padded to L = 5 (padding: random too).
        let l = 5;
        let (q, k, v) = (r(3, h, l), r(3, kh, l), r(3, kh, l));
        let rows: Vec<Row> = (0..3).map(|b| Row { table: &tables[b], offset: cached[b] }).collect();
        let mut f = PagedForward::ragged(&mut batched, &rows, &lens).unwrap();
        assert_eq!(f.offsets().as_slice::<i32>(), &[3, 3, -4]);
        let out = f.attend(0, q.clone(), k.clone(), v.clone(), &AttendOpts::plain(0.5).window(window)).unwrap();
        drop(f);
        for b in 0..3usize {
            let pad = (l as usize - lens[b]) as i32;
            let real = |x: &Array| x.try_index((b as i32..b as i32 + 1, .., pad..l, ..)).unwrap();
            let (hk, hv, c) = &hist[b];
            let (hk, hv) = if *c > 0 {
                (concatenate(&[hk.clone(), real(&k)], 2).unwrap(), concatenate(&[hv.clone(), real(&v)], 2).unwrap())
            } else {
                (real(&k), real(&v))
            };
            close(&real(&out), &reference(&real(&q), &hk, &hv, window));
            // The same row alone, unpadded, into the other pool.
            let one = [Row { table: &tables[b], offset: cached[b] }];
            attend(&mut alone, &one, &real(&q), &real(&k), &real(&v), window);
        }
        assert!(out.try_index((2..3, .., 0..4, ..)).unwrap().abs().unwrap().max(None).unwrap().item_exact::<f32>().is_finite());
        for id in 0..9 {
            let (x, y) = (batched.read_block(id).unwrap(), alone.read_block(id).unwrap());
            close(&x[0], &y[0]);
            close(&x[1], &y[1]);
        }
    }
}

/// A write that fails in the middle of a forward (keys that do not fit
/// the pool) leaves the layer's KV as it was, never zeros.
#[test]
fn a_failed_write_leaves_the_pool_as_it_was() {
    let (h, kh, hd, bs) = (4, 2, 8, 4);
    let r = |heads: i32, l: i32, d: i32| random::normal::<f32>(&[1, heads, l, d], None, None, None).unwrap();
    let mut pool = test_pool(1, kh, hd, bs, 16);
    let table = vec![3u32];
    let (q, k, v) = (r(h, 2, hd), r(kh, 2, hd), r(kh, 2, hd));
    attend(&mut pool, &[Row { table: &table, offset: 0 }], &q, &k, &v, 0);
    let before = pool.read_block(3).unwrap();
    let rows = [Row { table: &table, offset: 2 }];
    let mut f = PagedForward::new(&mut pool, &rows, 2).unwrap();
    let bad = f.attend(0, q.clone(), r(kh, 2, hd / 2), r(kh, 2, hd / 2), &AttendOpts::plain(0.5));
    assert!(format!("{:?}", bad.err()).contains("do not fit the KV pool"));
    drop(f);
    let after = pool.read_block(3).unwrap();
    close(&before[0], &after[0]);
    close(&before[1], &after[1]);
    // And the pool goes on: the next write lands beside the first.
    attend(&mut pool, &rows, &q, &k, &v, 0);
    let kept = pool.read_block(3).unwrap();
    let first = |x: &Array| x.try_index(0..2).unwrap();
    close(&first(&before[0]), &first(&kept[0]));
}

#[test]
fn capacity_doubles_within_the_budget() {
    let mut p = test_pool(1, 1, 1, 4, 40);
    p.reserve(0);
    assert_eq!(p.capacity(), 16);
    p.reserve(16);
    assert_eq!(p.capacity(), 32);
    p.reserve(33);
    assert_eq!(p.capacity(), 40);
}
