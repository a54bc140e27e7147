//! Per-model calibration of the KV families that use one (`rmlx
//! kv-calibrate`): per layer and KV head, the mean key and the mean value
//! over a calibration text, as the model's own cache holds them (after RoPE).
//! A family whose `calibration()` is `mean` encodes what differs from the
//! mean and adds it back exactly (plugin-api `author::kv::Centered`).
//!
//! The file, `kv_calibration.safetensors` in the model's directory:
//! `layers.{i}.keys.mean` and `layers.{i}.values.mean`, float32 [K, hd].
use super::LoadedModel;
use anyhow::{bail, Context, Result};
use mlx_rs::{Array, Dtype};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;

pub const FILE: &str = "kv_calibration.safetensors";

pub struct KvCalibration {
    /// The file's content hash (keys the prefix cache and the SSD tier).
    pub hash: u64,
    /// Per layer: mean key and mean value, float32 [K, hd]; None for a
    /// layer without K/V.
    pub layers: Vec<Option<(Array, Array)>>,
    /// Tokens the means were taken over.
    pub tokens: usize,
}

impl KvCalibration {
    /// The means of `model`'s keys and values over `tokens` (run through its
    /// dense cache in chunks).
    pub fn fit(model: &mut LoadedModel, tokens: &[u32], chunk: usize) -> Result<Self> {
        if tokens.len() < 2 {
            bail!("kv-calibrate needs a text of at least 2 tokens");
        }
        let n = model.spec.num_layers as usize;
        let mut cache = model.kv_cache(); // shared-KV layers read their source (layer_kv: None)
        for piece in tokens.chunks(chunk.max(1)) {
            let ids: Vec<i32> = piece.iter().map(|&t| t as i32).collect();
            let input = Array::from_slice(&ids, &[1, ids.len() as i32]);
            let logits = model.logits(&input, &mut cache, true)?;
            cache.advance(ids.len() as i32);
            logits.eval()?;
        }
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            layers.push(match cache.layer_kv(i) {
                // [1, K, T, hd] -> [K, hd]
                Some((k, v)) => {
                    let mean = |x: &Array| -> Result<Array> {
                        let m = x.as_dtype(Dtype::Float32)?.mean_axes(&[0, 2], false)?;
                        m.eval()?;
                        Ok(m)
                    };
                    Some((mean(&k)?, mean(&v)?))
                }
                None => None,
            });
        }
        let mut cal = Self { hash: 0, layers, tokens: tokens.len() };
        cal.hash = cal.content_hash()?;
        Ok(cal)
    }

    fn content_hash(&self) -> Result<u64> {
        let mut h = DefaultHasher::new();
        for (i, l) in self.layers.iter().enumerate() {
            i.hash(&mut h);
            if let Some((k, v)) = l {
                for a in [k, v] {
                    a.shape().hash(&mut h);
                    for x in a.as_slice::<f32>() {
                        x.to_bits().hash(&mut h);
                    }
                }
            }
        }
        Ok(h.finish())
    }

    /// Writes the file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bufs: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Some((k, v)) = l {
                for (side, a) in [("keys", k), ("values", v)] {
                    let bytes: Vec<u8> = a.as_slice::<f32>().iter().flat_map(|x| x.to_le_bytes()).collect();
                    let shape = a.shape().iter().map(|&d| d as usize).collect();
                    bufs.push((format!("layers.{i}.{side}.mean"), bytes, shape));
                }
            }
        }
        let views = bufs
            .iter()
            .map(|(n, b, s)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?)))
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([
            ("format".to_string(), "rmlx-kv-calibration-1".to_string()),
            ("tokens".to_string(), self.tokens.to_string()),
            ("layers".to_string(), self.layers.len().to_string()),
        ]);
        safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The model directory's calibration, if it has one.
    pub fn load(dir: &Path, num_layers: usize) -> Result<Option<Self>> {
        let path = dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let layers_in_file: Option<usize> = meta.metadata().as_ref().and_then(|m| m.get("layers")).and_then(|s| s.parse().ok());
        if layers_in_file.is_some_and(|n| n != num_layers) {
            bail!("{} was written for {} layers, the model has {num_layers}: run `rmlx kv-calibrate` again", path.display(), layers_in_file.unwrap_or(0));
        }
        let tokens = meta.metadata().as_ref().and_then(|m| m.get("tokens")).and_then(|s| s.parse().ok()).unwrap_or(0);
        let get = |name: &str| -> Result<Option<Array>> {
            let Ok(t) = st.tensor(name) else { return Ok(None) };
            if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 2 {
                bail!("{}: {name} must be float32 [kv_heads, head_dim]", path.display());
            }
            let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok(Some(Array::from_slice(&v, &[t.shape()[0] as i32, t.shape()[1] as i32])))
        };
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let (k, v) = (get(&format!("layers.{i}.keys.mean"))?, get(&format!("layers.{i}.values.mean"))?);
            layers.push(k.zip(v));
        }
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        Ok(Some(Self { hash: h.finish(), layers, tokens }))
    }

    /// Layer `i`'s mean for one side (`keys` or `values`).
    pub fn mean(&self, layer: usize, keys: bool) -> Option<&Array> {
        self.layers.get(layer)?.as_ref().map(|(k, v)| if keys { k } else { v })
    }
}
