//! The engine: owns MLX compute for loaded models. `generate` runs one
//! sequence (the CLI); the server's engine thread (`worker`) runs many with
//! the continuous-batching `scheduler` over the paged KV store (`kv_pool`),
//! the block allocator and prefix cache (`block_manager`), and the prefix
//! cache's SSD tier (`ssd`). `cache` is the one-sequence contiguous cache of
//! `generate` and the compiled step.
pub mod attend;
pub mod block_manager;
pub mod cache;
pub mod catalog;
mod compile_fn;
pub mod compiled;
pub mod compiled_paged;
pub mod decode;
pub mod embed;
pub mod embed_image;
pub mod encoder;
pub mod generate;
pub mod kv_budget;
pub mod kv_calibration;
pub mod kv_family;
pub mod kv_groups;
pub mod kv_layout;
pub mod kv_pool;
pub mod loaded;
pub mod media;
pub mod metrics;
pub mod mrope;
pub mod op_count;
pub mod paged;
pub mod paged_window;
pub mod recurrent;
pub mod sampler;
pub mod requests;
pub mod scheduler;
pub mod score;
pub mod seq_pool;
pub mod sequence;
pub mod speculative;
pub mod ssd;
pub mod stop;
pub mod worker;

pub use generate::{GenerateOptions, GenerateOutput, Session};
pub use loaded::LoadedModel;
