//! The KV cache's SSD tier (`--kv-ssd-dir`, `--kv-ssd-gb`).
//!
//! Prefix-cache blocks evicted from memory are written here, one file per
//! block, under `<dir>/<signature hash, 16 hex>/<block hash, 16 hex>.kvb`, and
//! read back when a request's chain misses in memory. The format (all
//! little-endian; docs/KV_CACHE.md has the table):
//!
//! - fixed header, 64 bytes: magic `RMLXKVB\0`, format version (u32, 2),
//!   header length (u32), signature hash (u64), block hash (u64), depth
//!   (u32), token count (u32), array count (u32), reserved (u32, 0), payload
//!   length (u64), the parent block's hash (u64, 0 for a first block);
//! - the token ids (u32 each);
//! - one 32-byte descriptor per array (layer 0 K, layer 0 V, layer 1 K, ...):
//!   MLX dtype code (u32), reserved (u32), 4 dims (u32 each), byte length (u64);
//! - the payload: each array's row-major bytes, in descriptor order;
//! - CRC-32 (IEEE, `crc32fast`) of everything before it (u32).
//!
//! Files are written by a writer thread (bounded queue of bytes already on
//! the host) to `<name>.tmp` and renamed, so a reader never sees half a file;
//! a block whose write is still queued is served from those bytes. The
//! directory is indexed at start-up (headers and lengths checked; the CRC on
//! every read), so a restart reuses the blocks. A file that fails any check
//! is counted (`corrupt`), deleted and treated as a miss: never served; so is
//! a block whose tokens, parent or depth are not the ones looked up (a hash
//! collision). Past the size cap the least recently used files are deleted.
//!
//! The block hashes are keyed (block_manager.rs): the key lives in
//! `<dir>/<signature>/hash.key` (16 random bytes, made with the directory;
//! without it the files there are unmatchable and are deleted).
use super::block_manager::HashKey;
use anyhow::{bail, Context, Result};
use mlx_rs::Array;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

const EXT: &str = "kvb";
const KEY_FILE: &str = "hash.key";
/// Writes that may wait for the writer thread; more are dropped (a cache).
const QUEUE: usize = 64;

/// Where the SSD tier lives and how big it may grow (per model).
#[derive(Debug, Clone, PartialEq)]
pub struct SsdConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl SsdConfig {
    /// Checks the settings: `gb` > 0, `dir` creatable and writable.
    pub fn new(dir: &Path, gb: f64) -> Result<Self> {
        if !gb.is_finite() || gb <= 0.0 {
            bail!("--kv-ssd-gb must be a positive number of GB, got {gb}");
        }
        check_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes: (gb * 1e9) as u64,
        })
    }
}

/// `--kv-ssd-gb`: a positive number of GB ("20", "0.5", "20GB").
pub fn parse_gb(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("gb")
        .or_else(|| t.strip_suffix('g'))
        .unwrap_or(&t);
    match t.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => bail!("--kv-ssd-gb `{s}`: expected a positive number of GB, e.g. 20 or 0.5"),
    }
}

