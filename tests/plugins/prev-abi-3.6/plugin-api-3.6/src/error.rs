//! Errors that cross the boundary: a kind and a message (MLX's own, for MLX errors).
use abi_stable::{std_types::RString, StableAbi};
use std::fmt;

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// MLX raised an error (shape mismatch, allocation failure, ...).
    Mlx,
    /// The plugin panicked; the panic was caught at the boundary.
    Panic,
    /// The model's config.json or quantization parameters are unusable.
    InvalidConfig,
    /// A tensor the architecture needs is not in the weights.
    MissingWeight,
    /// The plugin does not provide what was asked of it.
    Unsupported,
    Other,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

pub type PResult<T> = abi_stable::std_types::RResult<T, PluginError>;

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: RString::from(message.into()) }
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidConfig, message)
    }
    pub fn missing(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::MissingWeight, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other, message)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<mlx_rs::error::Exception> for PluginError {
    fn from(e: mlx_rs::error::Exception) -> Self {
        Self::new(ErrorKind::Mlx, e.what())
    }
}

