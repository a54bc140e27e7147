//! The KV cache's SSD tier (`--kv-ssd-dir`, `--kv-ssd-gb`).
//!
//! Prefix-cache blocks evicted from memory are written here, one file per
//! block, under `<dir>/<signature hash, 16 hex>/<block hash, 16 hex>.kvb`, and
//! read back when a request's chain misses in memory. The format (all
//! little-endian; docs/KV_CACHE.md has the table):
//!
//! - fixed header, 64 bytes: magic `RMLXKVB\0`, format version (u32, 3),
//!   header length (u32), signature hash (u64), block hash (u64), depth
//!   (u32), token count (u32), array count (u32), reserved (u32, 0), payload
//!   length (u64), the parent block's hash (u64, 0 for a first block);
//! - the token ids (u32 each);
//! - one 32-byte descriptor per array (layer 0 K, layer 0 V, layer 1 K, ...):
//!   MLX dtype code (u32), rank (u32, 1 to 4), 4 dims (u32 each, 0 past the
//!   rank), byte length (u64);
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
//! A model with recurrent state (the hybrids' gated DeltaNet layers) keeps a
//! state snapshot beside some cached blocks (engine/recurrent.rs); such a
//! block goes to disk with its snapshot in `<block hash, 16 hex>.kvs`, a file
//! of the same format (state.rs): same header (the block's hash, parent,
//! depth and tokens), its first array a layer table, then the state's arrays
//! (each with its dtype and shape). It is read back (every check, and its
//! bytes against one state's) when a hit ends at its block; one that fails
//! is counted corrupt and deleted, and the hit stops at a shallower snapshot.
//! Its bytes count in the tier's size; it goes when its block goes.
//!
//! The block hashes are keyed (block_manager.rs): the key lives in
//! `<dir>/<signature>/hash.key` (16 random bytes, made with the directory;
//! without it the files there are unmatchable and are deleted).
mod config;
mod format;
mod key;
mod state;
mod store;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_state;
mod writer;

pub use config::*;
pub use format::*;
pub use store::SsdStore;

const EXT: &str = "kvb";
/// A block's recurrent-state snapshot, beside its `.kvb` (state.rs).
const STATE_EXT: &str = "kvs";
const KEY_FILE: &str = "hash.key";
