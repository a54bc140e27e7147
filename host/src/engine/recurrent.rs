//! Recurrent state in the server's paged engine (plugin-api 3.3
//! `cache_kind::STATE`: the gated DeltaNet layers of qwen3_next / qwen3_5).
//!
//! A sequence keeps its state beside its KV blocks (`Sequence::state`: per
//! state layer, its arrays [1, ...]). A batched forward lends the rows'
//! states to the model stacked over the batch ([B, ...], rows in the batch's
//! order; a fresh row gets zeros shaped like the others', and a batch of
//! fresh rows none: the layer starts from zeros itself), and splits what the
//! model sets back into rows once the forward succeeded (`paged.rs`,
//! `decode.rs`).
//!
//! Prefix cache: the state after a block boundary is what a request sharing
//! that block-aligned prefix needs to resume. A sequence holds a snapshot of
//! its state at the last block boundary it crossed (`Sequence::snapshot`);
//! when its blocks join the prefix cache (prompt done, retirement,
//! preemption) the snapshot joins too, keyed by the hash of the block that
//! ends at the boundary (`Snapshots`). A lookup keeps the hit blocks up to
//! the deepest one with a snapshot only, and the sequence starts from that
//! snapshot. A snapshot lives as long as its block stays cached (evicting
//! the block drops it) and is charged to the engine's KV budget.
use super::block_manager::BlockManager;
use super::kv_budget::KvAccount;
use mlx_rs::{
    ops::{concatenate, indexing::TryIndexOp, zeros_like},
    transforms::async_eval,
    Array,
};
use rmlx_plugin_api::PluginError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One sequence's recurrent state: per state layer, its arrays, each
/// [1, ...]. A layer absent: the sequence has not run it yet (zeros).
pub type RowState = BTreeMap<u32, Vec<Array>>;

/// Layer `layer`'s state of `rows` stacked over the batch: per component
/// [B, ...]. Rows without one get zeros shaped like the others'; empty when
/// no row has one (every row is fresh).
pub fn stack(rows: &[&RowState], layer: u32) -> Result<Vec<Array>, PluginError> {
    let Some(like) = rows.iter().find_map(|r| r.get(&layer)) else {
        return Ok(Vec::new());
    };
    if rows.len() == 1 {
        return Ok(like.clone());
    }
    let mut out = Vec::with_capacity(like.len());
    for (c, template) in like.iter().enumerate() {
        let parts = rows
            .iter()
            .map(|r| match r.get(&layer) {
                Some(s) if s.len() == like.len() => Ok(s[c].clone()),
                Some(s) => Err(PluginError::other(format!(
                    "layer {layer}: rows keep {} and {} state arrays",
                    s.len(),
                    like.len()
                ))),
                None => Ok(zeros_like(template)?),
            })
            .collect::<Result<Vec<_>, PluginError>>()?;
        out.push(concatenate(&parts, 0)?); // [B, ...]
    }
    Ok(out)
}

/// The last batched forward's new states, stacked as the model set them
/// (kept in the lane's pool): while the next step has the same rows in the
/// same order and none changed since (`Sequence::state_tag`), it lends these
/// as they are instead of stacking the rows' views of them again.
pub struct BatchState {
    pub tag: u64,
    pub rows: usize,
    pub states: HashMap<u32, Vec<Array>>,
}

/// A tag no other batch state has.
pub fn next_tag() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Row `r` of a stacked state (each component [B, ...] -> [1, ...]).
pub fn row(stacked: &[Array], r: usize, b: usize) -> Result<Vec<Array>, PluginError> {
    if b == 1 {
        return Ok(stacked.to_vec());
    }
    let r = r as i32;
    stacked.iter().map(|a| Ok(a.try_index(r..r + 1)?)).collect()
}

/// A copy of `state` that holds its own buffers (a row of a batch's state is
/// a view of the whole batch's array), evaluated in the background.
pub fn snapshot(state: &RowState) -> Result<RowState, PluginError> {
    let mut out = RowState::new();
    for (&layer, arrays) in state {
        let copies = arrays.iter().map(|a| Ok(a.add(zeros_like(a)?)?)).collect::<Result<Vec<_>, PluginError>>()?;
        out.insert(layer, copies);
    }
    async_eval(out.values().flatten())?;
    Ok(out)
}

