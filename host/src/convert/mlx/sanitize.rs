//! What mlx-lm's model classes do to a checkpoint when `mlx_lm.convert`
//! loads and quantizes it, for the model types whose Hugging Face layout
//! differs from mlx-lm's. Keyed on config.json's `model_type`, as mlx-lm
//! picks its model class (and so its `sanitize` and `quant_predicate`) by
//! it; nothing here depends on which rmlx plugin serves the model.
//!
//! - `qwen3_moe`, `qwen3_next`, `deepseek_v3` (`sanitize`): experts stored
//!   one by one, `{p}.mlp.experts.{e}.{gate,up,down}_proj.weight` [out, in]
//!   for `e <` the config's number of experts (`num_experts`;
//!   `n_routed_experts` for deepseek_v3), become
//!   `{p}.mlp.switch_mlp.{..}_proj.weight` [experts, out, in]. For
//!   qwen3_next, when it stacked any (its sign of the Hugging Face layout),
//!   also: `mtp.*` dropped, conv1d weights [C, 1, K] moved to [C, K, 1], and
//!   the 1-D RMSNorm weights of the blocks, q/k and the final norm (stored as
//!   offsets from 1) plus 1.
//! - deepseek_v3 differs from mlx-lm on purpose: its multi-token-prediction
//!   module, layer `model.layers.{num_hidden_layers}`, is kept (its experts
//!   stacked like the others), where mlx-lm's sanitize drops it, so that the
//!   `deepseek_v3_mtp` drafter (`--draft-kind mtp`) works on converted
//!   models; `kv_b_proj` stays as it is (mlx-lm splits it into `embed_q` /
//!   `unembed_out`; the plugin reads both layouts, and so does mlx-lm).
//! - `quant_predicate`: the routers (`mlp.gate`, and qwen3_next's and
//!   qwen3_5_moe's `shared_expert_gate`) of qwen3_moe, qwen3_next and
//!   qwen3_5_moe at affine 8 bits, group 64, when the rest is quantized;
//!   deepseek_v3's router `mlp.gate` left dense (mlx-lm's `MoEGate` is no
//!   Linear, so its `quantize_model` never quantizes it).
//! - `cast_predicate`: deepseek_v3's `e_score_correction_bias` is not cast
//!   by a dense `--quant` (`bf16`, ...), as mlx-lm's `--dtype` leaves it.
//! - Experts still stored one by one after `sanitize` (a model type whose
//!   experts rmlx does not stack) are not quantized one by one: no rmlx
//!   loader reads that layout, so [`refuse_experts_one_by_one`] refuses it.
use super::plan::{is_float, Derive, ModulePlan, SrcTensor};
use super::recipe::Format;
use anyhow::{bail, Result};
use serde_json::Value;
use std::collections::BTreeMap;

const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The model types whose experts stored one by one are stacked (as
/// mlx-lm's sanitize of each does), with the config.json key that holds
/// their number of experts.
const STACKS_EXPERTS: [(&str, &str); 3] =
    [("qwen3_moe", "num_experts"), ("qwen3_next", "num_experts"), ("deepseek_v3", "n_routed_experts")];

/// The suffixes of the RMSNorm weights qwen3_next's sanitize shifts by 1.
const SHIFTED_NORMS: [&str; 5] =
    [".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight", ".k_norm.weight"];

/// Rewrites `src` (tensor name -> what it is) as mlx-lm's sanitize of
/// `model_type` would, noting what it did in `warnings`.
pub(super) fn sanitize(
    model_type: &str,
    config: &Value,
    src: &mut BTreeMap<String, SrcTensor>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let Some(&(_, experts_key)) = STACKS_EXPERTS.iter().find(|(t, _)| *t == model_type) else {
        return Ok(());
    };
    // mlx-lm's trigger: the layers with `mlp.experts.0.up_proj.weight`
    // (for deepseek_v3 the MTP module's layer too: see the module doc).
    let layers: Vec<String> = src
        .keys()
        .filter_map(|k| k.strip_suffix(".mlp.experts.0.up_proj.weight"))
        .filter(|p| p.starts_with("model.layers."))
        .map(str::to_string)
        .collect();
    if layers.is_empty() {
        return Ok(());
    }
    let experts = config.get(experts_key).and_then(Value::as_u64).unwrap_or(0) as usize;
    if experts == 0 {
        bail!("config.json has no {experts_key}, but the checkpoint stores experts one by one ({}.mlp.experts.*)", layers[0]);
    }
    for layer in &layers {
        for proj in PROJECTIONS {
            stack(src, &format!("{layer}.mlp.experts"), &format!("{layer}.mlp.switch_mlp.{proj}.weight"), proj, experts_key, experts)?;
        }
    }
    warnings.push(format!("stacked the experts of {} layers into switch_mlp [experts, out, in] (mlx-lm's sanitize)", layers.len()));
    if model_type == "deepseek_v3" {
        let n = config.get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0);
        let mtp = format!("model.layers.{n}.");
        if src.keys().any(|k| k.starts_with(&mtp)) {
            warnings.push(format!(
                "kept the multi-token-prediction module {mtp}* (mlx-lm's convert drops it; rmlx's `--draft-kind mtp` reads it)"
            ));
        }
    }
    if model_type == "qwen3_next" {
        let mtp: Vec<String> = src.keys().filter(|k| k.contains("mtp.")).cloned().collect();
        if !mtp.is_empty() {
            warnings.push(format!("dropped {} mtp.* tensors (the multi-token-prediction head mlx-lm does not load)", mtp.len()));
        }
        for k in mtp {
            src.remove(&k);
        }
        for (name, t) in src.iter_mut() {
            if name.contains("conv1d.weight") && t.shape.len() == 3 && t.shape[2] != 1 {
                t.shape = vec![t.shape[0], t.shape[2], t.shape[1]]; // [C, 1, K] -> [C, K, 1]
                t.derive = Some(Derive::MoveAxis(name.clone()));
            } else if t.shape.len() == 1 && SHIFTED_NORMS.iter().any(|s| name.ends_with(s)) {
                t.derive = Some(Derive::PlusOne(name.clone()));
            }
        }
    }
    Ok(())
}

