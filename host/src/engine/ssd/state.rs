//! A block's recurrent-state snapshot on disk (`<block hash>.kvs`, beside
//! its `.kvb`): the state after the block, for a model with STATE layers
//! (engine/recurrent.rs). Same file format as a block (format.rs): the
//! header carries the block's hash, parent, depth and tokens (checked on
//! read like the block's), the first array is a layer table (u32, rank 1:
//! (layer, array count) pairs, layers ascending), then each layer's arrays
//! in order, each with its dtype and shape ([1, ...], one sequence's row).
//! The file's bytes count in the tier's size, and it is deleted with its
//! block. A file that fails a check is counted corrupt, deleted, and not
//! served: the prefix hit stops at a shallower snapshot.
use super::store::SsdStore;
use super::writer::Job;
use super::{decode, encode, from_raw, parse_fixed, to_raw, BlockFile, RawArray, FIXED, STATE_EXT};
use crate::engine::recurrent::RowState;
use anyhow::{bail, ensure, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The MLX dtype code of the layer table.
fn u32_code() -> u32 {
    u32::from(mlx_rs::Dtype::Uint32)
}

/// A state as a file's arrays: the layer table, then every layer's arrays.
pub fn state_arrays(state: &RowState) -> Result<Vec<RawArray>> {
    ensure!(!state.is_empty(), "an empty state");
    let mut table = Vec::with_capacity(8 * state.len());
    let mut out = vec![];
    for (&layer, arrays) in state {
        ensure!(!arrays.is_empty(), "layer {layer} has no state arrays");
        table.extend_from_slice(&layer.to_le_bytes());
        table.extend_from_slice(&(arrays.len() as u32).to_le_bytes());
        for a in arrays {
            out.push(to_raw(a)?);
        }
    }
    let n = 2 * state.len() as u32;
    out.insert(0, RawArray { dtype: u32_code(), shape: vec![n], data: table });
    Ok(out)
}

/// A file's arrays as a state, checked: the table's layers ascending and
/// its counts matching the arrays, every array one row ([1, ...]), and the
/// state's bytes `want` when given (one sequence's state, measured).
pub fn parse_state(arrays: &[RawArray], want: Option<u64>) -> Result<RowState> {
    let Some((table, rest)) = arrays.split_first() else { bail!("no layer table") };
    ensure!(table.dtype == u32_code() && table.shape.len() == 1 && table.shape[0] % 2 == 0, "no layer table");
    let words: Vec<u32> = table.data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let mut state = RowState::new();
    let mut at = 0;
    let mut last = None;
    for pair in words.chunks_exact(2) {
        let (layer, n) = (pair[0], pair[1] as usize);
        ensure!(last.is_none_or(|l| l < layer), "the layer table is not ascending");
        ensure!(n >= 1 && at + n <= rest.len(), "the layer table does not match the arrays");
        let arrs = &rest[at..at + n];
        ensure!(arrs.iter().all(|a| a.shape.first() == Some(&1)), "layer {layer}: a state array is not one row");
        state.insert(layer, arrs.iter().map(from_raw).collect());
        at += n;
        last = Some(layer);
    }
    ensure!(!state.is_empty() && at == rest.len(), "the layer table does not match the arrays");
    let bytes: u64 = rest.iter().map(|a| a.data.len() as u64).sum();
    if let Some(w) = want {
        ensure!(bytes == w, "{bytes} bytes of state, one sequence's state is {w}");
    }
    Ok(state)
}

impl SsdStore {
    fn state_path(&self, hash: u64) -> PathBuf {
        self.dir.join(format!("{hash:016x}.{STATE_EXT}"))
    }

    /// Whether block `hash` is on disk with its state snapshot.
    pub fn has_state(&mut self, hash: u64) -> bool {
        self.contains(hash) && self.index.get(&hash).is_some_and(|e| e.state > 0)
    }

    /// Deletes block `hash`'s state snapshot file, if any (its block stays).
    pub(super) fn forget_state(&mut self, hash: u64) {
        if let Some(e) = self.index.get_mut(&hash) {
            self.bytes -= e.state;
            e.state = 0;
        }
        self.shared.lock().unwrap().pending.remove(&(hash, true));
        self.delete_file(self.state_path(hash));
    }

    /// At start-up: a `.kvs` file joins its block's entry if its header
    /// and length check; one without its block is deleted, a bad one too
    /// (counted corrupt).
    pub(super) fn scan_state(&mut self, hash: u64, path: &Path) {
        let checked = (|| -> Result<u64> {
            let len = fs::metadata(path)?.len();
            let mut head = [0u8; FIXED];
            std::io::Read::read_exact(&mut fs::File::open(path)?, &mut head)?;
            let f = parse_fixed(&head)?;
            ensure!(f.signature == self.signature && f.hash == hash, "signature or block hash does not match its place");
            ensure!(f.file_len == len, "truncated or padded: {len} bytes, the header says {}", f.file_len);
            Ok(len)
        })();
        match (checked, self.index.get_mut(&hash)) {
            (Ok(len), Some(e)) => {
                e.state = len;
                self.bytes += len;
            }
            (Ok(_), None) => {
                let _ = fs::remove_file(path);
            }
            (Err(err), _) => {
                tracing::warn!("KV SSD tier: {} is corrupt ({err:#}); deleted", path.display());
                self.corrupt += 1;
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Queues block `hash`'s state snapshot for writing beside the block,
    /// which must be on disk (or queued). True when it is there already;
    /// false when not written (no block, over the cap, the queue full
    /// without `wait`, a bad array).
    pub fn put_state(
        &mut self,
        hash: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: &[u32],
        state: &RowState,
        wait: bool,
    ) -> bool {
        if !self.contains(hash) {
            return false;
        }
        if self.has_state(hash) {
            self.touch(hash);
            return true;
        }
        let arrays = match state_arrays(state) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("KV SSD tier: cannot serialize a state snapshot: {e:#}");
                return false;
            }
        };
        let file = BlockFile {
            signature: self.signature,
            hash,
            parent: parent.unwrap_or(0),
            depth: depth as u32,
            tokens: tokens.to_vec(),
            arrays,
        };
        let bytes = Arc::new(encode(&file));
        let len = bytes.len() as u64;
        if len + self.index[&hash].bytes > self.max_bytes {
            return false;
        }
        // Its block goes last in the deletion order, so room is made elsewhere.
        self.touch(hash);
        self.make_room(len);
        if !self.index.contains_key(&hash) {
            return false;
        }
        let path = self.state_path(hash);
        let Some(tx) = self.tx.as_ref() else { return false };
        self.shared.lock().unwrap().pending.insert((hash, true), bytes.clone());
        let job = Job::Write { hash: (hash, true), path, bytes };
        let sent = if wait { tx.send(job).is_ok() } else { tx.try_send(job).is_ok() };
        if !sent {
            self.shared.lock().unwrap().pending.remove(&(hash, true));
            return false;
        }
        self.index.get_mut(&hash).unwrap().state = len;
        self.bytes += len;
        self.state_writes += 1;
        true
    }

    /// Reads block `hash`'s state snapshot back, checked like its block
    /// (signature, hash, tokens, parent, depth, checksum, descriptors) and
    /// its bytes against `want` (one sequence's state) when given. None
    /// when there is none; a file that fails a check is counted corrupt,
    /// deleted and is a None too.
    pub fn load_state(
        &mut self,
        hash: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: &[u32],
        want: Option<u64>,
    ) -> Option<RowState> {
        if !self.has_state(hash) {
            return None;
        }
        let path = self.state_path(hash);
        let pending = self.shared.lock().unwrap().pending.get(&(hash, true)).cloned();
        let bytes = match pending {
            Some(b) => b,
            None => match fs::read(&path) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    tracing::warn!("KV SSD tier: reading {} failed: {e}", path.display());
                    self.forget_state(hash);
                    return None;
                }
            },
        };
        let checked = decode(&bytes).and_then(|f| {
            ensure!(f.signature == self.signature && f.hash == hash, "signature or block hash does not match");
            ensure!(f.tokens == tokens, "token ids do not match");
            ensure!(f.parent == parent.unwrap_or(0) && f.depth as usize == depth, "the block's parent or depth does not match");
            parse_state(&f.arrays, want)
        });
        match checked {
            Ok(st) => {
                self.state_reads += 1;
                self.touch(hash);
                Some(st)
            }
            Err(e) => {
                tracing::warn!("KV SSD tier: {} is corrupt ({e:#}); deleted, not served", path.display());
                self.corrupt += 1;
                self.forget_state(hash);
                None
            }
        }
    }
}
