//! `--kv-budget`: the KV memory the engine may use, in bytes or as a
//! fraction of the memory of the device that holds the cache, and the one
//! account all loaded models' KV blocks draw from (docs/KV_CACHE.md).
use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering};

/// KV memory budget (for the whole engine, shared by the loaded models).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    Bytes(u64),
    /// Of the device's memory (`device_memory`).
    Fraction(f64),
}

impl KvBudget {
    /// "4GB", "512MB", "4" (GB), "0.3" (a fraction when <= 1), "30%".
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let num = |x: &str| {
            x.trim().parse::<f64>().map_err(|_| {
                anyhow::anyhow!("--kv-budget `{s}`: expected e.g. 4GB, 512MB, 0.5 or 50%")
            })
        };
        let v = if let Some(p) = t.strip_suffix('%') {
            KvBudget::Fraction(num(p)? / 100.0)
        } else if let Some(g) = t.strip_suffix("gb").or_else(|| t.strip_suffix('g')) {
            KvBudget::Bytes((num(g)? * 1e9) as u64)
        } else if let Some(m) = t.strip_suffix("mb").or_else(|| t.strip_suffix('m')) {
            KvBudget::Bytes((num(m)? * 1e6) as u64)
        } else if let Some(k) = t.strip_suffix("kb").or_else(|| t.strip_suffix('k')) {
            KvBudget::Bytes((num(k)? * 1e3) as u64)
        } else {
            let x = num(&t)?;
            if x <= 1.0 {
                KvBudget::Fraction(x)
            } else {
                KvBudget::Bytes((x * 1e9) as u64)
            }
        };
        match v {
            KvBudget::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                anyhow::bail!("--kv-budget `{s}`: a fraction must be in (0, 1]")
            }
            KvBudget::Bytes(0) => anyhow::bail!("--kv-budget `{s}` is zero"),
            v => Ok(v),
        }
    }

    pub fn bytes(&self) -> u64 {
        match *self {
            KvBudget::Bytes(b) => b,
            KvBudget::Fraction(f) => (device_memory() as f64 * f) as u64,
        }
    }
}

/// The memory the KV cache lives in: bytes, and where the figure comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMemory {
    pub bytes: u64,
    pub source: String,
}

/// Memory of the device MLX computes on (the default device, which holds
/// the KV pools), as `device_memory_info` finds it.
pub fn device_memory() -> u64 {
    device_memory_info().bytes
}

/// On a GPU, MLX's device info: Metal's `max_recommended_working_set_size`
/// (what the GPU may keep resident), else CUDA's `total_memory`, else
/// `memory_size`. On the CPU, RAM (`MemTotal` in /proc/meminfo, else MLX's
/// `memory_size`). 8 GB when nothing answers.
pub fn device_memory_info() -> DeviceMemory {
    static INFO: std::sync::OnceLock<DeviceMemory> = std::sync::OnceLock::new();
    INFO.get_or_init(|| {
        let (gpu, info) = mlx_device_info();
        let pick = |keys: &[&str]| keys.iter().find_map(|k| info.iter().find(|(n, _)| n == k).map(|(n, v)| (n.clone(), *v)));
        let found = if gpu {
            pick(&["max_recommended_working_set_size", "total_memory", "memory_size"]).map(|(k, v)| (v, format!("GPU {k} (MLX device info)")))
        } else {
            meminfo_total().map(|v| (v, "CPU RAM (/proc/meminfo MemTotal)".to_string())).or_else(|| pick(&["memory_size"]).map(|(k, v)| (v, format!("CPU {k} (MLX device info)"))))
        };
        match found {
            Some((bytes, source)) if bytes > 0 => DeviceMemory { bytes, source },
            _ => DeviceMemory { bytes: 8_000_000_000, source: "unknown (8 GB assumed)".into() },
        }
    })
    .clone()
}

