//! The prefix cache's chained block hashes: the keyed SipHash over a block's
//! tokens after its parent, and the model signature's hash.
use std::hash::Hasher;

/// The prefix cache's hash key (SipHash-2-4's 128 bits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey(pub [u8; 16]);

impl HashKey {
    /// A fresh random key (the process's, when there is no SSD tier).
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// Chained block hash: keyed SipHash-2-4 over (parent hash, signature hash,
/// token ids), little-endian bytes. The same key gives the same hashes on
/// any run and platform (the SSD tier keeps its key beside its files).
pub fn block_hash(key: &HashKey, parent: u64, signature: u64, tokens: &[u32]) -> u64 {
    let mut h = siphasher::sip::SipHasher24::new_with_key(&key.0);
    h.write(&parent.to_le_bytes());
    h.write(&signature.to_le_bytes());
    for t in tokens {
        h.write(&t.to_le_bytes());
    }
    h.finish()
}

/// Hash of the model/dtype/KV-family signature string (not keyed: it names
/// the SSD tier's directory and is no client's to choose).
pub fn signature_hash(sig: &str) -> u64 {
    let mut h = Fnv::new();
    h.write(sig.as_bytes());
    h.0
}

struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
