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
        if let Some(s) = self.map.remove(&h) {
            let n = bytes(&s);
            self.bytes -= n;
            if let Some(a) = &self.account {
                a.credit(n);
            }
        }
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        if let Some(a) = &self.account {
            a.credit(self.bytes);
        }
    }
}