/// Creates `dir` if needed and proves it writable with a probe file.
pub fn check_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "--kv-ssd-dir {}: cannot create the directory",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".rmlx-probe-{}", std::process::id()));
    fs::write(&probe, b"ok")
        .with_context(|| format!("--kv-ssd-dir {} is not writable", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

mod format;
pub use format::*;

// ---------------------------------------------------------------- the store

struct Entry {
    bytes: u64,
    last_used: u64,
}

/// State shared with the writer thread.
#[derive(Default)]
struct Shared {
    /// Files queued or being written: served from these bytes meanwhile.
    pending: HashMap<u64, Arc<Vec<u8>>>,
    /// Writes that failed (the index drops them).
    failed: Vec<u64>,
}

enum Job {
    Write {
        hash: u64,
        path: PathBuf,
        bytes: Arc<Vec<u8>>,
    },
    Remove(PathBuf),
}

/// One model's (signature's) blocks on disk.
pub struct SsdStore {
    dir: PathBuf,
    max_bytes: u64,
    signature: u64,
    index: HashMap<u64, Entry>,
    bytes: u64,
    clock: u64,
    key: HashKey,
    shared: Arc<Mutex<Shared>>,
    tx: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
    pub reads: u64,
    pub writes: u64,
    pub corrupt: u64,
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
        };
        store.scan()?;
        Ok(store)
    }

    /// The key the block hashes of this directory are made with.
    pub fn key(&self) -> HashKey {
        self.key
    }

    fn path(&self, hash: u64) -> PathBuf {
        self.dir.join(format!("{hash:016x}.{EXT}"))
    }

    /// Builds the index from the directory (least recently modified = least recently used).
    fn scan(&mut self) -> Result<()> {
        let mut found = Vec::new();
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
                },
            );
            self.bytes += bytes;
        }
        self.make_room(0);
        Ok(())
    }

    /// Forgets writes that failed.
    fn drain_failed(&mut self) {
        let failed = std::mem::take(&mut self.shared.lock().unwrap().failed);
        for h in failed {
            if let Some(e) = self.index.remove(&h) {
                self.bytes -= e.bytes;
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

    /// Deletes a block's file (after any queued write of it).
    fn remove(&mut self, hash: u64) {
        if let Some(e) = self.index.remove(&hash) {
            self.bytes -= e.bytes;
        }
        self.shared.lock().unwrap().pending.remove(&hash);
        let path = self.path(hash);
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
    fn make_room(&mut self, need: u64) {
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
            .insert(hash, bytes.clone());
        let job = Job::Write { hash, path, bytes };
        let sent = if wait {
            tx.send(job).is_ok()
        } else {
            tx.try_send(job).is_ok()
        };
        if !sent {
            self.shared.lock().unwrap().pending.remove(&hash);
            tracing::debug!("KV SSD tier: write queue full; block not spilled");
            return false;
        }
        self.clock += 1;
        self.index.insert(
            hash,
            Entry {
                bytes: len,
                last_used: self.clock,
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
        let pending = self.shared.lock().unwrap().pending.get(&hash).cloned();
        let path = self.path(hash);
        let bytes = match &pending {
            Some(b) => b.clone(),
            None => match fs::read(&path) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    tracing::warn!("KV SSD tier: reading {} failed: {e}", path.display());
                    if let Some(en) = self.index.remove(&hash) {
                        self.bytes -= en.bytes;
                    }
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

/// The directory's hash key, made (16 random bytes, owner-only) when missing;
/// block files made under another key are then deleted (none can match).
fn load_or_make_key(dir: &Path) -> Result<HashKey> {
    let path = dir.join(KEY_FILE);
    if let Ok(b) = fs::read(&path) {
        if let Ok(k) = <[u8; 16]>::try_from(b.as_slice()) {
            return Ok(HashKey(k));
        }
        tracing::warn!("KV SSD tier: {} is not a key; making a new one", path.display());
    }
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        if e.path().extension().is_some_and(|x| x == EXT) {
            let _ = fs::remove_file(e.path());
        }
    }
    let key = HashKey::random();
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    {
        use std::io::Write;
        let mut o = fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&key.0)?;
    }
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// The writer thread: writes `<name>.tmp`, renames it into place, and
/// deletes files, in queue order.
fn spawn_writer(shared: Arc<Mutex<Shared>>) -> Result<(SyncSender<Job>, JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let writer = std::thread::Builder::new()
        .name("rmlx-kv-ssd".into())
        .spawn(move || {
            for job in rx {
                match job {
                    Job::Write { hash, path, bytes } => {
                        let tmp = path.with_extension(format!("{EXT}.tmp"));
                        let r = fs::write(&tmp, &bytes[..]).and_then(|_| fs::rename(&tmp, &path));
                        let mut s = shared.lock().unwrap();
                        if s.pending.get(&hash).is_some_and(|p| Arc::ptr_eq(p, &bytes)) {
                            s.pending.remove(&hash);
                        }
                        if let Err(e) = r {
                            tracing::warn!("KV SSD tier: writing {} failed: {e}", path.display());
                            let _ = fs::remove_file(&tmp);
                            s.failed.push(hash);
                        }
                    }
                    Job::Remove(path) => {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        })?;
    Ok((tx, writer))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn block(hash: u64) -> BlockFile {
        let a = |seed: u8| RawArray {
            dtype: u32::from(mlx_rs::Dtype::Float32),
            shape: vec![1, 2, 3, 2],
            data: (0..48).map(|i| i as u8 ^ seed).collect(),
        };
        BlockFile {
            signature: 7,
            hash,
            parent: 0x99,
            depth: 2,
            tokens: vec![5, 6, 7],
            arrays: vec![a(1), a(2), a(3), a(4)],
        }
    }

    #[test]
    fn format_round_trips_and_every_flip_or_cut_is_caught() {
        let b = block(0xabc);
        let bytes = encode(&b);
        assert_eq!(bytes.len(), FIXED + 3 * 4 + 4 * DESC + 4 * 48 + 4);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 0xabc);
        assert_eq!(u32::from_le_bytes(bytes[32..36].try_into().unwrap()), 2);
        assert_eq!(decode(&bytes).unwrap(), b);
        let f = parse_fixed(&bytes).unwrap();
        assert_eq!(
            (f.signature, f.hash, f.depth, f.file_len),
            (7, 0xabc, 2, bytes.len() as u64)
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                decode(&bad).is_err(),
                "a flipped bit at byte {i} was not caught"
            );
        }
        for n in [0, 5, FIXED, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                decode(&bytes[..n]).is_err(),
                "cut to {n} bytes was not caught"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&long).is_err());
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(parse_gb("20").unwrap(), 20.0);
        assert_eq!(parse_gb("0.5GB").unwrap(), 0.5);
        for bad in ["0", "-1", "x", "", "inf", "nan"] {
            assert!(parse_gb(bad).is_err(), "{bad}");
        }
        let tmp = tempfile::tempdir().unwrap();
        assert!(SsdConfig::new(tmp.path(), 0.0).is_err());
        assert!(SsdConfig::new(tmp.path(), -2.0).is_err());
        assert_eq!(
            SsdConfig::new(&tmp.path().join("a/b"), 1.0)
                .unwrap()
                .max_bytes,
            1_000_000_000
        );
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        let e = SsdConfig::new(&file.join("sub"), 1.0).unwrap_err();
        assert!(format!("{e:#}").contains("--kv-ssd-dir"), "{e:#}");
    }

    /// Two layers' keys and values, each [3 slots, 2 heads, 4].
    fn kv(seed: f32) -> Vec<Array> {
        let a = |x: f32| Array::from_slice(&(0..24).map(|i| i as f32 * x).collect::<Vec<_>>(), &[3, 2, 4]);
        vec![a(seed), a(seed + 1.0), a(seed + 2.0), a(seed + 3.0)]
    }

    /// Block and temp files (not the key).
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.ends_with(KEY_FILE))
            .collect();
        v.sort();
        v
    }

    /// The hash key stays with the directory (a restart matches its blocks);
    /// without it the files there cannot match and are deleted.
    #[test]
    fn the_hash_key_lives_with_the_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SsdConfig { dir: tmp.path().to_path_buf(), max_bytes: 1 << 20 };
        let mut s = SsdStore::open(&cfg, 42).unwrap();
        let key = s.key();
        assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
        s.flush();
        drop(s);
        let s = SsdStore::open(&cfg, 42).unwrap();
        assert_eq!((s.key(), s.blocks()), (key, 1));
        drop(s);
        let sub = tmp.path().join(format!("{:016x}", 42));
        fs::remove_file(sub.join(KEY_FILE)).unwrap();
        let s = SsdStore::open(&cfg, 42).unwrap();
        assert_ne!(s.key(), key);
        assert_eq!(s.blocks(), 0);
        assert!(files(&sub).is_empty());
    }

    #[test]
    fn store_reads_back_survives_reopen_skips_corrupt_and_holds_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SsdConfig {
            dir: tmp.path().to_path_buf(),
            max_bytes: 1 << 20,
        };
        let mut s = SsdStore::open(&cfg, 42).unwrap();
        assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
        // Read at once: served from the queued bytes or the file, never corrupt.
        let got = s.load(1, None, 0, &[1, 2, 3]).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].as_slice::<f32>(), kv(1.0)[3].as_slice::<f32>());
        assert_eq!((s.reads, s.corrupt), (1, 0));
        // Wrong tokens (a hash collision) are never served.
        assert!(s.load(1, None, 0, &[1, 2, 4]).is_none());
        assert_eq!(s.corrupt, 1);
        // Nor the right tokens after another parent, or at another depth.
        assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
        assert!(s.load(1, Some(5), 1, &[1, 2, 3]).is_none());
        assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
        assert!(s.load(1, None, 3, &[1, 2, 3]).is_none());
        assert_eq!(s.corrupt, 3);
        assert!(
            s.put(1, None, 0, &[1, 2, 3], &kv(1.0))
                && s.put(2, Some(1), 1, &[4, 5, 6], &kv(2.0))
                && s.put(3, Some(2), 2, &[7, 8, 9], &kv(3.0))
        );
        let one = s.bytes() / 3;
        s.flush();
        drop(s);
        let sub = tmp.path().join(format!("{:016x}", 42));
        assert_eq!(files(&sub).len(), 3);
        // Restart: indexed, read back.
        let mut s = SsdStore::open(&cfg, 42).unwrap();
        assert_eq!((s.blocks(), s.bytes()), (3, 3 * one));
        assert_eq!(
            s.load(2, Some(1), 1, &[4, 5, 6]).unwrap()[0].as_slice::<f32>(),
            kv(2.0)[0].as_slice::<f32>()
        );
        // Flip a payload byte of block 3, truncate block 1.
        let p3 = sub.join(format!("{:016x}.kvb", 3));
        let mut b = fs::read(&p3).unwrap();
        let n = b.len();
        b[n - 10] ^= 1;
        fs::write(&p3, b).unwrap();
        assert!(s.load(3, Some(2), 2, &[7, 8, 9]).is_none());
        assert_eq!(s.corrupt, 1);
        s.flush();
        assert!(!p3.exists(), "a corrupt file was kept");
        let p1 = sub.join(format!("{:016x}.kvb", 1));
        let b = fs::read(&p1).unwrap();
        fs::write(&p1, &b[..b.len() - 7]).unwrap();
        assert!(s.load(1, None, 0, &[1, 2, 3]).is_none());
        assert_eq!((s.corrupt, s.blocks()), (2, 1));
        s.flush();
        // At start-up: a truncated file, a file in the wrong place and a
        // stray temp file are deleted (the first two counted).
        drop(s);
        let p2 = sub.join(format!("{:016x}.kvb", 2));
        let b = fs::read(&p2).unwrap();
        fs::write(sub.join(format!("{:016x}.kvb", 9)), &b).unwrap();
        fs::write(&p2, &b[..100]).unwrap();
        fs::write(sub.join(format!("{:016x}.kvb.tmp", 8)), b"half").unwrap();
        let s = SsdStore::open(&cfg, 42).unwrap();
        assert_eq!((s.corrupt, s.blocks()), (2, 0));
        assert!(files(&sub).is_empty());
        drop(s);
        // Another signature does not see these blocks.
        assert_eq!(SsdStore::open(&cfg, 43).unwrap().blocks(), 0);
        // The cap: room for two files; the least recently used goes.
        let cfg = SsdConfig {
            dir: tmp.path().join("cap"),
            max_bytes: 2 * one + 10,
        };
        let mut s = SsdStore::open(&cfg, 42).unwrap();
        s.put(1, None, 0, &[1, 2, 3], &kv(1.0));
        s.put(2, Some(1), 1, &[4, 5, 6], &kv(2.0));
        s.touch(1);
        s.put(3, Some(2), 2, &[7, 8, 9], &kv(3.0));
        assert!(s.contains(1) && !s.contains(2) && s.contains(3));
        assert!(s.bytes() <= cfg.max_bytes);
        s.flush();
        let sub = cfg.dir.join(format!("{:016x}", 42));
        let on_disk: u64 = files(&sub)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!((files(&sub).len(), on_disk), (2, s.bytes()));
    }
}