/// Whether MLX's default device is a GPU, and its device info's size values.
fn mlx_device_info() -> (bool, Vec<(String, u64)>) {
    use std::ffi::{CStr, CString};
    let mut out = Vec::new();
    let mut gpu = false;
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        if mlx_sys::mlx_get_default_device(&mut dev) != 0 {
            mlx_sys::mlx_device_free(dev);
            return (false, out);
        }
        let mut ty = mlx_sys::mlx_device_type__MLX_CPU;
        if mlx_sys::mlx_device_get_type(&mut ty, dev) == 0 {
            gpu = ty == mlx_sys::mlx_device_type__MLX_GPU;
        }
        let mut info = mlx_sys::mlx_device_info_new();
        if mlx_sys::mlx_device_info_get(&mut info, dev) == 0 {
            let mut keys = mlx_sys::mlx_vector_string_new();
            if mlx_sys::mlx_device_info_get_keys(&mut keys, info) == 0 {
                for i in 0..mlx_sys::mlx_vector_string_size(keys) {
                    let mut p: *mut std::os::raw::c_char = std::ptr::null_mut();
                    if mlx_sys::mlx_vector_string_get(&mut p, keys, i) != 0 || p.is_null() {
                        continue;
                    }
                    let name = CStr::from_ptr(p).to_string_lossy().into_owned();
                    let Ok(c) = CString::new(name.clone()) else { continue };
                    let mut v: usize = 0;
                    if mlx_sys::mlx_device_info_get_size(&mut v, info, c.as_ptr()) == 0 {
                        out.push((name, v as u64));
                    }
                }
            }
            mlx_sys::mlx_vector_string_free(keys);
        }
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(dev);
    }
    (gpu, out)
}

fn meminfo_total() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            .map(|kb| kb * 1024)
    })
}

/// The engine's one KV budget, in bytes, that every loaded model's blocks
/// draw from: a block is charged when it leaves its model's free list (held
/// by a sequence, or kept in the prefix cache) and credited when it goes
/// back (or its model unloads). Lives on the engine thread; atomics only so
/// the stats can read it.
#[derive(Debug)]
pub struct KvAccount {
    total: u64,
    used: AtomicU64,
}

impl KvAccount {
    pub fn new(total: u64) -> Self {
        Self { total, used: AtomicU64::new(0) }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes not charged yet.
    pub fn room(&self) -> u64 {
        self.total.saturating_sub(self.used())
    }

    /// Takes `bytes` if they are there.
    pub fn charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| (u + bytes <= self.total).then_some(u + bytes))
            .is_ok()
    }

    pub fn credit(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_parsing() {
        assert_eq!(
            KvBudget::parse("4GB").unwrap(),
            KvBudget::Bytes(4_000_000_000)
        );
        assert_eq!(
            KvBudget::parse("512mb").unwrap(),
            KvBudget::Bytes(512_000_000)
        );
        assert_eq!(KvBudget::parse("0.25").unwrap(), KvBudget::Fraction(0.25));
        assert_eq!(KvBudget::parse("30%").unwrap(), KvBudget::Fraction(0.3));
        assert_eq!(
            KvBudget::parse("2").unwrap(),
            KvBudget::Bytes(2_000_000_000)
        );
        assert!(KvBudget::parse("0").is_err());
        assert!(KvBudget::parse("x").is_err());
    }

    #[test]
    fn device_memory_is_known() {
        let m = device_memory_info();
        assert!(m.bytes >= 1 << 30, "{m:?}");
        // This build runs MLX on the CPU: the figure is the machine's RAM.
        if std::path::Path::new("/proc/meminfo").exists() && !mlx_device_info().0 {
            assert_eq!(Some(m.bytes), meminfo_total());
        }
    }

    #[test]
    fn the_account_never_goes_past_its_total() {
        let a = KvAccount::new(100);
        assert!(a.charge(60) && !a.charge(41) && a.charge(40));
        assert_eq!(a.room(), 0);
        a.credit(30);
        assert_eq!((a.used(), a.room()), (70, 30));
    }
}
