//! The window group's side of one paged forward (kv_groups.rs): where the
//! new tokens' window-layer K/V go, and what the window layers gather. A
//! row gathers only the blocks its queries' window reaches (from the block
//! of `offset + 1 - window`, the first query's first visible position, to
//! its last block), read through `WindowGroup::map`; the blocks before them
//! may be released (table entries flagged `DEAD`) and are never read. Rows
//! are padded to the longest span (padding reads window block 0, masked).
use super::kv_groups::{self, WindowGroup};
use super::paged::{same_run, Row};
use mlx_rs::Array;
use std::collections::HashMap;
use std::ops::Range;

pub struct WinTables {
    /// int32 [N]: the window slots the new real tokens go to (row-major).
    pub write: Array,
    /// int32 [B, blocks]: per row, the window blocks of its span.
    pub tables: Array,
    /// Positions gathered per row (blocks x block size).
    pub ctx: usize,
    /// Per row, the position of its first gathered slot.
    starts: Vec<usize>,
    /// Per window, the mask bool [B, 1, L, ctx].
    masks: HashMap<u32, Array>,
}

impl WinTables {
    /// For rows bringing `lens[b]` new tokens each (left-padded to the
    /// longest); errs when a block the forward reads or writes has no
    /// window data (a bug: it was released while still in a window).
    pub fn new(g: &WindowGroup, bs: usize, rows: &[Row], lens: &[usize]) -> anyhow::Result<Self> {
        let win = |e: u32, p: usize| -> anyhow::Result<u32> {
            if e & kv_groups::DEAD != 0 {
                anyhow::bail!("position {p}'s KV block was released from the window layers, which still read it");
            }
            g.of(e).ok_or_else(|| anyhow::anyhow!("position {p}'s KV block has no window-layer data"))
        };
        let mut write = Vec::new();
        let mut spans = Vec::with_capacity(rows.len());
        let mut starts = Vec::with_capacity(rows.len());
        for (r, &n) in rows.iter().zip(lens) {
            let end = r.offset + n;
            for p in r.offset..end {
                write.push((win(r.table[p / bs], p)? as usize * bs + p % bs) as i32);
            }
            let first = g.first_block(r.offset, bs);
            let blocks = (first..end.div_ceil(bs)).map(|j| Ok(win(r.table[j], j * bs)? as i32)).collect::<anyhow::Result<Vec<i32>>>()?;
            starts.push(first * bs);
            spans.push(blocks);
        }
        let nblk = spans.iter().map(Vec::len).max().unwrap_or(0);
        let mut gather = Vec::with_capacity(rows.len() * nblk);
        for s in &spans {
            gather.extend(s);
            gather.extend(std::iter::repeat_n(0, nblk - s.len()));
        }
        Ok(Self {
            write: Array::from_slice(&write, &[write.len() as i32]),
            tables: Array::from_slice(&gather, &[rows.len() as i32, nblk as i32]),
            ctx: nblk * bs,
            starts,
            masks: HashMap::new(),
        })
    }

    /// bool [B, 1, len, ctx]: query i of row b (position offsets[b] + i;
    /// negative: a ragged row's padding, which sees slot 0 only) sees the
    /// gathered slot j (position starts[b] + j) when it is at or before it
    /// and within `window` of it, or when both lie in one of the row's
    /// bidirectional `runs` (an image's placeholders, paged.rs). A run that
    /// begins before the row's gathered span (a prefix hit inside an image
    /// longer than the window) cannot be seen whole: an error.
    pub fn mask(&mut self, offsets: &[i32], len: usize, window: u32, runs: &[Vec<Range<usize>>]) -> Result<Array, String> {
        let (ctx, starts) = (self.ctx, &self.starts);
        for (b, row) in runs.iter().enumerate() {
            if let Some(r) = row.iter().find(|r| r.start < starts[b]) {
                return Err(format!(
                    "an image's tokens at {}..{} attend to each other, but the window layers keep only positions from {} on \
                     (a prefix-cache hit that ends inside an image longer than the window of {window})",
                    r.start, r.end, starts[b]
                ));
            }
        }
        Ok(self
            .masks
            .entry(window)
            .or_insert_with(|| {
                let mut m = Vec::with_capacity(offsets.len() * len * ctx);
                for (b, (&o, &s)) in offsets.iter().zip(starts).enumerate() {
                    for i in 0..len {
                        let Ok(pos) = usize::try_from(o as isize + i as isize) else {
                            m.extend((0..ctx).map(|j| j == 0));
                            continue;
                        };
                        m.extend((0..ctx).map(|j| {
                            let p = s + j;
                            (p <= pos && (window == 0 || p + window as usize > pos)) || runs.get(b).is_some_and(|r| same_run(r, pos, p))
                        }));
                    }
                }
                Array::from_slice(&m, &[offsets.len() as i32, 1, len as i32, ctx as i32])
            })
            .clone())
    }
}
