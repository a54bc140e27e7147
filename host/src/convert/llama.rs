//! Llama-family specifics: GGUF -> Hugging Face / mlx-lm tensor names,
//! hyper-parameters, `config.json` and the mlx-lm `quantization` section.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::gguf::GgufFile;
use super::quant::GROUP_SIZE;
use super::tokenizer::TokenizerFiles;

/// A GGUF tensor name mapped to an mlx-lm module path and parameter suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedName {
    /// e.g. `model.layers.3.self_attn.q_proj`
    pub module: String,
    /// `weight` or `bias`
    pub suffix: String,
    /// Rotary projection that llama.cpp permuted.
    pub rotary: Option<Rotary>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotary {
    Q,
    K,
}

/// A GGUF tensor name split as llama.cpp writes them: `<base>.<suffix>`,
/// where `base` is a global tensor (`token_embd`, `output_norm`, ...) or
/// `blk.<layer>.<part>`. Shared by the llama and Gemma mappings.
pub(crate) struct GgufName<'a> {
    /// `Some(layer)` for `blk.<layer>.<part>`.
    pub layer: Option<usize>,
    /// The global base, or the per-layer part.
    pub part: &'a str,
    pub suffix: &'a str,
}

/// Splits `name`, accepting only the given suffixes (`unknown` explains a miss).
pub(crate) fn split_name<'a>(name: &'a str, suffixes: &[&str], family: &str) -> Result<GgufName<'a>> {
    let (base, suffix) = name
        .rsplit_once('.')
        .filter(|(_, s)| suffixes.contains(s))
        .ok_or_else(|| anyhow!("unknown tensor '{}' (a {} GGUF has only .{} tensors)", name, family, suffixes.join("/.")))?;
    let Some(rest) = base.strip_prefix("blk.") else {
        return Ok(GgufName { layer: None, part: base, suffix });
    };
    let (layer, part) = rest.split_once('.').ok_or_else(|| anyhow!("unknown tensor '{}' for a {} model", name, family))?;
    let layer: usize = layer.parse().map_err(|_| anyhow!("bad layer index in tensor '{}'", name))?;
    Ok(GgufName { layer: Some(layer), part, suffix })
}

/// The mlx-lm module of a global tensor or a per-layer part every llama-like
/// GGUF shares (`None` for the family-specific rest).
pub(crate) fn shared_module(layer: Option<usize>, part: &str) -> Option<String> {
    let Some(layer) = layer else {
        return match part {
            "token_embd" => Some("model.embed_tokens".into()),
            "output_norm" => Some("model.norm".into()),
            _ => None,
        };
    };
    let sub = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{sub}"))
}

/// Map a GGUF tensor name; `Ok(None)` for tensors that are dropped.
pub fn map_tensor_name(name: &str) -> Result<Option<MappedName>> {
    let n = split_name(name, &["weight", "bias"], "llama")?;
    let unknown = || anyhow!("unknown tensor '{}' for a llama model", name);
    let rotary = match (n.layer, n.part) {
        (Some(_), "attn_q") => Some(Rotary::Q),
        (Some(_), "attn_k") => Some(Rotary::K),
        _ => None,
    };
    let module = match (n.layer, n.part) {
        (None, "output") => "lm_head".to_string(),
        (None, "rope_freqs") => bail!(
            "tensor 'rope_freqs.weight' (Llama 3 style rope scaling) is not supported: its parameters cannot be \
             recovered into config.json's rope_scaling"
        ),
        (Some(layer), "ffn_norm") => format!("model.layers.{layer}.post_attention_layernorm"),
        // Precomputed rotary frequencies in old conversions; MLX computes them.
        (Some(_), "attn_rot_embd") => return Ok(None),
        (layer, part) => shared_module(layer, part).ok_or_else(unknown)?,
    };
    Ok(Some(MappedName { module, suffix: n.suffix.to_string(), rotary }))
}

/// Hyper-parameters of a llama GGUF.
#[derive(Debug, Clone)]
pub struct LlamaPlan {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Value>,
    pub context_length: Option<u64>,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub warnings: Vec<String>,
}

pub(crate) fn require(g: &GgufFile, key: &str) -> Result<u64> {
    g.get_u64(key)?.ok_or_else(|| anyhow!("GGUF is missing required metadata '{}'", key))
}

/// The hyper-parameters every GGUF decoder stores under `<arch>.`.
pub(crate) struct Hparams {
    pub hidden_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub rms_norm_eps: f64,
    /// Rows of `token_embd.weight`'s second dimension.
    pub vocab_size: u64,
    pub intermediate_size: u64,
    /// `attention.key_length`, or attn_q's rows over the heads.
    pub head_dim: u64,
}

