//! config.json's `quantization` section as mlx-lm writes it: defaults
//! (`group_size`, `bits`, `mode`) plus per-module overrides keyed by module
//! path, each an object of the same fields or `false` for "left dense".
use anyhow::{bail, Result};
use rmlx_plugin_api::QuantParams;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Quant {
    pub mode: String,
    pub bits: i32,
    pub group_size: i32,
}

impl Quant {
    pub fn dense() -> Self {
        Quant { mode: "none".into(), bits: 0, group_size: 0 }
    }
    pub fn params(&self) -> QuantParams {
        QuantParams { mode: self.mode.as_str().into(), bits: self.bits, group_size: self.group_size }
    }
    pub fn describe(&self) -> String {
        if self.mode == "none" {
            "dense".into()
        } else {
            format!("{} {}-bit g{}", self.mode, self.bits, self.group_size)
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct QuantSpec {
    pub default: Option<Quant>,
    pub overrides: BTreeMap<String, Option<Quant>>,
}

fn parse_one(v: &serde_json::Value, default_mode: &str, what: &str) -> Result<Quant> {
    let int = |k: &str| v.get(k).and_then(|x| x.as_i64()).map(|x| x as i32);
    let mode = v.get("mode").and_then(|m| m.as_str()).unwrap_or(default_mode).to_string();
    let (Some(bits), Some(group_size)) = (int("bits"), int("group_size")) else {
        bail!("config.json quantization{what}: needs integer `bits` and `group_size`");
    };
    Ok(Quant { mode, bits, group_size })
}

impl QuantSpec {
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let Some(q) = config.get("quantization").or_else(|| config.get("quantization_config")) else {
            return Ok(Self::default());
        };
        let Some(obj) = q.as_object() else {
            bail!("config.json: quantization must be an object");
        };
        let default = parse_one(q, "affine", "")?;
        let mut overrides = BTreeMap::new();
        for (k, v) in obj {
            match v {
                serde_json::Value::Object(_) => {
                    // mlx-lm passes the dict to `to_quantized(**params)`, whose
                    // `mode` defaults to "affine" (not to the top-level mode).
                    overrides.insert(k.clone(), Some(parse_one(v, "affine", &format!(".{k}"))?));
                }
                serde_json::Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Ok(Self { default: Some(default), overrides })
    }

    /// How the module at `path` is stored; `has_scales` tells whether the
    /// checkpoint has `<path>.scales` (mlx-lm quantizes exactly those).
    pub fn for_module(&self, path: &str, has_scales: bool) -> Quant {
        match self.overrides.get(path) {
            Some(Some(q)) => q.clone(),
            Some(None) => Quant::dense(),
            None => match (&self.default, has_scales) {
                (Some(q), true) => q.clone(),
                _ => Quant::dense(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_without_mode_is_affine_as_in_mlx_lm() {
        let c = serde_json::json!({"quantization": {
            "group_size": 32, "bits": 4, "mode": "mxfp4",
            "lm_head": {"group_size": 64, "bits": 6},
            "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
            "model.layers.0.mlp.up_proj": false
        }});
        let q = QuantSpec::from_config(&c).unwrap();
        assert_eq!(q.for_module("lm_head", true).mode, "affine");
        assert_eq!(q.for_module("model.embed_tokens", true).mode, "mxfp8");
        assert_eq!(q.for_module("model.layers.0.mlp.up_proj", true).mode, "none");
        assert_eq!(q.for_module("model.layers.0.mlp.down_proj", true).mode, "mxfp4");
        assert_eq!(q.for_module("model.layers.0.mlp.down_proj", false).mode, "none");
    }
}