/// `{experts}.{e}.{proj}.weight` for e < n, removed from `src`, become `to`
/// [n, out, in].
fn stack(src: &mut BTreeMap<String, SrcTensor>, experts: &str, to: &str, proj: &str, key: &str, n: usize) -> Result<()> {
    let name = |e: usize| format!("{experts}.{e}.{proj}.weight");
    let stored = (0..).take_while(|&e| src.contains_key(&name(e))).count();
    if stored != n {
        let which = if stored < n { format!("{} is missing", name(stored)) } else { format!("{} is there too", name(n)) };
        bail!("config.json's {key} is {n} but the checkpoint stores {stored} experts one by one ({which})");
    }
    let parts: Vec<String> = (0..n).map(name).collect();
    let first = src[&parts[0]].clone();
    for p in &parts {
        let t = &src[p];
        if !is_float(t.dtype) || src.contains_key(&p.replace(".weight", ".scales")) {
            bail!(
                "{p}: {:?}, not plain float: quantized experts stored one by one are not a layout rmlx reads \
                 (no tool we know writes it); convert the float checkpoint",
                t.dtype
            );
        }
        if t.shape.len() != 2 || t.shape != first.shape || t.dtype != first.dtype {
            bail!("{p}: {:?} {:?}; every expert's {proj} must be 2-D and alike ({:?} {:?})", t.dtype, t.shape, first.dtype, first.shape);
        }
    }
    for p in &parts {
        src.remove(p);
    }
    let shape = vec![n, first.shape[0], first.shape[1]];
    src.insert(to.to_string(), SrcTensor { file: first.file, dtype: first.dtype, shape, derive: Some(Derive::Stack(parts)) });
    Ok(())
}

/// mlx-lm's `quant_predicate` of `model_type`: the format a module gets
/// instead of `--quant`'s, if any.
pub(super) fn quant_predicate(model_type: &str) -> impl Fn(&str) -> Option<Format> + '_ {
    move |module: &str| {
        let router = module.ends_with("mlp.gate");
        match model_type {
            "qwen3_moe" if router => Some(Format::Quant { mode: "affine".into(), bits: 8, group_size: 64 }),
            "qwen3_next" | "qwen3_5_moe" if router || module.ends_with("shared_expert_gate") => {
                Some(Format::Quant { mode: "affine".into(), bits: 8, group_size: 64 })
            }
            // `MoEGate` holds a bare weight, not a Linear: never quantized.
            "deepseek_v3" if router => Some(Format::Dense(None)),
            _ => None,
        }
    }
}

/// mlx-lm's `cast_predicate` of `model_type`: whether a float tensor that no
/// module owns takes a dense `--quant` dtype (deepseek_v3 keeps its routers'
/// `e_score_correction_bias` in their own dtype, float32 in DeepSeek's
/// checkpoints).
pub(super) fn cast_predicate(model_type: &str) -> impl Fn(&str) -> bool + '_ {
    move |name: &str| !(model_type == "deepseek_v3" && name.contains("e_score_correction_bias"))
}

/// Whether `module` is one expert of experts stored one by one
/// (`...experts.{e}.{proj}`).
fn is_one_expert(module: &str) -> bool {
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(2).any(|w| w[0] == "experts" && w[1].parse::<u32>().is_ok())
}

/// Refuses a plan that quantizes experts stored one by one (those `sanitize`
/// did not stack): quantized one by one they are a layout no rmlx loader
/// reads, so the output would not load.
pub(super) fn refuse_experts_one_by_one(model_type: &str, modules: &BTreeMap<String, ModulePlan>) -> Result<()> {
    let quantized = |p: &ModulePlan| matches!(p.to, Format::Quant { .. }) && p.to != p.from;
    if let Some((module, _)) = modules.iter().find(|(m, p)| is_one_expert(m) && quantized(p)) {
        let stacked: Vec<&str> = STACKS_EXPERTS.iter().map(|(t, _)| *t).collect();
        bail!(
            "{module}: this {model_type} checkpoint stores its experts one by one, and rmlx convert stacks them only for \
             {} (as mlx-lm's sanitize does); quantized one by one they would be a layout rmlx does not load. \
             Keep them as they are (`--layer experts=keep`)",
            stacked.join(", ")
        );
    }
    Ok(())
}
