//! The plan of a conversion: the source tensors, each module's source and
//! target format, and every output tensor (name, dtype, shape, what makes it).
use anyhow::{anyhow, bail, Result};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

use super::recipe::{quant_json, Format, Rule, Spec};
use crate::model::quant::QuantSpec;
use rmlx_wquant_fp::check_mode;

#[derive(Debug, Clone)]
pub(super) struct SrcTensor {
    pub(super) file: usize,
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    /// A tensor mlx-lm's sanitize makes from other source tensors
    /// (sanitize.rs); `file` is then unused.
    pub(super) derive: Option<Derive>,
}

/// How a sanitized tensor is made from source tensors (mlx-lm's `sanitize`).
#[derive(Debug, Clone)]
pub(super) enum Derive {
    /// The experts' 2-D weights stacked along a new first axis: [E, out, in].
    Stack(Vec<String>),
    /// A conv1d weight [C, 1, K] moved to [C, K, 1] (`moveaxis(2, 1)`).
    MoveAxis(String),
    /// An RMSNorm weight stored as an offset from 1, plus 1.
    PlusOne(String),
}

/// Whether a `weight` of this many dimensions under `module` is a module's
/// (Linear, Embedding: 2-D; all experts of an MoE projection, mlx-lm's
/// `SwitchLinear` under `switch_mlp` / `experts`: 3-D [E, out, in]).
fn is_module_weight(module: &str, ndim: usize) -> bool {
    ndim == 2 || (ndim == 3 && module.split('.').any(|c| c == "switch_mlp" || c == "experts"))
}

