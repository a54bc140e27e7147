//! [`SsdStore`]: one model's blocks on disk, indexed in memory (sizes and
//! recency), written through the writer thread and read back with every check.
use super::key::load_or_make_key;
use super::writer::{spawn_writer, Job, Shared};
use super::{decode, encode, from_raw, parse_fixed, to_raw, BlockFile, SsdConfig, EXT, FIXED, STATE_EXT};
use crate::engine::block_manager::HashKey;
use anyhow::{bail, Context, Result};
use mlx_rs::Array;
use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

pub(super) struct Entry {
    pub(super) bytes: u64,
    pub(super) last_used: u64,
    /// Bytes of the block's state snapshot file (`.kvs`, state.rs); 0: none.
    pub(super) state: u64,
}

/// One model's (signature's) blocks on disk.
pub struct SsdStore {
    pub(super) dir: PathBuf,
    pub(super) max_bytes: u64,
    pub(super) signature: u64,
    pub(super) index: HashMap<u64, Entry>,
    /// Bytes on disk: block files and state snapshot files.
    pub(super) bytes: u64,
    pub(super) clock: u64,
    key: HashKey,
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) tx: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
    pub reads: u64,
    pub writes: u64,
    pub corrupt: u64,
    /// State snapshots read back and written (state.rs).
    pub state_reads: u64,
    pub state_writes: u64,
}

