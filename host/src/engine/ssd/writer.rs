//! The writer thread and the state it shares with the store: queued files are
//! written to `<name>.tmp` and renamed into place, deletions done, in order.
use super::EXT;
use anyhow::Result;
use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Writes that may wait for the writer thread; more are dropped (a cache).
const QUEUE: usize = 64;

/// A file of the tier: a block's hash, and whether it is the block's
/// recurrent-state snapshot (`.kvs`) rather than its KV (`.kvb`).
pub(super) type FileId = (u64, bool);

/// State shared with the writer thread.
#[derive(Default)]
pub(super) struct Shared {
    /// Files queued or being written: served from these bytes meanwhile.
    pub(super) pending: HashMap<FileId, Arc<Vec<u8>>>,
    /// Writes that failed (the index drops them).
    pub(super) failed: Vec<FileId>,
}

pub(super) enum Job {
    Write {
        hash: FileId,
        path: PathBuf,
        bytes: Arc<Vec<u8>>,
    },
    Remove(PathBuf),
}

/// The writer thread: writes `<name>.tmp`, renames it into place, and
/// deletes files, in queue order.
pub(super) fn spawn_writer(shared: Arc<Mutex<Shared>>) -> Result<(SyncSender<Job>, JoinHandle<()>)> {
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let writer = std::thread::Builder::new()
        .name("rmlx-kv-ssd".into())
        .spawn(move || {
            for job in rx {
                match job {
                    Job::Write { hash, path, bytes } => {
                        let ext = path.extension().map_or(EXT.into(), |e| e.to_string_lossy().into_owned());
                        let tmp = path.with_extension(format!("{ext}.tmp"));
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