/// What one output tensor is made from.
#[derive(Debug, Clone)]
pub(super) enum Make {
    /// A source tensor, cast to `dtype` if it differs.
    Copy { src: String },
    /// A part (`weight`, `scales`, `biases`) of module `module` converted.
    Module { module: String, part: &'static str },
}

#[derive(Debug, Clone)]
pub(super) struct Out {
    pub(super) name: String,
    pub(super) make: Make,
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    pub(super) nbytes: usize,
}

/// One module's conversion.
#[derive(Debug, Clone)]
pub(super) struct ModulePlan {
    pub(super) from: Format,
    pub(super) to: Format,
    /// dtype of the dense weight the conversion goes through.
    pub(super) dense_dtype: Dtype,
}

pub(super) fn st_dtype(s: &str) -> Result<Dtype> {
    Ok(match s {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "U32" => Dtype::U32,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I32" => Dtype::I32,
        "I64" => Dtype::I64,
        "U16" => Dtype::U16,
        "I16" => Dtype::I16,
        "F64" => Dtype::F64,
        "BOOL" => Dtype::BOOL,
        other => bail!("unsupported safetensors dtype {other}"),
    })
}

pub(super) fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

pub(super) fn nbytes(d: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * d.bitsize() / 8
}

/// Every 2-D `weight` (with its scales/biases if quantized) is a module; each
/// gets its target from the recipe (the last matching rule, else `default`).
/// Returns the modules and which module owns each of their tensors.
pub(super) fn plan_modules(
    src_tensors: &BTreeMap<String, SrcTensor>,
    spec: &QuantSpec,
    default: &Spec,
    rules: &[Rule],
    predicate: &dyn Fn(&str) -> Option<Format>,
    warnings: &mut Vec<String>,
) -> Result<(BTreeMap<String, ModulePlan>, HashMap<String, String>)> {
    let mut modules: BTreeMap<String, ModulePlan> = BTreeMap::new();
    let mut owned: HashMap<String, String> = HashMap::new(); // tensor -> module
    for (name, t) in src_tensors {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        let has_scales = src_tensors.contains_key(&format!("{module}.scales"));
        if !is_module_weight(module, t.shape.len()) || (!has_scales && !is_float(t.dtype)) {
            continue;
        }
        let from = if has_scales {
            let q = spec.for_module(module, true);
            if q.mode == "none" {
                bail!("{module} has scales but config.json's quantization says it is dense");
            }
            check_mode(&q.mode, q.bits, q.group_size).map_err(|e| anyhow!("{module}: {e}"))?;
            Format::Quant { mode: q.mode, bits: q.bits, group_size: q.group_size }
        } else {
            Format::Dense(None)
        };
        let cols = in_features(&from, &t.shape);
        // The spec that applies: the last matching rule, else --quant (or
        // what the model's own quant_predicate says for this module).
        let mut target = match (default, predicate(module)) {
            (Spec::To(Format::Quant { .. }), Some(f)) => Spec::To(f),
            _ => default.clone(),
        };
        for r in rules {
            if r.matches(module) {
                target = r.spec.clone();
            }
        }
        let mut to = match target {
            Spec::Keep => from.clone(),
            Spec::To(f) => f,
        };
        if let Format::Quant { group_size, mode, .. } = &to {
            if cols % *group_size as usize != 0 {
                warnings.push(format!(
                    "{module}: input dimension {cols} is not a multiple of {mode}'s group size {group_size}; left as it is"
                ));
                to = from.clone();
            }
        }
        // The dtype of the dense weight the conversion goes through.
        let dense_dtype = match &from {
            Format::Dense(_) => t.dtype,
            Format::Quant { mode, .. } if mode == "affine" => src_tensors[&format!("{module}.scales")].dtype,
            Format::Quant { .. } => Dtype::BF16, // mx.dequantize's default for uint8 scales
        };
        for part in ["weight", "scales", "biases", "global_scale"] {
            let n = format!("{module}.{part}");
            if src_tensors.contains_key(&n) {
                owned.insert(n, module.to_string());
            }
        }
        modules.insert(module.to_string(), ModulePlan { from, to, dense_dtype });
    }
    Ok((modules, owned))
}

/// A module's input features: its weight's last axis (unpacked when quantized).
fn in_features(from: &Format, shape: &[usize]) -> usize {
    let last = shape[shape.len() - 1];
    match from {
        Format::Quant { bits, .. } => last * 32 / *bits as usize,
        Format::Dense(_) => last,
    }
}

/// The output tensors, sorted by name, with what they add up to.
pub(super) struct OutPlan {
    pub outs: Vec<Out>,
    pub parameters: u64,
    /// Module format -> how many modules have it.
    pub formats: BTreeMap<String, usize>,
    /// Quantized module -> (mode, bits, group size).
    pub per_module: BTreeMap<String, (String, i32, i32)>,
}

/// Plans every output tensor: tensors no module owns are copied (cast to
/// `dense_cast` if float and `cast` allows it), an unchanged module's tensors
/// are copied, a converted module's parts are made from it.
pub(super) fn plan_outputs(
    src_tensors: &BTreeMap<String, SrcTensor>,
    owned: &HashMap<String, String>,
    modules: &BTreeMap<String, ModulePlan>,
    dense_cast: Option<Dtype>,
    cast: &dyn Fn(&str) -> bool,
) -> OutPlan {
    let mut outs: Vec<Out> = Vec::new();
    let mut parameters = 0u64;
    for (name, t) in src_tensors {
        if owned.contains_key(name) {
            continue;
        }
        let dtype = match dense_cast {
            Some(d) if is_float(t.dtype) && cast(name) => d,
            _ => t.dtype,
        };
        parameters += t.shape.iter().product::<usize>() as u64;
        outs.push(Out {
            name: name.clone(),
            make: Make::Copy { src: name.clone() },
            dtype,
            nbytes: nbytes(dtype, &t.shape),
            shape: t.shape.clone(),
        });
    }
    let mut formats: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_module: BTreeMap<String, (String, i32, i32)> = BTreeMap::new();
    for (module, plan) in modules {
        let w = &src_tensors[&format!("{module}.weight")];
        // [out] or [experts, out]: every axis but the input's
        let lead = &w.shape[..w.shape.len() - 1];
        let rows: usize = lead.iter().product();
        let cols = in_features(&plan.from, &w.shape);
        let shape = |last: usize| [lead, &[last]].concat();
        parameters += (rows * cols) as u64;
        *formats.entry(plan.to.describe()).or_default() += 1;
        if plan.to == plan.from {
            // Unchanged: copy its tensors as they are.
            for part in ["weight", "scales", "biases", "global_scale"] {
                let n = format!("{module}.{part}");
                if let Some(t) = src_tensors.get(&n) {
                    outs.push(Out {
                        name: n.clone(),
                        make: Make::Copy { src: n },
                        dtype: t.dtype,
                        nbytes: nbytes(t.dtype, &t.shape),
                        shape: t.shape.clone(),
                    });
                }
            }
        } else {
            let m = |part: &'static str, dtype: Dtype, shape: Vec<usize>| Out {
                name: format!("{module}.{part}"),
                make: Make::Module { module: module.clone(), part },
                dtype,
                nbytes: nbytes(dtype, &shape),
                shape,
            };
            match &plan.to {
                Format::Dense(d) => outs.push(m("weight", d.unwrap_or(plan.dense_dtype), shape(cols))),
                Format::Quant { mode, bits, group_size } => {
                    let g = cols / *group_size as usize;
                    outs.push(m("weight", Dtype::U32, shape(cols * *bits as usize / 32)));
                    if mode == "affine" {
                        outs.push(m("scales", plan.dense_dtype, shape(g)));
                        outs.push(m("biases", plan.dense_dtype, shape(g)));
                    } else {
                        outs.push(m("scales", Dtype::U8, shape(g)));
                    }
                }
            }
        }
        if let Format::Quant { mode, bits, group_size } = &plan.to {
            per_module.insert(module.clone(), (mode.clone(), *bits, *group_size));
        }
    }
    outs.sort_by(|a, b| a.name.cmp(&b.name));
    OutPlan { outs, parameters, formats, per_module }
}

/// config.json's `quantization` section: the default format (`--quant`'s, else
/// the most common one) and one entry per module that differs; `None` when
/// no module is quantized.
pub(super) fn quantization_section(default: &Spec, per_module: &BTreeMap<String, (String, i32, i32)>) -> Option<Value> {
    if per_module.is_empty() {
        return None;
    }
    let (dm, db, dg) = match default {
        Spec::To(Format::Quant { mode, bits, group_size }) => (mode.clone(), *bits, *group_size),
        _ => {
            // The most common format is the default.
            let mut count: BTreeMap<&(String, i32, i32), usize> = BTreeMap::new();
            for v in per_module.values() {
                *count.entry(v).or_default() += 1;
            }
            let (k, _) = count.into_iter().max_by_key(|(_, n)| *n).unwrap();
            k.clone()
        }
    };
    let mut q = serde_json::Map::new();
    q.insert("group_size".into(), json!(dg));
    q.insert("bits".into(), json!(db));
    q.insert("mode".into(), json!(dm));
    for (module, (m, b, g)) in per_module {
        if (m, *b, *g) != (&dm, db, dg) {
            q.insert(module.clone(), quant_json(m, *b, *g));
        }
    }
    Some(Value::Object(q))
}
