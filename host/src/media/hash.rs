//! [`MediaHash`]: the content key the prefix cache will use for image-token
//! blocks.
//!
//! It is the sha256 of the *decoded* RGB8 pixels (transparency already
//! flattened onto white, exactly what preprocessing sees) plus their
//! dimensions, not of
//! the source bytes: the same picture sent as a PNG data URL, a JPEG re-upload
//! of identical pixels or an `https://` URL hashes the same, while two
//! different pictures cannot collide through the container (metadata, chunk
//! order or compression level change the bytes, not the pixels). It is taken
//! before preprocessing so one key serves any processor config; the cache key
//! of an image block is then (MediaHash, model), since the model fixes the
//! preprocessing. Cost: one pass over the pixels, small next to the tower.
use sha2::{Digest, Sha256};

/// sha256 over `b"rmlx-rgb8\0"`, width and height (u32 little-endian) and the
/// row-major RGB8 pixels.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MediaHash(pub [u8; 32]);

impl MediaHash {
    pub fn of_rgb(img: &image::RgbImage) -> MediaHash {
        let mut h = Sha256::new();
        h.update(b"rmlx-rgb8\0");
        h.update(img.width().to_le_bytes());
        h.update(img.height().to_le_bytes());
        h.update(img.as_raw());
        MediaHash(h.finalize().into())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for MediaHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MediaHash({})", self.to_hex())
    }
}
