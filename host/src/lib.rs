//! rmlx host: loads plugins, models and tokenizers, runs the engine, serves the API.
pub mod api;
pub mod audio;
pub mod cli;
pub mod config;
pub mod constrain;
pub mod convert;
pub mod engine;
pub mod hub;
pub mod logging;
pub mod media;
pub mod metrics_db;
pub mod model;
pub mod plugins;
pub mod runtime;
