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

pub fn on_cpu() -> bool {
    crate::runtime::default_device().to_lowercase().contains("cpu")
}

/// `--dequantize`: `auto` (the default) dequantizes affine layers on a CPU
/// when the model's dense float32 weights fit (see [`resolve`]); `on` and
/// `off` force it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dequantize {
    Auto,
    On,
    Off,
}

impl Dequantize {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "on" | "true" | "yes" | "1" => Self::On,
            "off" | "false" | "no" | "0" => Self::Off,
            other => bail!("unknown --dequantize value `{other}`: use auto, on or off"),
        })
    }
}

/// What the settings ask for (`--dtype`, `--dequantize`), before a model is
/// looked at. Set once by the host at start-up (runtime::init).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySetting {
    pub dtype: ComputeDtype,
    pub dequantize: Dequantize,
}

/// The process default before `set_setting`: the files as they are, which
/// is what tests that compare against mlx-lm goldens pin.
static SETTING: RwLock<PolicySetting> = RwLock::new(PolicySetting { dtype: ComputeDtype::Model, dequantize: Dequantize::Off });

pub fn set_setting(s: PolicySetting) {
    *SETTING.write().unwrap() = s;
    let resolved_dtype = if s.dtype == ComputeDtype::Auto && !on_cpu() { ComputeDtype::Model } else { s.dtype };
    set(LoadPolicy { dtype: resolved_dtype, dequantize: s.dequantize == Dequantize::On });
}

pub fn setting() -> PolicySetting {
    *SETTING.read().unwrap()
}

/// The policy chosen for one model, and why (for `rmlx info` and the
/// server's start-up and load lines).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub policy: LoadPolicy,
    pub why: String,
}

impl Resolved {
    pub fn dtype_name(&self) -> String {
        match self.policy.dtype.target() {
            Some(d) => format!("{d:?}").to_lowercase(),
            None => "model".into(),
        }
    }
    pub fn summary(&self) -> String {
        format!("dtype {}, dequantize {}", self.dtype_name(), if self.policy.dequantize { "on" } else { "off" })
    }
}

/// Dense float32 weights up to this share of the device's memory count as
/// fitting (the rest is for the KV cache and activations).
const DENSE_SHARE: f64 = 0.25;

/// Picks the load policy for the model in `dir` under the process setting.
/// On a CPU, `auto` means float32 compute (MLX has no fast half-precision
/// CPU kernels) and, for affine-quantized models whose dense float32 weights
/// fit in a quarter of RAM, dequantizing at load (MLX's CPU quantized matmul
/// costs the same per row at any batch size; a dense OpenBLAS matmul
/// amortises rows, so batched decode scales). On a GPU, `auto` keeps the
/// files' dtypes and quantization. Explicit flags win.
pub fn resolve(dir: &crate::model::ModelDir) -> Result<Resolved> {
    resolve_with(dir, setting(), on_cpu(), memory_bytes())
}

/// [`resolve`] for a given setting, backend and memory size (tests).
pub fn resolve_with(dir: &crate::model::ModelDir, s: PolicySetting, cpu: bool, memory: u64) -> Result<Resolved> {
    let backend = if cpu { "cpu backend" } else { "gpu backend" };
    let dtype = match s.dtype {
        ComputeDtype::Auto if cpu => ComputeDtype::Float32,
        ComputeDtype::Auto => ComputeDtype::Model,
        d => d,
    };
    let mut why = Vec::new();
    match s.dtype {
        ComputeDtype::Auto if cpu => why.push(format!("{backend}: float32 compute")),
        ComputeDtype::Auto => why.push(format!("{backend}: the files' dtypes")),
        _ => why.push("--dtype given".to_string()),
    }
    let dequantize = match s.dequantize {
        Dequantize::On => {
            why.push("--dequantize on".into());
            true
        }
        Dequantize::Off => {
            why.push("--dequantize off".into());
            false
        }
        Dequantize::Auto => {
            let size = super::params::ModelSize::read(dir)?;
            if !size.has_affine() {
                false
            } else if !cpu {
                why.push("quantized layers kept".into());
                false
            } else {
                let dense = size.params.saturating_mul(4);
                let room = (memory as f64 * DENSE_SHARE) as u64;
                let fits = dense <= room;
                why.push(format!(
                    "affine layers {} (dense float32 weights {:.2} GB {} a quarter of memory, {:.1} GB)",
                    if fits { "dequantized at load" } else { "kept quantized" },
                    dense as f64 / 1e9,
                    if fits { "fit in" } else { "exceed" },
                    room as f64 / 1e9
                ));
                fits
            }
        }
    };
    Ok(Resolved { policy: LoadPolicy { dtype, dequantize }, why: why.join("; ") })
}

/// Physical memory of the machine (what the CPU backend computes in), bytes.
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}