impl Hparams {
    pub(crate) fn read(g: &GgufFile, arch: &str) -> Result<Self> {
        let p = |k: &str| format!("{arch}.{k}");
        let hidden_size = require(g, &p("embedding_length"))?;
        let num_hidden_layers = require(g, &p("block_count"))?;
        let num_attention_heads = require(g, &p("attention.head_count"))?;
        let num_key_value_heads = g.get_u64(&p("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || !num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            bail!("invalid head counts: {} attention heads, {} kv heads", num_attention_heads, num_key_value_heads);
        }
        let rms_norm_eps = g
            .get_f64(&p("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| anyhow!("GGUF is missing '{}'", p("attention.layer_norm_rms_epsilon")))?;
        let dims = |name: &str| g.tensor(name).map(|t| t.dims.clone());
        let embd = dims("token_embd.weight").ok_or_else(|| anyhow!("GGUF has no token_embd.weight tensor"))?;
        if embd.len() != 2 || embd[0] != hidden_size {
            bail!("token_embd.weight has dims {:?}, expected [{}, vocab]", embd, hidden_size);
        }
        let vocab_size = embd[1];
        let intermediate_size = match g.get_u64(&p("feed_forward_length"))? {
            Some(v) => v,
            None => dims("blk.0.ffn_up.weight")
                .map(|d| d[1])
                .ok_or_else(|| anyhow!("GGUF is missing '{}'", p("feed_forward_length")))?,
        };
        let q_rows = dims("blk.0.attn_q.weight").map(|d| *d.last().unwrap_or(&0));
        let head_dim = match g.get_u64(&p("attention.key_length"))? {
            Some(v) => v,
            None => q_rows.map(|r| r / num_attention_heads).unwrap_or(hidden_size / num_attention_heads),
        };
        if let Some(r) = q_rows {
            if r != head_dim * num_attention_heads {
                bail!("attn_q has {} rows, expected {} heads x {}", r, num_attention_heads, head_dim);
            }
        }
        Ok(Hparams {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps,
            vocab_size,
            intermediate_size,
            head_dim,
        })
    }
}

impl LlamaPlan {
    pub fn new(g: &GgufFile, arch: &str) -> Result<Self> {
        if arch != "llama" {
            bail!("unsupported general.architecture '{}': only 'llama' is supported", arch);
        }
        let p = |k: &str| format!("{arch}.{k}");
        let Hparams {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps,
            vocab_size,
            intermediate_size,
            head_dim,
        } = Hparams::read(g, arch)?;
        let rope_theta = g.get_f64(&p("rope.freq_base"))?.unwrap_or(10000.0);
        let context_length = g.get_u64(&p("context_length"))?;

        if let Some(v) = g.get_u64(&p("vocab_size"))? {
            if v != vocab_size {
                bail!("{} = {} but token_embd.weight has {} rows", p("vocab_size"), v, vocab_size);
            }
        }
        if let Some(rd) = g.get_u64(&p("rope.dimension_count"))? {
            if rd != head_dim {
                bail!("partial rotary embeddings ({} of head_dim {}) are not supported", rd, head_dim);
            }
        }
        if !head_dim.is_multiple_of(2) {
            bail!("odd head_dim {}", head_dim);
        }

        let rope_scaling = match g.get_str(&p("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let f = g.get_f64(&p("rope.scaling.factor"))?.unwrap_or(1.0);
                if f == 1.0 {
                    None
                } else {
                    Some(json!({"type": "linear", "rope_type": "linear", "factor": f}))
                }
            }
            Some("yarn") => {
                let f = g
                    .get_f64(&p("rope.scaling.factor"))?
                    .ok_or_else(|| anyhow!("yarn rope scaling without {}", p("rope.scaling.factor")))?;
                let orig = g.get_u64(&p("rope.scaling.original_context_length"))?.ok_or_else(|| {
                    anyhow!("yarn rope scaling without {}", p("rope.scaling.original_context_length"))
                })?;
                Some(
                    json!({"type": "yarn", "rope_type": "yarn", "factor": f, "original_max_position_embeddings": orig}),
                )
            }
            Some(other) => bail!("unsupported rope scaling type '{}'", other),
        };

        let tie_word_embeddings = g.tensor("output.weight").is_none();
        let attention_bias = g.tensor("blk.0.attn_q.bias").is_some();
        Ok(LlamaPlan {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            context_length,
            vocab_size,
            tie_word_embeddings,
            attention_bias,
            warnings: Vec::new(),
        })
    }

    /// Heads to un-permute with, for q (n_head) and k (n_head_kv) projections.
    pub fn unpermute_heads(&self, m: &MappedName) -> Option<usize> {
        match m.rotary? {
            Rotary::Q => Some(self.num_attention_heads as usize),
            Rotary::K => Some(self.num_key_value_heads as usize),
        }
    }

    pub fn config_json(&self, g: &GgufFile, quant: Option<&Value>, tok: Option<&TokenizerFiles>) -> Result<Value> {
        let mut c = serde_json::Map::new();
        c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        c.insert("model_type".into(), json!("llama"));
        c.insert("hidden_size".into(), json!(self.hidden_size));
        c.insert("intermediate_size".into(), json!(self.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        c.insert("num_attention_heads".into(), json!(self.num_attention_heads));
        c.insert("num_key_value_heads".into(), json!(self.num_key_value_heads));
        c.insert("head_dim".into(), json!(self.head_dim));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("rms_norm_eps".into(), json!(f32_as_f64(self.rms_norm_eps)));
        c.insert("rope_theta".into(), json!(f32_as_f64(self.rope_theta)));
        c.insert("rope_scaling".into(), self.rope_scaling.clone().unwrap_or(Value::Null));
        if let Some(n) = self.context_length {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        c.insert("vocab_size".into(), json!(self.vocab_size));
        c.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        c.insert("attention_bias".into(), json!(self.attention_bias));
        c.insert("mlp_bias".into(), json!(false));
        if let Some(t) = tok {
            if let Some(b) = t.bos_token_id {
                c.insert("bos_token_id".into(), json!(b));
            }
        }
        if let Some(e) = eos_value(tok) {
            c.insert("eos_token_id".into(), e);
        }
        if let Some(q) = quant {
            c.insert("quantization".into(), q.clone());
            c.insert("quantization_config".into(), q.clone());
        }
        if let Some(name) = g.get_str("general.name")? {
            c.insert("_name_or_path".into(), json!(name));
        }
        Ok(Value::Object(c))
    }
}

/// generation_config.json from the tokenizer's special ids (every
/// converted architecture writes the same keys).
pub(crate) fn generation_config(tok: Option<&TokenizerFiles>) -> Value {
    let mut c = serde_json::Map::new();
    if let Some(t) = tok {
        if let Some(b) = t.bos_token_id {
            c.insert("bos_token_id".into(), json!(b));
        }
        if let Some(p) = t.pad_token_id {
            c.insert("pad_token_id".into(), json!(p));
        }
    }
    if let Some(e) = eos_value(tok) {
        c.insert("eos_token_id".into(), e);
    }
    Value::Object(c)
}

/// `eos_token_id` for config.json: one id, or a list with the extra EOS ids.
pub(crate) fn eos_value(tok: Option<&TokenizerFiles>) -> Option<Value> {
    let t = tok?;
    let eos = t.eos_token_id?;
    if t.extra_eos_ids.is_empty() {
        Some(json!(eos))
    } else {
        let mut ids = vec![eos];
        ids.extend(&t.extra_eos_ids);
        Some(json!(ids))
    }
}

/// GGUF stores these as f32; print the shortest decimal that round-trips the
/// f32 (1e-5 rather than 9.999999747378752e-06).
pub(crate) fn f32_as_f64(v: f64) -> f64 {
    let f = v as f32;
    if f as f64 == v {
        format!("{f}").parse().unwrap_or(v)
    } else {
        v
    }
}

/// mlx-lm `quantization` section for 2-D weight modules:
/// `Some(bits)` = quantized (affine, group 32), `None` = kept dense.
///
/// The default bits are the most common among quantized modules (ties: fewer
/// bits). Quantized modules with other bits get
/// `{"group_size": 32, "bits": b, "mode": "affine"}`; dense 2-D modules get
/// `false` (mlx-lm's loader returns the entry as its `class_predicate`).
/// Returns `None` when nothing is quantized.
pub fn quantization_config(modules: &BTreeMap<String, Option<u32>>) -> Option<Value> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for b in modules.values().flatten() {
        *counts.entry(*b).or_default() += 1;
    }
    // max by count; BTreeMap iterates bits ascending, max_by_key keeps the last max,
    // so iterate in reverse to prefer fewer bits on ties.
    let (&default_bits, _) = counts.iter().rev().max_by_key(|(_, &n)| n)?;
    let mut q = serde_json::Map::new();
    q.insert("group_size".into(), json!(GROUP_SIZE));
    q.insert("bits".into(), json!(default_bits));
    q.insert("mode".into(), json!("affine"));
    for (m, bits) in modules {
        match bits {
            Some(b) if *b == default_bits => {}
            Some(b) => {
                q.insert(m.clone(), json!({"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}));
            }
            None => {
                q.insert(m.clone(), json!(false));
            }
        }
    }
    Some(Value::Object(q))
}
