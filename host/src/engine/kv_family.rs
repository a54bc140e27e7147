//! Which KV-cache family a model's keys and values use: `--kv-cache NAME`,
//! or `--kv-cache-k`/`--kv-cache-v` for an asymmetric pair. Unset, a side
//! takes the dense family of the model's activation dtype (`f32`, `bf16` or
//! `f16`: the fast, exact default). Families are plugins (plugin-api
//! `kv_codec`); the host never branches on their names.
use super::kv_pool::KvSide;
use crate::plugins::Registry;
use anyhow::{Context, Result};
use mlx_rs::Dtype;
use super::kv_calibration::KvCalibration;
use rmlx_plugin_api::{
    author::kv::{KvCodecImpl, LayerDims},
    ModelSpec,
};
use std::sync::RwLock;

/// The families asked for; `None` is the default (dense, activation dtype).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KvChoice {
    pub k: Option<String>,
    pub v: Option<String>,
}

impl KvChoice {
    /// `--kv-cache`, `--kv-cache-k`, `--kv-cache-v`: a side's own flag wins.
    pub fn from_flags(both: Option<&str>, k: Option<&str>, v: Option<&str>) -> Self {
        let pick = |side: Option<&str>| side.or(both).filter(|s| !s.is_empty() && *s != "auto").map(str::to_string);
        Self { k: pick(k), v: pick(v) }
    }
    /// `NAME` or `K/V`, as the choice reads in logs and signatures.
    pub fn label(&self) -> String {
        let side = |s: &Option<String>| s.clone().unwrap_or_else(|| "auto".into());
        if self.k == self.v {
            side(&self.k)
        } else {
            format!("{}/{}", side(&self.k), side(&self.v))
        }
    }
}

static DEFAULT: RwLock<KvChoice> = RwLock::new(KvChoice { k: None, v: None });

/// Sets the process's default choice (from `serve`/`generate` flags).
pub fn set_default(choice: KvChoice) {
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = choice;
}

pub fn default_choice() -> KvChoice {
    DEFAULT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The dense family that stores `dtype` as it is.
pub fn dense_family(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float32 => "f32",
        Dtype::Bfloat16 => "bf16",
        _ => "f16",
    }
}

/// Keys' and values' sides for a model of `spec` whose activations are
/// `dtype`, from the plugins that provide the chosen families.
///
/// A keys family that uses a calibration (`calibration() == "mean"`) gets
/// one codec per layer from `calib` (the model directory's
/// `kv_calibration.safetensors`), or runs uncalibrated with a warning.
pub fn resolve(
    registry: &Registry,
    spec: &ModelSpec,
    dtype: Dtype,
    choice: &KvChoice,
    calib: Option<&KvCalibration>,
) -> Result<(KvSide, KvSide)> {
    let dims = LayerDims { kv_heads: spec.num_kv_heads as i32, head_dim: spec.head_dim as i32, dtype };
    let side = |name: &Option<String>, keys: bool| -> Result<KvSide> {
        let name = name.clone().unwrap_or_else(|| dense_family(dtype).to_string());
        let codec = registry.kv_codec(&name)?;
        let comps = codec.try_components(&dims).with_context(|| format!("KV cache family `{name}`"))?;
        let wants = codec.calibration();
        let mut side = KvSide::with_components(&name, codec, dims, comps)?;
        // Keys only: their shared component is what the rotation families
        // lose (KV_QUANT.md); centering values measured no better (Qwen2.5
        // q8/turbo3: x1.176 uncentered, x1.248 centered).
        match (wants.as_deref(), calib) {
            (None, _) => {}
            (Some(_), _) if !keys => {}
            (Some(_), None) => warn_uncalibrated(&name),
            (Some(_), Some(c)) => {
                let mut codecs: Vec<std::rc::Rc<dyn KvCodecImpl>> = Vec::with_capacity(spec.num_layers as usize);
                for layer in 0..spec.num_layers as usize {
                    codecs.push(match c.mean(layer, keys) {
                        Some(m) => {
                            let cc = registry.kv_codec_calibrated(&name, vec![("mean".to_string(), m.clone())])?;
                            cc.check(&dims).with_context(|| format!("KV cache family `{name}`, layer {layer}'s calibration"))?;
                            std::rc::Rc::new(cc)
                        }
                        None => side.codec.clone(),
                    });
                }
                side.layer_codecs = codecs;
                side.calibration = Some(c.hash);
            }
        }
        Ok(side)
    };
    Ok((side(&choice.k, true)?, side(&choice.v, false)?))
}

/// Says once per family that it runs without its calibration.
fn warn_uncalibrated(name: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if !w.iter().any(|n| n == name) {
        w.push(name.to_string());
        tracing::warn!(
            "KV family `{name}` works better calibrated: run `rmlx kv-calibrate --model DIR` (it writes {} beside the weights)",
            super::kv_calibration::FILE
        );
    }
}

/// A loaded model's families as one key (`f32`, or `q8/turbo3`).
pub fn family_key_of(model: &super::LoadedModel) -> String {
    super::kv_pool::family_key(&model.kv.0, &model.kv.1)
}
