//! How each module of a checkpoint is stored, from config.json.
//!
//! MLX's `quantization` section as mlx-lm writes it: defaults (`group_size`,
//! `bits`, `mode`) plus per-module overrides keyed by module path, each an
//! object of the same fields or `false` for "left dense"; a module is
//! quantized when `<path>.scales` exists. Without it, a Hugging Face
//! `quantization_config.quant_method` picks the rule (`METHODS`): `bitnet`
//! (modules with `weight_scale`), `paroquant` (modules with `theta`), and
//! `mxfp4`/`mxfp8` as mlx-lm maps them. Any other method is refused at load
//! (`check_method`), naming it and the methods the loaded plugins provide.
use anyhow::{bail, Result};
use rmlx_plugin_api::QuantParams;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Quant {
    pub mode: String,
    pub bits: i32,
    pub group_size: i32,
    /// Stored dense but quantized by the host at load (ParoQuant's loader
    /// quantizes `embed_tokens`/`lm_head` to affine this way).
    pub at_load: bool,
}

impl Quant {
    pub fn dense() -> Self {
        Quant::new("none", 0, 0)
    }
    pub fn new(mode: &str, bits: i32, group_size: i32) -> Self {
        Quant { mode: mode.into(), bits, group_size, at_load: false }
    }
    pub fn params(&self) -> QuantParams {
        QuantParams { mode: self.mode.as_str().into(), bits: self.bits, group_size: self.group_size }
    }
    pub fn describe(&self) -> String {
        let mut s = match (self.mode.as_str(), self.group_size) {
            ("none", _) => "dense".into(),
            (mode, 0) => format!("{mode} {}-bit", self.bits),
            (mode, g) => format!("{mode} {}-bit g{g}", self.bits),
        };
        if self.at_load {
            s.push_str(" (quantized at load)");
        }
        s
    }
}

/// Hugging Face `quantization_config.quant_method`s rmlx maps onto modes,
/// with the modes each can need.
pub const METHODS: &[(&str, &[&str])] = &[
    ("bitnet", &["bitnet", "bitnet-autobitlinear"]),
    ("paroquant", &["paroquant", "affine"]),
    ("mxfp4", &["mxfp4"]),
    ("mxfp8", &["mxfp8"]),
];

/// Which rule decides a module's format.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Method {
    /// MLX's `quantization` section (or none at all): `<path>.scales`.
    #[default]
    Mlx,
    /// BitNet b1.58 (`quant_method: bitnet`): modules with `weight_scale`
    /// take `mode` (`bitnet` for `linear_class: bitlinear`, mlx-lm's default,
    /// `bitnet-autobitlinear` for `autobitlinear`), except those listed in
    /// `modules_to_not_convert`, which stay dense as in mlx-lm.
    BitNet { mode: String, not_converted: Vec<String> },
    /// ParoQuant (`quant_method: paroquant`), in its MLX loader's layout:
    /// modules with `theta` (+ `pairs`, `channel_scales`, affine
    /// `weight`/`scales`/`biases`) are `paroquant`, others with `scales` plain
    /// affine; dense `embed_tokens`/`lm_head` are quantized to affine at load,
    /// as that loader does. All at the config's `bits`/`group_size`.
    ParoQuant { bits: i32, group_size: i32 },
    /// A `quant_method` rmlx does not map (refused by `check_method`).
    Unsupported(String),
}

#[derive(Debug, Clone, Default)]
pub struct QuantSpec {
    pub default: Option<Quant>,
    pub overrides: BTreeMap<String, Option<Quant>>,
    pub method: Method,
}

fn parse_one(v: &serde_json::Value, default_mode: &str, what: &str) -> Result<Quant> {
    let int = |k: &str| v.get(k).and_then(|x| x.as_i64()).map(|x| x as i32);
    let mode = v.get("mode").and_then(|m| m.as_str()).unwrap_or(default_mode).to_string();
    let (Some(bits), Some(group_size)) = (int("bits"), int("group_size")) else {
        bail!("config.json quantization{what}: needs integer `bits` and `group_size`");
    };
    Ok(Quant::new(&mode, bits, group_size))
}

