//! The directory's hash key (`hash.key`): the block hashes of the files there
//! are keyed with it.
use super::{EXT, KEY_FILE, STATE_EXT};
use crate::engine::block_manager::HashKey;
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// The directory's hash key, made (16 random bytes, owner-only) when missing;
/// block files made under another key are then deleted (none can match).
pub(super) fn load_or_make_key(dir: &Path) -> Result<HashKey> {
    let path = dir.join(KEY_FILE);
    if let Ok(b) = fs::read(&path) {
        if let Ok(k) = <[u8; 16]>::try_from(b.as_slice()) {
            return Ok(HashKey(k));
        }
        tracing::warn!("KV SSD tier: {} is not a key; making a new one", path.display());
    }
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        if e.path().extension().is_some_and(|x| x == EXT || x == STATE_EXT) {
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
