//! `--kv-budget`: the KV memory a model may use, in bytes or as a fraction of
//! the device's memory.
use anyhow::Result;

/// KV memory budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    Bytes(u64),
    /// Of the device's memory (system RAM on CPU).
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

/// Total memory of the device MLX computes on; system RAM on CPU (Linux
/// /proc/meminfo), 8 GB when unknown.
pub fn device_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8_000_000_000)
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
}