/// The rule for a Hugging Face `quantization_config` with a `quant_method`.
fn from_method(method: &str, qc: &serde_json::Value) -> Result<QuantSpec> {
    let int = |k: &str, d: i64| qc.get(k).and_then(|x| x.as_i64()).unwrap_or(d) as i32;
    let mlx = |mode: &str, bits: i32| QuantSpec { default: Some(Quant::new(mode, bits, 32)), ..Default::default() };
    Ok(match method {
        "bitnet" => {
            let auto = qc.get("linear_class").and_then(|c| c.as_str()) == Some("autobitlinear");
            let not_converted = match qc.get("modules_to_not_convert") {
                Some(serde_json::Value::Array(v)) => v.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
                _ => Vec::new(),
            };
            let mode = if auto { "bitnet-autobitlinear" } else { "bitnet" }.to_string();
            QuantSpec { method: Method::BitNet { mode, not_converted }, ..Default::default() }
        }
        "paroquant" => {
            let (bits, group_size) = (int("bits", 4), int("group_size", 128));
            QuantSpec { method: Method::ParoQuant { bits, group_size }, ..Default::default() }
        }
        // mlx-lm maps these legacy configs onto MLX's own section.
        "mxfp4" => mlx("mxfp4", 4),
        "mxfp8" => mlx("mxfp8", 8),
        other => QuantSpec { method: Method::Unsupported(other.to_string()), ..Default::default() },
    })
}

