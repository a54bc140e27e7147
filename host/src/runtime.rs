//! Global MLX state. Only the host sets it (memory limit, default device, the
//! error bus subscription); plugins see the same MLX because every image links
//! the same libmlx/libmlxc.
use crate::config::Settings;
use anyhow::Result;

pub fn init(settings: &Settings) -> Result<()> {
    // Warnings only unless RMLX_LOG says otherwise (`rmlx serve` installs
    // its own first: --log-level, --log-format; this is then a no-op).
    crate::logging::init(&crate::logging::LogOptions::default())?;
    // The first mlx-rs call subscribes the host to the error bus.
    let _ = mlx_rs::memory::memory_limit()?;
    if let Some(gb) = settings.memory_limit_gb {
        set_memory_limit_bytes((gb * 1e9) as usize)?;
    }
    use crate::model::policy;
    let dtype = policy::ComputeDtype::parse(&settings.dtype)?;
    let dequantize = policy::Dequantize::parse(&settings.dequantize)?;
    policy::set_setting(policy::PolicySetting { dtype, dequantize });
    crate::engine::kv_family::set_default(crate::engine::kv_family::KvChoice::from_flags(
        settings.kv_cache.as_deref(),
        settings.kv_cache_k.as_deref(),
        settings.kv_cache_v.as_deref(),
    ));
    Ok(())
}

pub fn set_memory_limit_bytes(bytes: usize) -> Result<()> {
    mlx_rs::memory::set_memory_limit(bytes)?;
    Ok(())
}

pub fn memory_limit_bytes() -> Result<usize> {
    Ok(mlx_rs::memory::memory_limit()?)
}

/// "gpu" or "cpu": where MLX runs by default (Metal / CUDA / CPU).
pub fn default_device() -> String {
    let d = mlx_rs::Device::default();
    format!("{d:?}")
}
