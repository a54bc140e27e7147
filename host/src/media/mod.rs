//! Image input, the front end (issue 15): an OpenAI `image_url` content
//! part or an Anthropic `image` block source becomes preprocessed pixels that a
//! vision tower can take. api/images.rs calls it; `vision` says which models
//! take images and how their placeholder tokens are laid out; engine/media.rs
//! runs the tower and lends its features to prefill.
//!
//! ```ignore
//! let opts = MediaOptions::default();
//! let proc = ImageProcessor::from_model_dir(model_dir)?; // (pre)processor_config.json
//! let part = "messages[0].content[1]";                               // named in every error
//! let src = ImageSource::from_url(url);      // or ImageSource::from_anthropic(part, &block.source)?
//! let bytes = load_source(part, &src, &opts).await?;                 // data:, http(s)://, file://
//! let img = decode_image(part, &bytes.bytes, &opts)?;                // RGB8
//! let pixels = proc.preprocess(part, &img)?; // f32 data + shape (+ grid_thw), see [`Pixels`]
//! let key = MediaHash::of_rgb(&img);         // prefix-cache key for image-token blocks
//! ```
pub mod hash;
pub mod preprocess;
pub mod resample;
pub mod sizing;
pub mod source;
pub mod ssrf;
pub mod vision;

#[cfg(test)]
mod preprocess_tests;
#[cfg(test)]
mod source_tests;

pub use hash::MediaHash;
pub use preprocess::{ImageProcessor, Pixels};
pub use source::{decode_image, load_source, ImageSource, SourceBytes};

use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong with an image part. Every variant is the caller's input
/// (an API route answers 400 with the message) except [`MediaError::Config`],
/// a model directory problem (500). `part` names the request part, e.g.
/// `messages[0].content[1]`, so the message points at the offending input.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{part}: malformed data URL ({reason})")]
    BadDataUrl { part: String, reason: String },
    #[error("{part}: unsupported image source {scheme:?} (use data:, http:// or https://)")]
    UnsupportedScheme { part: String, scheme: String },
    #[error("{part}: refused URL ({reason})")]
    Refused { part: String, reason: String },
    #[error("{part}: fetching image failed ({reason})")]
    Fetch { part: String, reason: String },
    #[error("{part}: image is larger than the {limit}-byte limit")]
    TooLarge { part: String, limit: usize },
    #[error("{part}: image is {width}x{height}, over the {limit}-pixel limit")]
    TooManyPixels {
        part: String,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error("{part}: not an image ({reason})")]
    NotAnImage { part: String, reason: String },
    #[error("{part}: unusable image ({reason})")]
    Unusable { part: String, reason: String },
    #[error("image processor config: {0}")]
    Config(String),
}

impl MediaError {
    /// The HTTP status an API route should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            MediaError::Config(_) => 500,
            _ => 400,
        }
    }
}

/// Limits and permissions for loading images (rmlx.toml `[server.images]`).
#[derive(Debug, Clone)]
pub struct MediaOptions {
    /// Largest encoded image (data URL payload, HTTP body or file), bytes.
    pub max_bytes: usize,
    /// Largest decoded image, width * height (decompression bombs).
    pub max_pixels: u64,
    /// Whole-request timeout for an `http(s)://` fetch.
    pub fetch_timeout: Duration,
    /// Redirects followed (each target rechecked by the SSRF guard).
    pub max_redirects: usize,
    /// Let `http(s)://` URLs reach loopback, private, link-local... addresses.
    pub allow_private: bool,
    /// Directories whose files `file://` URLs may read; empty refuses all.
    pub allowed_dirs: Vec<PathBuf>,
}

impl Default for MediaOptions {
    fn default() -> Self {
        MediaOptions {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 64 * 1024 * 1024,
            fetch_timeout: Duration::from_secs(10),
            max_redirects: 3,
            allow_private: false,
            allowed_dirs: Vec::new(),
        }
    }
}
