//! A model's size from its files alone (config.json and the safetensors
//! headers, no tensor data): parameters, dtypes, per-module quantization.
//! `rmlx info` prints it; the load policy decides from it whether a model's
//! dense weights fit in memory.
use super::{quant::Quant, safetensors::read_header, ModelDir, QuantSpec};
use anyhow::Result;
use std::collections::BTreeMap;

pub struct ModelSize {
    /// Parameters, counting packed quantized weights at their unpacked size.
    pub params: u64,
    /// Parameters stored dense, by safetensors dtype (`F32`, `BF16`, ...).
    pub dtypes: BTreeMap<String, u64>,
    /// 2-D weight modules and how each is stored.
    pub layers: BTreeMap<String, Quant>,
}

impl ModelSize {
    pub fn read(dir: &ModelDir) -> Result<Self> {
        let quant = QuantSpec::from_config(&dir.config)?;
        let mut tensors = BTreeMap::new();
        for f in &dir.weight_files {
            tensors.extend(read_header(f)?);
        }
        let mut params: u64 = 0;
        let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
        let mut layers: BTreeMap<String, Quant> = BTreeMap::new();
        for (name, t) in &tensors {
            let n: u64 = t.shape.iter().map(|&d| d as u64).product();
            let (module, local) = name.rsplit_once('.').unwrap_or(("", name));
            let quantized = tensors.contains_key(&format!("{module}.scales"));
            match local {
                "scales" | "biases" if quantized => continue,
                "weight" => {
                    let q = quant.for_tensors(module, &|l| tensors.contains_key(&format!("{module}.{l}")));
                    let packed = match t.dtype.as_str() {
                        "U32" => 32,
                        "U8" => 8, // BitNet: four ternary codes a byte
                        _ => 0,
                    };
                    if q.mode != "none" && q.bits > 0 && packed > 0 {
                        params += n * packed / q.bits as u64;
                    } else {
                        params += n;
                        *dtypes.entry(t.dtype.clone()).or_default() += n;
                    }
                    if t.shape.len() == 2 {
                        layers.insert(module.to_string(), q);
                    }
                }
                _ => {
                    params += n;
                    *dtypes.entry(t.dtype.clone()).or_default() += n;
                }
            }
        }
        Ok(Self { params, dtypes, layers })
    }

    /// The dtype most parameters are stored in.
    pub fn main_dtype(&self) -> String {
        self.dtypes.iter().max_by_key(|(_, n)| **n).map(|(d, _)| d.clone()).unwrap_or_default()
    }

    pub fn has_affine(&self) -> bool {
        self.layers.values().any(|q| q.mode == "affine")
    }
}
