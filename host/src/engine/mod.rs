//! The engine: owns MLX compute for loaded models. One sequence at a time for
//! now (cache.rs is the contiguous KV cache; the paged cache replaces it).
pub mod cache;
pub mod generate;
pub mod loaded;
pub mod sampler;
pub mod worker;

pub use generate::{GenerateOptions, GenerateOutput, Session};
pub use loaded::LoadedModel;