impl QuantSpec {
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let Some(q) = config.get("quantization").or_else(|| config.get("quantization_config")) else {
            return Ok(Self::default());
        };
        if config.get("quantization").is_none() {
            if let Some(method) = q.get("quant_method") {
                let Some(method) = method.as_str() else {
                    bail!("config.json: quantization_config.quant_method must be a string, got {method}");
                };
                return from_method(method, q);
            }
        }
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
        Ok(Self { default: Some(default), overrides, method: Method::Mlx })
    }

    /// How the module at `path` is stored; `has_scales` tells whether the
    /// checkpoint has `<path>.scales` (mlx-lm quantizes exactly those).
    pub fn for_module(&self, path: &str, has_scales: bool) -> Quant {
        self.for_tensors(path, &|local| has_scales && local == "scales")
    }

    /// How the module at `path` is stored; `has(local)` tells whether the
    /// checkpoint has `<path>.<local>` (`scales`, `weight_scale`, `theta`).
    pub fn for_tensors(&self, path: &str, has: &dyn Fn(&str) -> bool) -> Quant {
        match &self.method {
            Method::Mlx | Method::Unsupported(_) => match self.overrides.get(path) {
                Some(Some(q)) => q.clone(),
                Some(None) => Quant::dense(),
                None => match (&self.default, has("scales")) {
                    (Some(q), true) => q.clone(),
                    _ => Quant::dense(),
                },
            },
            Method::BitNet { mode, not_converted } => {
                if has("weight_scale") && !not_converted.iter().any(|m| m == path) {
                    Quant::new(mode, 2, 0)
                } else {
                    Quant::dense()
                }
            }
            &Method::ParoQuant { bits, group_size } => {
                let io = path.ends_with("embed_tokens") || path.ends_with("lm_head");
                if has("theta") {
                    Quant::new("paroquant", bits, group_size)
                } else if has("scales") {
                    Quant::new("affine", bits, group_size)
                } else if io {
                    Quant { at_load: true, ..Quant::new("affine", bits, group_size) }
                } else {
                    Quant::dense()
                }
            }
        }
    }

    /// The checkpoint's `quant_method`, when config.json names one.
    pub fn method_name(&self) -> Option<&str> {
        match &self.method {
            Method::Mlx => None,
            Method::BitNet { .. } => Some("bitnet"),
            Method::ParoQuant { .. } => Some("paroquant"),
            Method::Unsupported(m) => Some(m),
        }
    }

    /// Refuses a `quant_method` rmlx does not map, or one whose modes no
    /// loaded plugin provides (`has_mode`), naming the methods that are.
    pub fn check_method(&self, has_mode: &dyn Fn(&str) -> bool) -> Result<()> {
        let provided: Vec<&str> =
            METHODS.iter().filter(|(_, modes)| modes.iter().all(|m| has_mode(m))).map(|(name, _)| *name).collect();
        let list = if provided.is_empty() { "none".to_string() } else { provided.join(", ") };
        let needed: Vec<&str> = match &self.method {
            Method::Mlx => return Ok(()),
            Method::Unsupported(m) => bail!(
                "config.json: quantization_config.quant_method `{m}` is not supported; the loaded plugins provide: {list} (and MLX's own `quantization` section)"
            ),
            Method::BitNet { mode, .. } => vec![mode.as_str()],
            Method::ParoQuant { .. } => vec!["paroquant", "affine"],
        };
        if let Some(m) = needed.iter().find(|m| !has_mode(m)) {
            bail!(
                "config.json: quantization_config.quant_method `{}` needs mode `{m}`, which no loaded plugin provides; the loaded plugins provide: {list}",
                self.method_name().unwrap_or_default()
            );
        }
        Ok(())
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

    #[test]
    fn bitnet_modules_are_those_with_weight_scale() {
        let c = serde_json::json!({"quantization_config": {
            "quant_method": "bitnet", "linear_class": "autobitlinear",
            "modules_to_not_convert": ["lm_head"]
        }});
        let q = QuantSpec::from_config(&c).unwrap();
        let ws = |n: &str| n == "weight_scale";
        assert_eq!(q.for_tensors("model.layers.0.mlp.up_proj", &ws).mode, "bitnet-autobitlinear");
        assert_eq!(q.for_tensors("model.embed_tokens", &|_| false).mode, "none");
        assert_eq!(q.for_tensors("lm_head", &ws).mode, "none");
        let plain = serde_json::json!({"quantization_config": {"quant_method": "bitnet"}});
        let q = QuantSpec::from_config(&plain).unwrap();
        assert_eq!(q.for_tensors("model.layers.0.mlp.up_proj", &ws).mode, "bitnet");
        assert!(q.check_method(&|m| m == "bitnet").is_ok());
        let e = q.check_method(&|m| m == "affine").unwrap_err().to_string();
        assert!(e.contains("needs mode `bitnet`"), "{e}");
    }

    #[test]
    fn paroquant_modules_are_those_with_theta_and_io_layers_quantize_at_load() {
        let c = serde_json::json!({"quantization_config": {
            "quant_method": "paroquant", "bits": 4, "group_size": 64, "krot": 8
        }});
        let q = QuantSpec::from_config(&c).unwrap();
        let rotated = q.for_tensors("model.layers.1.self_attn.q_proj", &|n| matches!(n, "theta" | "scales"));
        assert_eq!(
            (rotated.mode.as_str(), rotated.bits, rotated.group_size, rotated.at_load),
            ("paroquant", 4, 64, false)
        );
        let embed = q.for_tensors("model.embed_tokens", &|_| false);
        assert_eq!((embed.mode.as_str(), embed.at_load), ("affine", true));
        assert!(q.for_tensors("lm_head", &|_| false).at_load);
        assert!(!q.for_tensors("lm_head", &|n| n == "scales").at_load);
        assert_eq!(q.for_tensors("model.layers.0.mlp.up_proj", &|_| false).mode, "none");
    }

    #[test]
    fn unknown_quant_method_names_itself_and_the_provided_methods() {
        let c = serde_json::json!({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}});
        let q = QuantSpec::from_config(&c).unwrap();
        let e = q.check_method(&|m| m != "mxfp8").unwrap_err().to_string();
        assert!(e.contains("`awq`") && e.contains("bitnet, paroquant, mxfp4"), "{e}");
        assert!(!e.contains("mxfp8"), "{e}");
        // MLX's own section wins over quantization_config, as in mlx-lm.
        let both = serde_json::json!({"quantization": {"bits": 4, "group_size": 64},
                                      "quantization_config": {"quant_method": "awq"}});
        assert!(QuantSpec::from_config(&both).unwrap().check_method(&|_| false).is_ok());
        let fp = serde_json::json!({"quantization_config": {"quant_method": "mxfp4"}});
        assert_eq!(QuantSpec::from_config(&fp).unwrap().for_module("lm_head", true), Quant::new("mxfp4", 4, 32));
    }
}