impl SsdStore {
    /// Opens (creating) `<cfg.dir>/<signature hex>/` and indexes the files
    /// there: bad headers, wrong lengths and leftover temp files are deleted
    /// (bad ones counted as corrupt); the oldest files go if over the cap.
    pub fn open(cfg: &SsdConfig, signature: u64) -> Result<Self> {
        let dir = cfg.dir.join(format!("{signature:016x}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = load_or_make_key(&dir)?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, writer) = spawn_writer(shared.clone())?;
        let mut store = Self {
            dir,
            max_bytes: cfg.max_bytes,
            signature,
            index: HashMap::new(),
            bytes: 0,
            clock: 0,
            key,
            shared,
            tx: Some(tx),
            writer: Some(writer),
            reads: 0,
            writes: 0,
            corrupt: 0,
            state_reads: 0,
            state_writes: 0,
        };
        store.scan()?;
        Ok(store)
    }

    /// The key the block hashes of this directory are made with.
    pub fn key(&self) -> HashKey {
        self.key
    }

    pub(super) fn path(&self, hash: u64) -> PathBuf {
        self.dir.join(format!("{hash:016x}.{EXT}"))
    }

    /// Builds the index from the directory (least recently modified = least recently used).
    fn scan(&mut self) -> Result<()> {
        let mut found = Vec::new();
        let mut states = Vec::new();
        for e in
            fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?
        {
            let Ok(e) = e else { continue };
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            if let Some(h) = name.strip_suffix(&format!(".{STATE_EXT}")).and_then(|h| u64::from_str_radix(h, 16).ok()) {
                states.push((h, path));
                continue;
            }
            let Some(hash) = name
                .strip_suffix(&format!(".{EXT}"))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            let mut head = [0u8; FIXED];
            let ok = fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .map_err(anyhow::Error::from)
                .and_then(|_| parse_fixed(&head))
                .and_then(|f| {
                    if f.signature != self.signature || f.hash != hash {
                        bail!("signature or block hash does not match its place");
                    }
                    if f.file_len != meta.len() {
                        bail!(
                            "truncated or padded: {} bytes, the header says {}",
                            meta.len(),
                            f.file_len
                        );
                    }
                    Ok(())
                });
            match ok {
                Ok(()) => found.push((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    hash,
                    meta.len(),
                )),
                Err(err) => {
                    tracing::warn!(
                        "KV SSD tier: {} is corrupt ({err:#}); deleted",
                        path.display()
                    );
                    self.corrupt += 1;
                    let _ = fs::remove_file(&path);
                }
            }
        }
        found.sort();
        for (_, hash, bytes) in found {
            self.clock += 1;
            self.index.insert(
                hash,
                Entry {
                    bytes,
                    last_used: self.clock,
                    state: 0,
                },
            );
            self.bytes += bytes;
        }
        // State snapshots join their blocks' entries (one without its block is deleted).
        for (hash, path) in states {
            self.scan_state(hash, &path);
        }
        self.make_room(0);
        Ok(())
    }

    /// Forgets writes that failed.
    fn drain_failed(&mut self) {
        let failed = std::mem::take(&mut self.shared.lock().unwrap().failed);
        for (h, state) in failed {
            if state {
                self.forget_state(h);
            } else {
                self.remove(h);
            }
        }
    }

    pub fn contains(&mut self, hash: u64) -> bool {
        self.drain_failed();
        self.index.contains_key(&hash)
    }

    /// Marks a block used (it goes last in the deletion order).
    pub fn touch(&mut self, hash: u64) {
        self.clock += 1;
        if let Some(e) = self.index.get_mut(&hash) {
            e.last_used = self.clock;
        }
    }

    pub fn blocks(&self) -> u64 {
        self.index.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Deletes a block's file and its state snapshot's (after any queued
    /// write of them).
    fn remove(&mut self, hash: u64) {
        if let Some(e) = self.index.remove(&hash) {
            self.bytes -= e.bytes + e.state;
        }
        self.shared.lock().unwrap().pending.remove(&(hash, false));
        self.delete_file(self.path(hash));
        self.forget_state(hash);
    }

    /// Deletes a file through the writer (after its queued writes).
    pub(super) fn delete_file(&mut self, path: PathBuf) {
        match self.tx.as_ref() {
            Some(tx) => {
                let _ = tx.send(Job::Remove(path));
            }
            None => {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Deletes least recently used files until `need` more bytes fit.
    pub(super) fn make_room(&mut self, need: u64) {
        while self.bytes + need > self.max_bytes {
            let Some(victim) = self
                .index
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(h, _)| *h)
            else {
                break;
            };
            self.remove(victim);
        }
    }

    /// Queues a block for writing (if not on disk yet). False when it was
    /// not written: larger than the cap, the queue is full, or a bad array.
    pub fn put(&mut self, hash: u64, parent: Option<u64>, depth: usize, tokens: &[u32], kv: &[Array]) -> bool {
        self.put_with(hash, parent, depth, tokens, kv, false)
    }

    /// `put`, waiting for room in the write queue instead of giving up
    /// (spilling the whole memory cache at shutdown).
    pub fn put_wait(
        &mut self,
        hash: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: &[u32],
        kv: &[Array],
    ) -> bool {
        self.put_with(hash, parent, depth, tokens, kv, true)
    }

    fn put_with(
        &mut self,
        hash: u64,
        parent: Option<u64>,
        depth: usize,
        tokens: &[u32],
        kv: &[Array],
        wait: bool,
    ) -> bool {
        if self.contains(hash) {
            self.touch(hash);
            return true;
        }
        let mut arrays = Vec::with_capacity(kv.len());
        for a in kv {
            match to_raw(a) {
                Ok(a) => arrays.push(a),
                Err(e) => {
                    tracing::warn!("KV SSD tier: cannot serialize a block: {e:#}");
                    return false;
                }
            }
        }
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
        if len > self.max_bytes {
            return false;
        }
        self.make_room(len);
        let path = self.path(hash);
        let Some(tx) = self.tx.as_ref() else {
            return false;
        };
        // Pending before queued: a lookup meanwhile is served from these bytes.
        self.shared
            .lock()
            .unwrap()
            .pending
            .insert((hash, false), bytes.clone());
        let job = Job::Write { hash: (hash, false), path, bytes };
        let sent = if wait {
            tx.send(job).is_ok()
        } else {
            tx.try_send(job).is_ok()
        };
        if !sent {
            self.shared.lock().unwrap().pending.remove(&(hash, false));
            tracing::debug!("KV SSD tier: write queue full; block not spilled");
            return false;
        }
        self.clock += 1;
        self.index.insert(
            hash,
            Entry {
                bytes: len,
                last_used: self.clock,
                state: 0,
            },
        );
        self.bytes += len;
        self.writes += 1;
        true
    }

    /// Reads a block back: per layer (keys, values). None on a miss; a file
    /// that fails a check (checksum, length, signature, hash, shapes), or
    /// that is not this block of this chain (tokens, parent, depth), is
    /// counted as corrupt, deleted, and is a miss too.
    pub fn load(&mut self, hash: u64, parent: Option<u64>, depth: usize, tokens: &[u32]) -> Option<Vec<Array>> {
        if !self.contains(hash) {
            return None;
        }
        let pending = self.shared.lock().unwrap().pending.get(&(hash, false)).cloned();
        let path = self.path(hash);
        let bytes = match &pending {
            Some(b) => b.clone(),
            None => match fs::read(&path) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    tracing::warn!("KV SSD tier: reading {} failed: {e}", path.display());
                    self.remove(hash);
                    return None;
                }
            },
        };
        let checked = decode(&bytes).and_then(|f| {
            if f.signature != self.signature || f.hash != hash {
                bail!("signature or block hash does not match");
            }
            if f.tokens != tokens {
                bail!("token ids do not match");
            }
            if f.parent != parent.unwrap_or(0) || f.depth as usize != depth {
                bail!("the block's parent or depth does not match");
            }
            if f.arrays.is_empty() || f.arrays.iter().any(|a| a.shape.first().map(|&n| n as usize) != Some(tokens.len()))
            {
                bail!("array shapes do not match the block");
            }
            Ok(f)
        });
        match checked {
            Ok(f) => {
                self.reads += 1;
                self.touch(hash);
                if pending.is_none() {
                    if let Ok(file) = fs::File::options().write(true).open(&path) {
                        let _ = file.set_modified(SystemTime::now());
                    }
                }
                Some(f.arrays.iter().map(from_raw).collect())
            }
            Err(e) => {
                tracing::warn!(
                    "KV SSD tier: {} is corrupt ({e:#}); deleted, not served",
                    path.display()
                );
                self.corrupt += 1;
                self.remove(hash);
                None
            }
        }
    }

    /// Waits until every queued write and deletion is on disk.
    pub fn flush(&mut self) {
        if let Some(tx) = self.tx.take() {
            drop(tx);
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.drain_failed();
        // A fresh writer for later blocks.
        if let Ok((tx, w)) = spawn_writer(self.shared.clone()) {
            self.tx = Some(tx);
            self.writer = Some(w);
        }
    }
}

impl Drop for SsdStore {
    /// Finishes queued writes before the store goes.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
