//! Layer groups of the server's paged pool: sliding-window layers keep only
//! their window (docs/KV_CACHE.md, "Sliding-window layers").
//!
//! A model that mixes full-attention and sliding-window layers (Gemma 2/3/4)
//! has its storing layers split in two groups. The full group's layers keep
//! every block of a sequence, as before; its block ids are what a
//! sequence's table holds. The window group's layers have arrays of their
//! own, addressed by window block ids: each full block id `b` has, while
//! some sequence still reads it through a window layer (or the prefix cache
//! keeps it), a window block `map[b]` holding the window layers' slots of
//! the same positions. Tables stay one per sequence: an entry flagged
//! [`DEAD`] is a block whose window data that sequence no longer reads (it
//! lies wholly before its next query's window); the block manager drops the
//! sequence's window reference on it, and a window block nobody reads goes
//! back to the free list (or, cached, to the evictable pool). A window
//! layer's charge is then about `ceil(window / block) + 1` blocks per
//! sequence, whatever the context.
//!
//! All window layers form one group with the widest window among them (and
//! among the SHARED layers that read them): one map, one free list. A
//! narrower window layer reads a little more than it needs (masked). A
//! window layer read by a SHARED layer that attends without a window stays
//! in the full group. A model with no full layer (every layer windowed)
//! or no window layer keeps one group.
use super::kv_layout::LayerLayout;

/// Table entry flag: this sequence holds no window reference on the block
/// (its window layers never read it again).
pub const DEAD: u32 = 1 << 31;
/// `WindowGroup::map` entry of a full block without window data.
pub const NONE: u32 = u32::MAX;

/// The full-group block id of a table entry.
pub fn id(entry: u32) -> u32 {
    entry & !DEAD
}

/// The window group of a pool.
#[derive(Clone, Debug)]
pub struct WindowGroup {
    /// The group's window: the widest of its layers' and their readers'.
    pub window: u32,
    /// Per layer: whether its K/V (or, SHARED, its source's) is the group's.
    pub layers: Vec<bool>,
    /// Per full-group block id: its window block ([`NONE`]: none).
    pub map: Vec<u32>,
    /// Window blocks the arrays hold (or will, once touched).
    pub cap: usize,
    /// The ceiling on window blocks.
    pub max: usize,
}

impl WindowGroup {
    /// Window block of full block `b`, if it has one.
    pub fn of(&self, b: u32) -> Option<u32> {
        self.map.get(b as usize).copied().filter(|&w| w != NONE)
    }

    /// The first block a query at position `pos` reads through the group
    /// (blocks before it lie wholly before its window).
    pub fn first_block(&self, pos: usize, block_size: usize) -> usize {
        first_block(pos, self.window, block_size)
    }
}

/// The first block (of `block_size` tokens) a query at `pos` reads through
/// a window of `window` positions (it sees `pos + 1 - window ..= pos`).
pub fn first_block(pos: usize, window: u32, block_size: usize) -> usize {
    (pos + 1).saturating_sub(window as usize) / block_size.max(1)
}

/// Which layers form the window group, and its window: None when the
/// layers do not split (no full layer or no window layer stores K/V).
/// `windows`: per layer, the window its attention uses (0: full).
pub fn plan(layout: &[LayerLayout], windows: &[u32]) -> Option<(u32, Vec<bool>)> {
    let n = layout.len();
    let w = |i: usize| windows.get(i).copied().unwrap_or(0);
    let mut inside: Vec<bool> = (0..n).map(|i| matches!(layout[i], LayerLayout::Own { .. }) && w(i) > 0).collect();
    // A SHARED reader without a window keeps its source in the full group.
    for (i, l) in layout.iter().enumerate() {
        if let LayerLayout::Shared(src) = l {
            if w(i) == 0 {
                inside[*src] = false;
            }
        }
    }
    let mut window = 0;
    for (i, l) in layout.iter().enumerate() {
        match l {
            LayerLayout::Own { .. } if inside[i] => window = window.max(w(i)),
            LayerLayout::Shared(src) if inside[*src] => {
                inside[i] = true;
                window = window.max(w(i));
            }
            _ => {}
        }
    }
    let full = (0..n).any(|i| matches!(layout[i], LayerLayout::Own { .. }) && !inside[i]);
    let any = (0..n).any(|i| matches!(layout[i], LayerLayout::Own { .. }) && inside[i]);
    (full && any).then_some((window, inside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_pool::test_pool;
    use rmlx_plugin_api::{cache_kind, LayerCache};

    fn lc(kind: u32, window: u32, shared_with: u32) -> LayerCache {
        LayerCache { kind, window, kv_heads: 1, head_dim: 4, shared_with }
    }

    #[test]
    fn layers_split_into_full_and_window_groups() {
        let layers = [
            lc(cache_kind::WINDOW, 8, 0),
            lc(cache_kind::FULL, 0, 1),
            lc(cache_kind::WINDOW, 4, 2),
            lc(cache_kind::SHARED, 16, 2),
            lc(cache_kind::STATE, 0, 4),
        ];
        let pool = test_pool(5, 1, 4, 4, 8).with_layers(&layers).unwrap();
        let windows: Vec<u32> = layers.iter().map(|l| l.window).collect();
        let (w, inside) = plan(pool.layouts(), &windows).unwrap();
        assert_eq!(w, 16, "the widest window, a SHARED reader's included");
        assert_eq!(inside, [true, false, true, true, false]);
        // A SHARED reader without a window keeps its source full.
        let mut l2 = layers.clone();
        l2[3].window = 0;
        let windows: Vec<u32> = l2.iter().map(|l| l.window).collect();
        let pool = test_pool(5, 1, 4, 4, 8).with_layers(&l2).unwrap();
        let (w, inside) = plan(pool.layouts(), &windows).unwrap();
        assert_eq!((w, inside), (8, vec![true, false, false, false, false]));
        // Every layer windowed, or none: one group.
        let all = [lc(cache_kind::WINDOW, 8, 0), lc(cache_kind::WINDOW, 8, 1)];
        let pool = test_pool(2, 1, 4, 4, 8).with_layers(&all).unwrap();
        assert!(plan(pool.layouts(), &[8, 8]).is_none());
        assert!(plan(pool.layouts(), &[0, 0]).is_none());
    }

    #[test]
    fn the_first_block_a_query_reads() {
        // Window 8, blocks of 4: a query at 11 sees 4..=11.
        assert_eq!(first_block(11, 8, 4), 1);
        assert_eq!(first_block(12, 8, 4), 1);
        assert_eq!(first_block(7, 8, 4), 0);
        assert_eq!(first_block(14, 8, 4), 1);
        assert_eq!(first_block(15, 8, 4), 2);
        assert_eq!(id(5 | DEAD), 5);
    }
}
