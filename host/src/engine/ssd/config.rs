//! The tier's settings: `--kv-ssd-dir` (created and proven writable) and
//! `--kv-ssd-gb`.
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Where the SSD tier lives and how big it may grow (per model).
#[derive(Debug, Clone, PartialEq)]
pub struct SsdConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl SsdConfig {
    /// Checks the settings: `gb` > 0, `dir` creatable and writable.
    pub fn new(dir: &Path, gb: f64) -> Result<Self> {
        if !gb.is_finite() || gb <= 0.0 {
            bail!("--kv-ssd-gb must be a positive number of GB, got {gb}");
        }
        check_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes: (gb * 1e9) as u64,
        })
    }
}

/// `--kv-ssd-gb`: a positive number of GB ("20", "0.5", "20GB").
pub fn parse_gb(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("gb")
        .or_else(|| t.strip_suffix('g'))
        .unwrap_or(&t);
    match t.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => bail!("--kv-ssd-gb `{s}`: expected a positive number of GB, e.g. 20 or 0.5"),
    }
}

/// Creates `dir` if needed and proves it writable with a probe file.
pub fn check_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "--kv-ssd-dir {}: cannot create the directory",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".rmlx-probe-{}", std::process::id()));
    fs::write(&probe, b"ok")
        .with_context(|| format!("--kv-ssd-dir {} is not writable", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}
