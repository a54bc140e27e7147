//! The quantization recipe: target formats (`q4`, `mxfp4:32`, `bf16`, `keep`,
//! ...), `--layer PATTERN=SPEC` rules and how a pattern matches a module path.
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use rmlx_wquant_fp::{check_mode, MODES};
use serde_json::{json, Value};

use super::MlxOptions;

/// How one module is (or will be) stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Quant { mode: String, bits: i32, group_size: i32 },
    /// Dense; `None` keeps the source dtype (or the dequantized one).
    Dense(Option<Dtype>),
}

impl Format {
    pub(super) fn describe(&self) -> String {
        match self {
            Format::Quant { mode, bits, group_size } if mode == "affine" => format!("affine {bits}-bit g{group_size}"),
            Format::Quant { mode, group_size, .. } => format!("{mode} g{group_size}"),
            Format::Dense(Some(d)) => format!("dense {}", dtype_name(*d)),
            Format::Dense(None) => "dense".into(),
        }
    }
}

/// A recipe target: a format, or "as in the source".
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Keep,
    To(Format),
}

pub(super) fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        _ => "other",
    }
}

/// Parses `q4`, `mxfp4`, `nvfp4:16`, `bf16`, `keep`, ...; `group` overrides the
/// group size (from `--group-size`); a `:G` suffix does the same.
pub fn parse_spec(s: &str, group: Option<i32>) -> Result<Spec> {
    let (name, g) = match s.split_once(':') {
        Some((n, g)) => {
            let g: i32 = g.parse().map_err(|_| anyhow!("bad group size in {s:?} (expected e.g. q4:64)"))?;
            (n, Some(g))
        }
        None => (s, group),
    };
    let name = name.trim().to_ascii_lowercase();
    let dense = |d| {
        if g.is_some() {
            bail!("{s:?}: a dense format takes no group size");
        }
        Ok(Spec::To(Format::Dense(d)))
    };
    let (mode, bits) = match name.as_str() {
        "keep" => {
            if g.is_some() {
                bail!("{s:?}: keep takes no group size");
            }
            return Ok(Spec::Keep);
        }
        "dense" | "none" => return dense(None),
        "bf16" | "bfloat16" => return dense(Some(Dtype::BF16)),
        "f16" | "fp16" | "float16" => return dense(Some(Dtype::F16)),
        "f32" | "fp32" | "float32" => return dense(Some(Dtype::F32)),
        "affine" => ("affine", None),
        "mxfp4" | "mxfp8" | "nvfp4" => (name.as_str(), None),
        q if q.starts_with('q') && q[1..].parse::<i32>().is_ok() => ("affine", Some(q[1..].parse::<i32>()?)),
        _ => {
            let modes: Vec<&str> = MODES.iter().map(|m| m.0).collect();
            bail!(
                "unknown quantization {s:?} (use q2, q3, q4, q5, q6, q8, {}, bf16, f16, f32, dense or keep)",
                modes.join(", ")
            )
        }
    };
    let (_, bit_list, groups) = MODES.iter().find(|m| m.0 == mode).expect("known mode");
    let bits = bits.unwrap_or(bit_list[0]);
    let group_size = g.unwrap_or(groups[0]);
    check_mode(mode, bits, group_size).map_err(|e| anyhow!("{s:?}: {e}"))?;
    Ok(Spec::To(Format::Quant { mode: mode.to_string(), bits, group_size }))
}

/// One `--layer PATTERN=SPEC` rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub spec: Spec,
}

impl Rule {
    pub fn parse(s: &str) -> Result<Rule> {
        let Some((pattern, spec)) = s.split_once('=') else {
            bail!("--layer {s:?}: expected PATTERN=SPEC, e.g. embed_tokens=q8");
        };
        let pattern = pattern.trim();
        if pattern.is_empty() {
            bail!("--layer {s:?}: empty pattern");
        }
        Ok(Rule { pattern: pattern.to_string(), spec: parse_spec(spec, None).with_context(|| format!("--layer {s:?}"))? })
    }

    /// A pattern with `*` is a glob over the module path from any component on; otherwise it
    /// matches whole dot-separated components (`embed_tokens`, `mlp`,
    /// `layers.0`, `model.layers.3.self_attn.v_proj`).
    pub fn matches(&self, path: &str) -> bool {
        if self.pattern.contains('*') {
            // Anchored at any component start: `layers.1.*` matches `model.layers.1.mlp.up_proj`.
            return std::iter::once(0)
                .chain(path.match_indices('.').map(|(i, _)| i + 1))
                .any(|start| glob(&self.pattern, &path[start..]));
        }
        let p = format!(".{path}.");
        p.contains(&format!(".{}.", self.pattern))
    }
}

fn glob(pat: &str, s: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

pub(super) fn quant_json(mode: &str, bits: i32, group_size: i32) -> Value {
    json!({"group_size": group_size, "bits": bits, "mode": mode})
}

/// Parses and checks the recipe of `opts`: the `--quant` spec and the rules.
pub fn check_recipe(opts: &MlxOptions) -> Result<(Spec, Vec<Rule>)> {
    let default = match &opts.quant {
        Some(q) => parse_spec(q, opts.group_size).with_context(|| format!("--quant {q}"))?,
        None => {
            if opts.group_size.is_some() {
                bail!("--group-size needs --quant");
            }
            Spec::Keep
        }
    };
    let rules: Vec<Rule> = opts.layers.iter().map(|s| Rule::parse(s)).collect::<Result<_>>()?;
    Ok((default, rules))
}
