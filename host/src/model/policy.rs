//! How the host loads a model's tensors, whatever their files hold: the
//! compute dtype (`--dtype`) and whether affine-quantized layers are
//! dequantized at load (`--dequantize`).
//!
//! MLX's CPU backend has no fast half-precision path (a float16
//! `quantized_matmul` here is ~40x slower than float32), and its CPU
//! `quantized_matmul` costs the same per row at 1 and at 8 rows, while a
//! dense float32 matmul through OpenBLAS costs ~3x for 8x the rows (docs/PERF.md).
//! So on a CPU, float32 compute (and, for batched serving of small models,
//! dense float32 weights) is what makes rmlx fast; on a GPU the files' own
//! dtypes and quantization are right. `auto` picks by device.
use anyhow::{bail, Result};
use mlx_rs::Dtype;
use std::sync::RwLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    /// Keep the files' dtypes.
    Model,
    /// float32 on the CPU backend, the files' dtypes elsewhere.
    Auto,
    Float32,
    Float16,
    BFloat16,
}

impl ComputeDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "model" => Self::Model,
            "auto" => Self::Auto,
            "float32" | "f32" => Self::Float32,
            "float16" | "f16" => Self::Float16,
            "bfloat16" | "bf16" => Self::BFloat16,
            other => bail!("unknown dtype `{other}`: use model, auto, float32, float16 or bfloat16"),
        })
    }

    /// The dtype floating-point tensors are cast to, if any.
    pub fn target(self) -> Option<Dtype> {
        match self {
            Self::Model => None,
            Self::Auto => on_cpu().then_some(Dtype::Float32),
            Self::Float32 => Some(Dtype::Float32),
            Self::Float16 => Some(Dtype::Float16),
            Self::BFloat16 => Some(Dtype::Bfloat16),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadPolicy {
    pub dtype: ComputeDtype,
    /// Affine-quantized linear layers become dense at load (in the compute dtype).
    pub dequantize: bool,
}

impl Default for LoadPolicy {
    fn default() -> Self {
        Self { dtype: ComputeDtype::Model, dequantize: false }
    }
}

static POLICY: RwLock<LoadPolicy> = RwLock::new(LoadPolicy { dtype: ComputeDtype::Model, dequantize: false });

/// Set once by the host at start-up (runtime::init), from the settings.
pub fn set(p: LoadPolicy) {
    *POLICY.write().unwrap() = p;
}

pub fn get() -> LoadPolicy {
    *POLICY.read().unwrap()
}

fn on_cpu() -> bool {
    crate::runtime::default_device().to_lowercase().contains("cpu")
}
