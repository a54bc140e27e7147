//! Reads a safetensors header and checks the file is whole before MLX maps it.
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: (u64, u64),
}

/// Tensor name -> info, from the header alone.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let name = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    if len < 8 || f.read_exact(&mut n).is_err() {
        bail!("{name}: truncated safetensors file ({len} bytes)");
    }
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > len {
        bail!("{name}: truncated or corrupt safetensors file (header of {n} bytes, file of {len})");
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| anyhow::anyhow!("{name}: corrupt safetensors header: {e}"))?;
    let mut out = BTreeMap::new();
    for (k, t) in v.as_object().into_iter().flatten() {
        if k == "__metadata__" {
            continue;
        }
        let info: TensorInfo =
            serde_json::from_value(t.clone()).map_err(|e| anyhow::anyhow!("{name}: tensor {k}: {e}"))?;
        out.insert(k.clone(), info);
    }
    Ok(out)
}

/// Fails with a one-line message when the file is shorter than its header says.
pub fn check_file(path: &Path) -> Result<()> {
    let tensors = read_header(path)?;
    let len = std::fs::metadata(path)?.len();
    let mut f = std::fs::File::open(path)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let data_start = 8 + u64::from_le_bytes(n);
    let need = tensors.values().map(|t| t.data_offsets.1).max().unwrap_or(0);
    if data_start + need > len {
        bail!(
            "{}: truncated safetensors file (tensor data needs {} bytes, file has {})",
            path.display(),
            data_start + need,
            len
        );
    }
    Ok(())
}
