//! Files on disk -> config, weights, tokenizer, chat template.
pub mod files;
pub mod quant;
pub mod safetensors;
pub mod text;
pub mod weights;

pub use files::ModelDir;
pub use quant::QuantSpec;
