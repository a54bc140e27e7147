//! Live recurrent state charged to the KV budget (issue 13). A sequence of a
//! model with STATE layers (gated DeltaNet: conv state [1, K-1, C] and SSM
//! state [1, Hv, Dv, Dk] per layer, recurrent.rs) keeps a fixed-size state
//! beside its blocks for as long as it runs. That state is KV memory as
//! much as its blocks are, so a running sequence is charged one state's
//! bytes in the engine's shared account from admission to retirement
//! (`charge_state` / `credit_state`): admission sees the room it takes, and
//! a reservation that finds no room preempts sequences, whose states go
//! back with their blocks. (The prefix cache's state snapshots are charged
//! apart, recurrent.rs `Snapshots`.)
//!
//! `Model::layers()` declares which layers keep a state but not its size,
//! so the lane measures it once ([`probe_state_bytes`]): a one-token
//! forward over a one-sequence cache, never evaluated (an array's bytes
//! are known from its shape and dtype).
use super::BlockManager;
use crate::engine::attend::ForwardRequest;
use crate::engine::kv_groups::DEAD;
use crate::engine::recurrent::RowState;
use crate::engine::LoadedModel;
use mlx_rs::Array;
use rmlx_plugin_api::author::Output;

/// Bytes of one sequence's recurrent state (every STATE layer's arrays,
/// [1, ...] each) of `model`: the state a one-token forward sets, built but
/// not evaluated. 0 for a model without state layers.
pub fn probe_state_bytes(model: &mut LoadedModel) -> anyhow::Result<u64> {
    if !model.has_state() {
        return Ok(0);
    }
    let mut cache = model.kv_cache();
    let input = Array::from_slice(&[0i32], &[1, 1]); // [1, 1]
    let req = ForwardRequest { output: Some(Output::Hidden), ..ForwardRequest::default() };
    model.run(&input, &mut cache, req)?;
    let bytes: u64 = cache.states().iter().flatten().map(|a| a.nbytes() as u64).sum();
    anyhow::ensure!(bytes > 0, "a one-token forward set no recurrent state");
    Ok(bytes)
}

impl BlockManager {
    /// Bytes one running sequence's recurrent state takes (charged per
    /// running sequence); None until measured.
    pub fn state_bytes(&self) -> Option<u64> {
        self.state_bytes
    }

    pub fn set_state_bytes(&mut self, bytes: u64) {
        self.state_bytes = Some(bytes);
    }

    /// Charges sequence `id`'s live state to the shared account. False
    /// (nothing charged) when the account has no room; true without a
    /// state to charge or when `id` is charged already.
    pub fn charge_state(&mut self, id: u64) -> bool {
        let n = self.state_bytes.unwrap_or(0);
        if n == 0 || self.live_states.contains(&id) {
            return true;
        }
        if let Some(a) = &self.account {
            if !a.charge(n) {
                return false;
            }
        }
        self.live_states.insert(id);
        true
    }

    /// Sequence `id` no longer runs: its state's charge goes back.
    pub fn credit_state(&mut self, id: u64) {
        if self.live_states.remove(&id) {
            if let Some(a) = &self.account {
                a.credit(self.state_bytes.unwrap_or(0));
            }
        }
    }

    /// Keeps the charges of `running` only (after a panic lost sequences
    /// that never retired).
    pub fn keep_states(&mut self, running: &[u64]) {
        let gone: Vec<u64> = self.live_states.iter().copied().filter(|id| !running.contains(id)).collect();
        for id in gone {
            self.credit_state(id);
        }
    }

    /// Running sequences whose state is charged, and the bytes charged.
    pub fn live_states(&self) -> (usize, u64) {
        let n = self.live_states.len();
        (n, n as u64 * self.state_bytes.unwrap_or(0))
    }

    /// Keeps `state` as cached block `h`'s snapshot (recurrent.rs
    /// `Snapshots`). When the budget is full (in a steady state, of idle
    /// cached blocks), idle blocks are evicted for its room, least recently
    /// used first and never `h` (it is held meanwhile); a prefix cache
    /// full of blocks without snapshots could never be hit. False when not
    /// kept (`h` is not cached, or no idle block is left to evict).
    pub fn keep_snapshot(&mut self, h: u64, state: RowState) -> bool {
        let Some(b) = self.cache.get(&h).map(|c| c.block) else { return false };
        if self.snapshots.put(h, state.clone()) {
            return true;
        }
        self.hold(b);
        self.shed(crate::engine::recurrent::bytes(&state));
        let kept = self.snapshots.put(h, state);
        // Held without a window reference (as `lookup` holds): give it back so.
        self.release(&[b | DEAD]);
        kept
    }

    /// Whether `full` blocks and one sequence's state fit the whole budget
    /// at all (with nothing else held).
    pub fn fits_with_state(&self, full: usize) -> bool {
        let (Some(n), Some(acc)) = (self.state_bytes.filter(|&n| n > 0), self.account.as_ref()) else { return true };
        full as u64 * self.block_bytes + n <= acc.total()
    }
}

#[cfg(test)]
mod tests {
    use super::super::BlockManager;
    use crate::engine::kv_budget::KvAccount;
    use std::sync::Arc;

    fn manager(account: &Arc<KvAccount>, block_bytes: u64) -> BlockManager {
        let pool = crate::engine::kv_pool::test_pool(1, 1, 2, 4, 16);
        BlockManager::new(pool, "state-test").with_account(account.clone(), block_bytes)
    }

    #[test]
    fn live_states_take_budget_blocks_would_use() {
        // 1000 bytes: blocks of 100, states of 250.
        let account = Arc::new(KvAccount::new(1000));
        let mut m = manager(&account, 100);
        m.set_state_bytes(250);
        assert!(m.charge_state(1) && m.charge_state(2));
        assert!(m.charge_state(2), "a sequence is charged once");
        assert_eq!(m.live_states(), (2, 500));
        assert_eq!(account.used(), 500);
        // The blocks see the room the states take: 5 of 10.
        assert_eq!(m.available(), 5);
        let blocks = m.allocate(5).expect("5 blocks fit");
        assert!(m.allocate(1).is_none());
        // No room for a third state.
        assert!(!m.charge_state(3));
        assert_eq!(account.used(), 1000);
        // A sequence retires: its state goes back, a block fits again.
        m.credit_state(1);
        m.credit_state(1);
        assert_eq!((m.live_states(), account.used()), ((1, 250), 750));
        assert_eq!(m.available(), 2);
        m.release(&blocks);
        // After a panic: only the running sequences keep their charge.
        assert!(m.charge_state(4));
        m.keep_states(&[4]);
        assert_eq!((m.live_states(), account.used()), ((1, 250), 250));
        // A prompt of 8 blocks and a state exceed the whole budget; 7 do not.
        assert!(m.fits_with_state(7) && !m.fits_with_state(8));
        // The manager dropped (its model unloads): every charge goes back.
        drop(m);
        assert_eq!(account.used(), 0);
    }

    #[test]
    fn a_model_without_state_charges_nothing() {
        let account = Arc::new(KvAccount::new(1000));
        let mut m = manager(&account, 100);
        assert!(m.charge_state(1));
        m.set_state_bytes(0);
        assert!(m.charge_state(2));
        assert_eq!((m.live_states(), account.used()), ((0, 0), 0));
        assert!(m.fits_with_state(10));
    }
}