/// Bytes a state's arrays take.
pub fn bytes(state: &RowState) -> u64 {
    state.values().flatten().map(|a| a.nbytes() as u64).sum()
}

/// The prefix cache's state snapshots: per block hash, the state after that
/// block (and every block before it in its chain). Charged to the KV budget.
#[derive(Default)]
pub struct Snapshots {
    map: HashMap<u64, RowState>,
    account: Option<Arc<KvAccount>>,
    /// Bytes the snapshots take now.
    pub bytes: u64,
}

impl Snapshots {
    pub fn with_account(&mut self, account: Arc<KvAccount>) {
        self.account = Some(account);
    }

    pub fn contains(&self, h: u64) -> bool {
        self.map.contains_key(&h)
    }

    pub fn get(&self, h: u64) -> Option<&RowState> {
        self.map.get(&h)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keeps `state` as block `h`'s snapshot; false (not kept) when the KV
    /// budget has no room for it. A snapshot already there stays.
    pub fn put(&mut self, h: u64, state: RowState) -> bool {
        if self.map.contains_key(&h) {
            return true;
        }
        let n = bytes(&state);
        if let Some(a) = &self.account {
            if !a.charge(n) {
                return false;
            }
        }
        self.bytes += n;
        self.map.insert(h, state);
        true
    }

    /// Drops block `h`'s snapshot (its block left the prefix cache).
    pub fn remove(&mut self, h: u64) {
        self.take(h);
    }

    /// Takes block `h`'s snapshot out (credited): its block left the
    /// prefix cache, maybe for the SSD tier, which keeps it beside the block.
    pub fn take(&mut self, h: u64) -> Option<RowState> {
        let s = self.map.remove(&h)?;
        let n = bytes(&s);
        self.bytes -= n;
        if let Some(a) = &self.account {
            a.credit(n);
        }
        Some(s)
    }
}

impl BlockManager {
    /// [`lookup_keeping`](Self::lookup_keeping) for a model with recurrent
    /// state: the hit is cut to its deepest block that has a state snapshot
    /// (the blocks after it are given back, and counted as not hit), and
    /// comes with that snapshot, the state after the hit's tokens. A block
    /// whose snapshot is not in memory may have it in the SSD tier (kept
    /// there with the block): read back, checked, and kept in memory again;
    /// one that fails to read makes the hit shorter. Other models: the
    /// plain lookup, no state.
    pub fn lookup_state(&mut self, tokens: &[u32], keep_free: usize) -> (Vec<u32>, Option<RowState>) {
        let mut hits = self.lookup_keeping(tokens, keep_free);
        if !self.recurrent || hits.is_empty() {
            return (hits, None);
        }
        let chain = self.chain(&tokens[..hits.len() * self.block_size]);
        let bs = self.block_size;
        let block = |j: usize| &tokens[j * bs..(j + 1) * bs];
        let mut keep = 0;
        let mut state = None;
        for j in (1..=hits.len()).rev() {
            let h = chain[j - 1];
            // With window layers too: a hit of j blocks needs its next
            // query's window blocks (block_manager/window.rs).
            if !self.window_fits(&hits, j) {
                continue;
            }
            if let Some(s) = self.snapshots.get(h) {
                (keep, state) = (j, Some(s.clone()));
                break;
            }
            let parent = j.checked_sub(2).map(|p| chain[p]);
            if let Some(s) = self.load_state_from_ssd(h, parent, j - 1, block(j - 1)) {
                (keep, state) = (j, Some(s));
                break;
            }
        }
        let dropped = hits.split_off(keep);
        self.release(&dropped);
        // Window layers: blocks the longer hit flagged `DEAD` may be in the
        // shorter one's window: they take their window references again
        // (window_fits held above, so nothing more is cut).
        self.fit_window(&mut hits);
        self.stats.prefix_hit_tokens -= (dropped.len() * self.block_size) as u64;
        if keep == 0 {
            self.stats.prefix_hits -= 1;
            self.stats.prefix_misses += 1;
            return (hits, None);
        }
        (hits, state)
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        if let Some(a) = &self.account {
            a.credit(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(layer: u32, x: f32) -> RowState {
        RowState::from([(layer, vec![Array::from_slice(&[x, x + 1.0], &[1, 2]), Array::from_slice(&[x; 3], &[1, 3, 1])])])
    }

    fn values(a: &Array) -> Vec<f32> {
        a.eval().unwrap();
        a.try_as_slice::<f32>().unwrap().to_vec()
    }

    /// Rows' states stack in the rows' order, a fresh row as zeros; split
    /// back, each row gets its own; a batch of fresh rows gets none.
    #[test]
    fn rows_stack_and_split() {
        let (a, fresh, b) = (state(3, 1.0), RowState::new(), state(3, 5.0));
        let st = stack(&[&a, &fresh, &b], 3).unwrap();
        assert_eq!((st[0].shape(), st[1].shape()), (&[3, 2][..], &[3, 3, 1][..]));
        assert_eq!(values(&st[0]), [1.0, 2.0, 0.0, 0.0, 5.0, 6.0]);
        assert_eq!(values(&row(&st, 2, 3).unwrap()[0]), [5.0, 6.0]);
        assert_eq!(values(&row(&st, 1, 3).unwrap()[1]), [0.0; 3]);
        assert!(stack(&[&fresh, &fresh], 3).unwrap().is_empty());
        assert!(stack(&[&a, &b], 4).unwrap().is_empty(), "another layer: no row has it");
        // A snapshot owns its buffers and equals the state.
        let s = snapshot(&RowState::from([(3, row(&st, 0, 3).unwrap())])).unwrap();
        assert_eq!(values(&s[&3][0]), [1.0, 2.0]);
        assert_eq!(bytes(&s), 4 * (2 + 3));
    }

    /// A block manager of a recurrent model: one layer of K/V, blocks of 2.
    fn manager(account: &Arc<KvAccount>) -> BlockManager {
        let mut m = BlockManager::new(super::super::kv_pool::test_pool(1, 1, 2, 2, 8), "r").with_account(account.clone(), 16);
        m.recurrent = true;
        m
    }

    /// A hit is cut to its deepest block with a snapshot and comes with it;
    /// with none it is a miss. Snapshots are charged to the budget, refused
    /// past it, and dropped (credited) with their block.
    #[test]
    fn hits_stop_at_the_deepest_snapshot() {
        let account = Arc::new(KvAccount::new(8 * 16 + 40));
        let mut m = manager(&account);
        let tokens = [1, 2, 3, 4, 5, 6, 7];
        let chain = m.chain(&tokens);
        let kv = |x: f32| vec![Array::from_slice(&[x; 4], &[2, 1, 2]), Array::from_slice(&[-x; 4], &[2, 1, 2])];
        for (j, &h) in chain.iter().enumerate() {
            let parent = j.checked_sub(1).map(|p| chain[p]);
            assert!(m.insert_data(h, parent, j, tokens[2 * j..2 * j + 2].to_vec(), &kv(j as f32)));
        }
        let (hit, st) = m.lookup_state(&tokens, 0);
        assert!(hit.is_empty() && st.is_none(), "no snapshot: a miss");
        assert_eq!((m.stats.prefix_hits, m.stats.prefix_misses, m.stats.prefix_hit_tokens), (0, 1, 0));
        let used = account.used();
        assert!(m.snapshots.put(chain[1], state(0, 2.0)));
        assert_eq!(account.used(), used + 20);
        let big = RowState::from([(0, vec![Array::from_slice(&[0f32; 100], &[1, 100])])]);
        assert!(!m.snapshots.put(chain[0], big), "past the budget");
        assert_eq!(account.used(), used + 20);
        let (hit, st) = m.lookup_state(&tokens, 0);
        assert_eq!(hit, [m.get(chain[0]).unwrap().block, m.get(chain[1]).unwrap().block]);
        assert_eq!(values(&st.unwrap()[&0][0]), [2.0, 3.0]);
        assert_eq!((m.stats.prefix_hits, m.stats.prefix_hit_tokens), (1, 4));
        m.release(&hit);
        // Every block idle: evicting them all drops the snapshot, credited.
        assert!(m.allocate(8).is_some());
        assert!(m.snapshots.is_empty() && m.snapshots.bytes == 0);
        assert_eq!(account.used(), 8 * 16);
        drop(m);
        assert_eq!(account.used(), 0);
    }
}
