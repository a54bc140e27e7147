//! Files on disk -> config, weights, tokenizer, chat template.
pub mod adapters;
pub mod chat_template;
pub mod files;
pub mod generation_config;
pub mod params;
pub mod policy;
pub mod pooling;
pub mod quant;
pub mod safetensors;
pub mod text;
pub mod tokenizer;
pub mod weights;

pub use files::ModelDir;
pub use quant::QuantSpec;
